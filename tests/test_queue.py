"""The reliable queue's Redis operations, against a real server."""

from __future__ import annotations

import contextlib
import json
import random
import re
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater

from conftest import eventually
from taskserver import admin
from taskserver.config import RedisAddress, parse_rate_limits
from taskserver.keys import Keys
from taskserver.queue import GONE, TaskQueue, UnencodableTask
from taskserver.ratelimit import RatePolicy
from taskserver.redisclient import connect_subscriber
from taskserver.task import Task


@pytest.fixture
def queue(redis: Any, keys: Keys) -> TaskQueue:
    return TaskQueue(
        redis,
        keys,
        status_ttl_s=3600,
        timeout_s=2.0,
        clock=reactor,
        max_attempts=2,
        dead_letter_max=3,
    )


def new_task(user: str = "u1") -> Task:
    return Task.new(user, {"n": 1}, now=reactor.seconds())


async def enqueued(queue: TaskQueue, user_prefix: str, count: int) -> list[Task]:
    """``count`` tasks of users ``<user_prefix>0``, ``<user_prefix>1``, ..., enqueued in order."""
    tasks = [new_task(f"{user_prefix}{n}") for n in range(count)]
    for task in tasks:
        await queue.enqueue(task)
    return tasks


async def start(queue: TaskQueue, redis: Any, consumer: str = "p#0") -> tuple[Task, str]:
    """Enqueue a task, fetch it into ``consumer``'s list and mark it started."""
    task = new_task()
    await queue.enqueue(task)
    raw = await queue.fetch(redis, queue.keys.pending, queue.keys.processing(consumer), 1)
    assert raw is not None
    await queue.mark_started(task, "2026-01-01T00:00:00.000Z")
    return task, raw


@pytest_twisted.ensureDeferred
async def test_enqueue_pushes_the_task_and_its_status_together(
    queue: TaskQueue, redis: Any, keys: Keys
) -> None:
    task = new_task()
    await queue.enqueue(task)
    assert await redis.lrange(keys.pending, 0, -1) == [task.to_json()]
    record = await queue.status(task.id)
    assert record == {
        "status": "queued",
        "user_id": "u1",
        "attempts": "0",
        "queued_at": task.queued_at,
    }
    assert 0 < int(await redis.execute_command("PTTL", keys.status(task.id))) <= 3_600_000


@pytest_twisted.ensureDeferred
async def test_a_typed_task_keeps_its_type_in_the_entry_and_the_record(
    queue: TaskQueue, redis: Any, keys: Keys
) -> None:
    task = Task.new("u1", None, now=reactor.seconds(), type="email")
    plain = new_task("u2")
    await defer.gatherResults(  # one call, so it takes the six-argument stride for both
        [defer.ensureDeferred(queue.enqueue(t)) for t in (task, plain)]
    )
    assert await redis.lrange(keys.pending, 0, -1) == [plain.to_json(), task.to_json()]
    assert Task.from_json(task.to_json()).type == "email"
    assert (await queue.status(task.id) or {})["type"] == "email"
    assert "type" not in (await queue.status(plain.id) or {})


@pytest_twisted.ensureDeferred
async def test_a_delayed_task_waits_in_the_delayed_set_as_scheduled(
    queue: TaskQueue, redis: Any, keys: Keys
) -> None:
    task = new_task()
    await queue.admit(task, RatePolicy(keys, ()), 60_000, "2030-01-01T00:00:00.000Z")
    assert await redis.llen(keys.pending) == 0
    redis_now_ms = int((await redis.execute_command("TIME"))[0]) * 1000
    score = float(await redis.execute_command("ZSCORE", keys.delayed, task.to_json()))
    assert redis_now_ms + 58_000 <= score <= redis_now_ms + 62_000
    record = await queue.status(task.id) or {}
    assert record["status"] == "scheduled"
    assert record["run_at"] == "2030-01-01T00:00:00.000Z", "the caller's run_at, as is"


@pytest_twisted.ensureDeferred
async def test_fetch_start_finish(queue: TaskQueue, redis: Any, keys: Keys) -> None:
    first, second = new_task(), new_task()
    await queue.enqueue(first)
    await queue.enqueue(second)
    raw = await queue.fetch(redis, keys.pending, keys.processing("p#0"), 1)
    assert raw == first.to_json(), "oldest first"
    assert await redis.lrange(keys.processing("p#0"), 0, -1) == [raw]
    assert await queue.mark_started(first, "2026-01-01T00:00:00.000Z") == 1
    assert (await queue.status(first.id) or {})["status"] == "processing"
    await queue.complete("p#0", raw, first, "2026-01-01T00:00:01.000Z", 12.5)
    assert await redis.llen(keys.processing("p#0")) == 0
    record = await queue.status(first.id) or {}
    assert record["status"] == "completed"
    assert record["duration_ms"] == "12.500"
    assert record["attempts"] == "1"
    assert await redis.llen(keys.pending) == 1


@pytest_twisted.ensureDeferred
async def test_fetch_returns_none_when_the_queue_stays_empty(
    queue: TaskQueue, redis: Any, keys: Keys
) -> None:
    assert await queue.fetch(redis, keys.pending, keys.processing("p#0"), 1) is None


@pytest_twisted.ensureDeferred
async def test_unknown_task_has_no_status(queue: TaskQueue) -> None:
    assert await queue.status("0" * 32) is None


@pytest_twisted.ensureDeferred
async def test_reclaim_waits_while_the_heartbeat_lives(
    queue: TaskQueue, redis: Any, keys: Keys
) -> None:
    await queue.heartbeat("host:1:aa", ["host:1:aa#0"], ttl_s=30)
    await start(queue, redis, "host:1:aa#0")
    assert await queue.reap("someone-else") == (0, 0)
    assert await queue.reclaim("host:1:aa", ["host:1:aa#0"], forget=True) == (-1, 0)
    assert await redis.llen(keys.processing("host:1:aa#0")) == 1


@pytest_twisted.ensureDeferred
async def test_reap_puts_a_dead_process_tasks_before_the_queue(
    queue: TaskQueue, redis: Any, keys: Keys
) -> None:
    dead = "host:2:bb"
    tasks = await enqueued(queue, "user", 3)
    await queue.heartbeat(dead, [f"{dead}#0", f"{dead}#1"], ttl_s=30)
    await queue.fetch(redis, keys.pending, keys.processing(f"{dead}#0"), 1)  # tasks[0]
    await queue.fetch(redis, keys.pending, keys.processing(f"{dead}#1"), 1)  # tasks[1]
    await queue.mark_started(tasks[0], "2026-01-01T00:00:00.000Z")
    await queue.forget_heartbeat(dead)  # as if its TTL had run out

    assert await queue.reap("me") == (2, 0)
    # the suspects run (alone) before anything in the queue
    suspects = await redis.lrange(keys.suspects, 0, -1)
    assert sorted(Task.from_json(raw).user_id for raw in suspects) == ["user0", "user1"]
    assert [Task.from_json(raw).user_id for raw in await redis.lrange(keys.pending, 0, -1)] == [
        "user2"
    ]
    record = await queue.status(tasks[0].id) or {}
    assert (record["status"], record["attempts"]) == ("queued", "0"), "two ran: nobody blamed"
    assert await redis.smembers(keys.consumers) == set()
    assert await queue.reap("me") == (0, 0), "a list is reaped once"


@pytest_twisted.ensureDeferred
async def test_a_task_cancelled_between_its_pop_and_its_start_is_not_requeued_by_a_reap(
    queue: TaskQueue, redis: Any, keys: Keys
) -> None:
    dead = "host:4:dd"
    [task] = await enqueued(queue, "user", 1)
    await queue.heartbeat(dead, [f"{dead}#0"], ttl_s=30)
    await queue.fetch(redis, keys.pending, keys.processing(f"{dead}#0"), 1)  # popped, not started
    assert await queue.cancel(task.id, "2026-12-07T00:00:00.000Z") == ("cancelled", True)
    await queue.forget_heartbeat(dead)  # it died before its start step

    assert await queue.reap("me") == (0, 0)
    assert await redis.llen(keys.processing(f"{dead}#0")) == 0
    assert await redis.llen(keys.pending) == 0 and await redis.llen(keys.suspects) == 0
    assert (await queue.status(task.id) or {})["status"] == "cancelled"


@pytest_twisted.ensureDeferred
async def test_a_process_never_reaps_itself(queue: TaskQueue, redis: Any, keys: Keys) -> None:
    me = "host:3:cc"
    await queue.heartbeat(me, [f"{me}#0"], ttl_s=30)
    await start(queue, redis, f"{me}#0")
    await queue.forget_heartbeat(me)
    assert await queue.reap(me) == (0, 0)


@pytest_twisted.ensureDeferred
async def test_a_failed_attempt_is_retried_when_due(
    queue: TaskQueue, redis: Any, keys: Keys
) -> None:
    task, raw = await start(queue, redis)
    outcome = await queue.fail("p#0", raw, task, 1, "ValueError: x", 30.0, "t", 1.0)
    assert outcome == "retrying"
    assert await redis.llen(keys.processing("p#0")) == 0
    assert await redis.zcard(keys.delayed) == 1
    record = await queue.status(task.id) or {}
    assert (record["status"], record["error"]) == ("retrying", "ValueError: x")
    assert await queue.promote() == 0, "not due for 30 s"

    await redis.execute_command("ZADD", keys.delayed, "0", raw)  # make it due now
    assert await queue.promote() == 1
    assert await redis.lrange(keys.pending, 0, -1) == [raw]
    assert await redis.zcard(keys.delayed) == 0


@pytest_twisted.ensureDeferred
async def test_the_last_failed_attempt_goes_to_the_capped_dead_letters(
    queue: TaskQueue, redis: Any, keys: Keys
) -> None:
    for n in range(5):
        task, raw = await start(queue, redis)
        assert await queue.fail("p#0", raw, task, 2, f"boom {n}", 1.0, "t", 1.0) == "dead"
    entries = [json.loads(entry) for entry in await redis.lrange(keys.dead, 0, -1)]
    assert [e["error"] for e in entries] == ["boom 4", "boom 3", "boom 2"], (
        "newest first, capped at 3"
    )
    assert entries[0]["task"]["id"] == task.id and entries[0]["attempts"] == 2
    assert entries[0]["failed_at_ms"] > 1_700_000_000_000
    assert (await queue.status(task.id) or {})["status"] == "dead"


@pytest_twisted.ensureDeferred
async def test_a_task_that_keeps_killing_its_process_is_dead_lettered(
    queue: TaskQueue, redis: Any, keys: Keys
) -> None:
    """A poison pill: every crash while running it counts as an attempt."""
    task, _ = await start(queue, redis, "gone:1:x#0")
    assert await queue.reclaim("gone:1:x", ["gone:1:x#0"], forget=False, force=True) == (1, 0)
    assert (await queue.status(task.id) or {})["status"] == "queued", "1 of 2 attempts used"
    assert await redis.lrange(keys.suspects, 0, -1) == [task.to_json()], "to run alone next"

    batch = await queue.fetch_batch("gone:1:y#0", 10, "2026-01-01T00:00:00.000Z")
    assert batch.alone and [attempts for _, attempts in batch.tasks] == [2]
    assert await queue.reclaim("gone:1:y", ["gone:1:y#0"], forget=False, force=True) == (0, 1)
    assert await redis.llen(keys.suspects) == 0
    [entry] = [json.loads(e) for e in await redis.lrange(keys.dead, 0, -1)]
    assert entry["task"]["id"] == task.id and entry["attempts"] == 2
    assert "process died" in entry["error"]
    assert (await queue.status(task.id) or {})["status"] == "dead"


@pytest_twisted.ensureDeferred
async def test_a_graceful_stop_never_dead_letters(queue: TaskQueue, redis: Any, keys: Keys) -> None:
    task, _ = await start(queue, redis, "me:1:z#0")
    await queue.mark_started(task, "2026-01-01T00:00:00.000Z")  # attempts 2 of 2
    got = await queue.reclaim("me:1:z", ["me:1:z#0"], forget=True, force=True, died=False)
    assert got == (1, 0)
    assert await redis.llen(keys.pending) == 1 and await redis.llen(keys.dead) == 0


@pytest_twisted.ensureDeferred
async def test_fetch_batch_takes_oldest_first_and_marks_them_started(
    queue: TaskQueue, redis: Any, keys: Keys
) -> None:
    tasks = await enqueued(queue, "b", 5)
    fetched = (await queue.fetch_batch("p#0", 3, "2026-01-01T00:00:00.000Z")).tasks
    assert [Task.from_json(raw).user_id for raw, _ in fetched] == ["b0", "b1", "b2"]
    assert [attempts for _, attempts in fetched] == [1, 1, 1]
    assert await redis.llen(keys.processing("p#0")) == 3
    assert (await queue.status(tasks[0].id) or {})["status"] == "processing"
    assert len((await queue.fetch_batch("p#0", 10, "t")).tasks) == 2
    assert (await queue.fetch_batch("p#0", 10, "t")).tasks == []


@pytest_twisted.ensureDeferred
async def test_give_back_unknown_keeps_what_the_consumer_holds(
    queue: TaskQueue, redis: Any, keys: Keys
) -> None:
    await enqueued(queue, "g", 3)
    fetched = (await queue.fetch_batch("p#0", 3, "t")).tasks
    held = [fetched[0][0]]  # the consumer knows of one; the other two were "lost"
    assert await queue.give_back_unknown("p#0", held) == 2
    assert await redis.lrange(keys.processing("p#0"), 0, -1) == held
    assert await redis.llen(keys.pending) == 2


@pytest_twisted.ensureDeferred
async def test_admissions_of_one_turn_share_a_call_and_keep_their_order(
    queue: TaskQueue, redis: Any, keys: Keys
) -> None:
    """Ten users and a repeat of the first in one turn: the limit holds inside the batch."""
    policy = RatePolicy(keys, parse_rate_limits("1/1s"))
    tasks = [new_task(f"user-{i}") for i in range(10)] + [new_task("user-0")]
    calls_before = await script_calls(redis)
    decisions = await defer.gatherResults(
        [defer.ensureDeferred(queue.admit(t, policy)) for t in tasks]
    )
    assert await script_calls(redis) - calls_before == 1
    assert [d.allowed for d in decisions] == [True] * 10 + [False]
    [repeat] = decisions[-1].tiers
    assert repeat.used == 1 and 0 < repeat.reset_ms <= 1000, "it saw the first one's charge"
    oldest_first = list(reversed(await redis.lrange(keys.pending, 0, -1)))
    assert oldest_first == [t.to_json() for t in tasks[:10]]
    assert await queue.status(tasks[-1].id) is None, "a rejected task leaves no record"


async def script_calls(redis: Any) -> int:
    """EVAL and EVALSHA calls so far (INFO commandstats)."""
    info = str(await redis.execute_command("INFO", "commandstats"))
    return sum(int(n) for n in re.findall(r"cmdstat_eval(?:sha)?:calls=(\d+)", info))


@pytest_twisted.ensureDeferred
async def test_completions_of_one_turn_share_a_call(
    queue: TaskQueue, redis: Any, keys: Keys
) -> None:
    tasks = await enqueued(queue, "user-", 5)
    fetched = (await queue.fetch_batch("p#0", 5, "2026-01-01T00:00:00.000Z")).tasks
    assert len(fetched) == 5
    calls_before = await script_calls(redis)
    await defer.gatherResults(
        [
            defer.ensureDeferred(queue.complete("p#0", raw, t, "2026-01-01T00:00:01.000Z", 1.0))
            for (raw, _), t in zip(fetched, tasks, strict=True)
        ]
    )
    assert await script_calls(redis) - calls_before == 1
    assert await redis.llen(keys.processing("p#0")) == 0
    for t in tasks:
        assert (await queue.status(t.id) or {})["status"] == "completed"


@pytest_twisted.ensureDeferred
async def test_results_are_kept_with_the_record_in_the_one_call_of_a_turn(
    queue: TaskQueue, redis: Any, keys: Keys
) -> None:
    """Mixed in one call: a result, a note, none; each lands in its own record only."""
    warm, *tasks = await enqueued(queue, "r", 5)
    warm_raw, *fetched = (await queue.fetch_batch("p#0", 5, "2026-01-01T00:00:00.000Z")).tasks
    assert await queue.complete("p#0", warm_raw[0], warm, "t", 1.0)  # Redis knows COMPLETE now
    results: list[tuple[bytes, str] | None] = [
        None,
        (b'{"sent":true,"n":[1,2]}', ""),
        (b"", "result not stored: not JSON (set)"),
        (b'"\xc3\xa9t\xc3\xa9"', ""),
    ]
    calls_before = await script_calls(redis)
    await defer.gatherResults(
        [
            defer.ensureDeferred(
                queue.complete("p#0", raw, t, "2026-01-01T00:00:01.000Z", 1.0, result)
            )
            for (raw, _), t, result in zip(fetched, tasks, results, strict=True)
        ]
    )
    assert await script_calls(redis) - calls_before == 1
    records = [await queue.status(t.id) or {} for t in tasks]
    assert [r["status"] for r in records] == ["completed"] * 4
    assert "result" not in records[0] and "result_note" not in records[0]
    assert json.loads(records[1]["result"]) == {"sent": True, "n": [1, 2]}
    assert "result_note" not in records[1]
    assert records[2]["result_note"] == "result not stored: not JSON (set)"
    assert "result" not in records[2]
    assert json.loads(records[3]["result"]) == "\u00e9t\u00e9"
    ttl = await redis.execute_command("PTTL", keys.status(tasks[1].id))
    assert 3_500_000 < ttl <= 3_600_000, "the result expires with its record"


@pytest_twisted.ensureDeferred
async def test_a_completion_without_a_result_sends_the_arguments_it_always_did(
    queue: TaskQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Five per task; a task with a result adds its triple after all of them; the
    finished channel last."""
    sent: list[list[Any]] = []

    async def capture(script: Any, keys: Any, args: Any) -> list[int]:
        sent.append(list(args))
        return [1] * (len(keys) - 1)

    monkeypatch.setattr(queue, "_eval", capture)
    plain, typed = new_task(), new_task()
    await defer.gatherResults(
        [
            defer.ensureDeferred(queue.complete("p#0", "a", plain, "t", 1.0)),
            defer.ensureDeferred(queue.complete("p#0", "b", typed, "t", 1.0, (b"[1]", ""))),
        ]
    )
    [args] = sent
    assert len(args) == 1 + 5 * 2 + 3 + 1 and args[-4:] == [2, b"[1]", "", queue.keys.finished]
    await queue.complete("p#0", "a", plain, "t", 1.0)
    assert len(sent[-1]) == 1 + 5 + 1


@pytest_twisted.ensureDeferred
async def test_a_result_is_written_once_and_only_if_the_entry_was_there(
    queue: TaskQueue, redis: Any, keys: Keys
) -> None:
    """A replay keeps the first result; an entry a reaper took back writes none."""
    task, raw = await start(queue, redis)
    assert await queue.complete("p#0", raw, task, "t", 1.0, (b"1", ""))
    assert await queue.complete("p#0", raw, task, "t", 1.0, (b"2", "")), "a replay counts"
    assert (await queue.status(task.id) or {})["result"] == "1"
    other, other_raw = await start(queue, redis, "q#0")
    await redis.lrem(keys.processing("q#0"), 1, other_raw)  # as a reaper does
    assert not await queue.complete("q#0", other_raw, other, "t", 1.0, (b"3", ""))
    assert "result" not in (await queue.status(other.id) or {})


@pytest_twisted.ensureDeferred
async def test_a_death_with_several_tasks_running_blames_none_of_them(
    queue: TaskQueue, redis: Any, keys: Keys
) -> None:
    """Which of them killed the process is unknown: each gets its attempt back and runs alone."""
    tasks = await enqueued(queue, "s", 3)
    assert len((await queue.fetch_batch("gone:2:x#0", 3, "t")).tasks) == 3
    assert await queue.reclaim("gone:2:x", ["gone:2:x#0"], forget=True, force=True) == (3, 0)
    for task in tasks:
        record = await queue.status(task.id) or {}
        assert (record["status"], record["attempts"]) == ("queued", "0")
    assert await redis.llen(keys.suspects) == 3 and await redis.llen(keys.pending) == 0

    await queue.enqueue(new_task("ordinary"))
    busy = await queue.fetch_batch("p#0", 10, "t", idle=False)
    assert (busy.tasks, busy.wait) == ([], True), "a busy consumer lets its tasks finish first"
    idle = await queue.fetch_batch("p#0", 10, "t", idle=True)
    assert idle.alone and [Task.from_json(raw).id for raw, _ in idle.tasks] == [tasks[0].id]
    assert await redis.llen(keys.pending) == 1, "ordinary tasks wait for the suspects"


@pytest_twisted.ensureDeferred
async def test_a_task_whose_status_expired_while_waiting_gets_a_whole_record_again(
    queue: TaskQueue, redis: Any, keys: Keys
) -> None:
    task = new_task("patient")
    await queue.enqueue(task)
    await redis.delete(keys.status(task.id))
    [(_, attempts)] = (await queue.fetch_batch("p#0", 1, "2026-01-01T00:00:00.000Z")).tasks
    assert attempts == 1
    assert await queue.status(task.id) == {
        "status": "processing",
        "user_id": "patient",
        "attempts": "1",
        "queued_at": task.queued_at,
        "started_at": "2026-01-01T00:00:00.000Z",
    }
    assert 0 < int(await redis.execute_command("PTTL", keys.status(task.id))) <= 3_600_000


@pytest_twisted.ensureDeferred
async def test_a_replayed_fail_of_the_last_attempt_dead_letters_the_task_once(
    queue: TaskQueue, redis: Any, keys: Keys
) -> None:
    """FAIL ran, its reply was lost, the consumer sends it again: one dead-letter entry."""
    task, raw = await start(queue, redis)
    assert await queue.fail("p#0", raw, task, 2, "boom", 0.0, "t", 1.0) == "dead"
    assert await queue.fail("p#0", raw, task, 2, "boom", 0.0, "t", 1.0) == "dead", "counted"
    assert await redis.llen(keys.dead) == 1
    assert await admin.requeue(redis, keys, []) == 1
    assert await redis.lrange(keys.pending, 0, -1) == [raw], "one copy back in the queue"


@pytest_twisted.ensureDeferred
async def test_a_fail_replayed_after_its_retry_was_promoted_queues_one_copy(
    queue: TaskQueue, redis: Any, keys: Keys
) -> None:
    task, raw = await start(queue, redis)
    assert await queue.fail("p#0", raw, task, 1, "boom", 0.0, "t", 1.0) == "retrying"
    assert await queue.promote() == 1  # any process, meanwhile
    assert await queue.fail("p#0", raw, task, 1, "boom", 0.0, "t", 1.0) == "retrying"
    assert await queue.promote() == 0
    assert await redis.lrange(keys.pending, 0, -1) == [raw]
    assert await redis.zcard(keys.delayed) == 0


@pytest.mark.parametrize("outcome", ["fail", "complete"])
@pytest_twisted.ensureDeferred
async def test_an_outcome_for_an_entry_a_reaper_took_back_writes_nothing(
    queue: TaskQueue, redis: Any, keys: Keys, outcome: str
) -> None:
    """The heartbeat expired during a long block: the task was given back and runs again."""
    task, raw = await start(queue, redis, "slow:1:x#0")
    assert await queue.reclaim("slow:1:x", ["slow:1:x#0"], forget=True, force=True) == (1, 0)
    if outcome == "fail":
        assert await queue.fail("slow:1:x#0", raw, task, 1, "late", 0.0, "t", 1.0) == GONE
    else:
        assert await queue.complete("slow:1:x#0", raw, task, "t", 1.0) is False
    assert await redis.lrange(keys.suspects, 0, -1) == [raw], "the one copy, to run again"
    assert await redis.zcard(keys.delayed) == 0 and await redis.llen(keys.dead) == 0
    record = await queue.status(task.id) or {}
    assert (record["status"], record.get("error")) == ("queued", None)


@pytest_twisted.ensureDeferred
async def test_a_replayed_complete_does_not_bring_an_expired_record_back(
    queue: TaskQueue, redis: Any, keys: Keys
) -> None:
    task, raw = await start(queue, redis)
    assert await queue.complete("p#0", raw, task, "t", 1.0) is True
    assert await queue.complete("p#0", raw, task, "t", 1.0) is True, "replayed: still counted"
    await redis.delete(keys.status(task.id))  # as if STATUS_TTL had passed
    assert await queue.complete("p#0", raw, task, "t", 1.0) is False
    assert await queue.status(task.id) is None


@pytest_twisted.ensureDeferred
async def test_a_task_that_cannot_be_encoded_fails_alone_in_its_batch(
    queue: TaskQueue, redis: Any, keys: Keys
) -> None:
    """A lone surrogate (not UTF-8) in a payload or user id: the turn's other tasks go in."""
    policy = RatePolicy(keys, parse_rate_limits("5/1s"))
    good = [new_task("fine-1"), new_task("fine-2")]
    bad = [Task.new("u", {"name": "\udcff.csv"}, reactor.seconds()), new_task("\udcff")]
    results = await defer.DeferredList(
        [defer.ensureDeferred(queue.admit(t, policy)) for t in [good[0], *bad, good[1]]],
        consumeErrors=True,
    )
    assert [ok for ok, _ in results] == [True, False, False, True]
    assert all(result.check(UnencodableTask) for ok, result in results if not ok)
    assert list(reversed(await redis.lrange(keys.pending, 0, -1))) == [t.to_json() for t in good]
    assert await queue.status(bad[0].id) is None


class SendRecorder:
    """A Redis client that notes, in ``events``, every script it is asked to send."""

    def __init__(self, redis: Any, events: list[str]) -> None:
        self._redis = redis
        self._events = events

    def evalsha(self, *arguments: Any) -> Any:
        self._events.append("script sent")
        return self._redis.evalsha(*arguments)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._redis, name)


@pytest_twisted.ensureDeferred
async def test_task_log_lines_are_flushed_before_outcomes_are_sent(redis: Any, keys: Keys) -> None:
    """An outcome batch scheduled in an earlier turn may leave in the turn a line is added:
    the hook (the child's task-log flush) runs before every COMPLETE and FAIL is sent."""
    events: list[str] = []
    queue = TaskQueue(
        SendRecorder(redis, events),
        keys,
        status_ttl_s=3600,
        timeout_s=2.0,
        clock=reactor,
        max_attempts=2,
        before_outcomes=lambda: events.append("lines flushed"),
    )
    done, raw = await start(queue, redis)
    failed, failed_raw = await start(queue, redis)
    events.clear()
    assert await queue.complete("p#0", raw, done, "t", 1.0)
    assert events == ["lines flushed", "script sent"]
    events.clear()
    assert await queue.fail("p#0", failed_raw, failed, 1, "boom", 0.0, "t", 1.0) == "retrying"
    assert events == ["lines flushed", "script sent"]


@pytest_twisted.ensureDeferred
async def test_a_task_whose_outcome_is_never_recorded_ends_in_the_dead_letters(
    queue: TaskQueue, redis: Any, keys: Keys
) -> None:
    """Given back after each run (its outcome could not be recorded), it is charged an
    attempt by each fetch, so it does not run for ever: dead after MAX_ATTEMPTS (2)."""
    task, raw = await start(queue, redis)
    assert await queue.give_back("p#0", raw, 0.0) == "retrying"
    assert await queue.give_back("p#0", raw, 0.0) == GONE, "a replay moves nothing"
    assert (await queue.status(task.id) or {})["status"] == "retrying"
    assert await queue.promote() == 1
    again = await queue.fetch(redis, keys.pending, keys.processing("p#0"), 1)
    assert again == raw
    assert await queue.mark_started(task, "2026-01-01T00:00:01.000Z") == 2
    assert await queue.give_back("p#0", raw, 0.0) == "dead"
    entries = await redis.lrange(keys.dead, 0, -1)
    assert len(entries) == 1 and entries[0].endswith(',"task":' + raw + "}")
    assert await redis.zcard(keys.delayed) == 0
    assert (await queue.status(task.id) or {})["status"] == "dead"


@pytest_twisted.ensureDeferred
async def test_a_due_scheduled_task_is_queued_and_a_cancelled_one_never_starts(
    queue: TaskQueue, redis: Any, keys: Keys
) -> None:
    due, cancelled = new_task(), new_task()
    for task in (due, cancelled):
        await queue.admit(task, RatePolicy(keys, ()), 1, "2026-12-07T00:00:00.000Z")
    assert await queue.cancel(cancelled.id, "2026-12-07T00:00:00.000Z") == ("cancelled", True)
    assert await queue.cancel(cancelled.id, "2026-12-07T00:00:01.000Z") == ("cancelled", False)
    assert await redis.execute_command("ZCARD", keys.delayed) == 1  # its entry left at once
    await deferLater(reactor, 0.01)
    assert await queue.promote() == 1
    assert (await queue.status(due.id) or {})["status"] == "queued"
    queued = new_task()
    await queue.enqueue(queued)
    assert (await queue.cancel(queued.id, "2026-12-07T00:00:02.000Z"))[0] == "cancelled"
    batch = await queue.fetch_batch("p#0", 10, "2026-12-07T00:00:03.000Z")
    assert [raw for raw, _ in batch.tasks] == [due.to_json()] and batch.cancelled == 1
    assert await redis.lrange(keys.processing("p#0"), 0, -1) == [due.to_json()]
    assert await queue.cancel(due.id, "x") == ("processing", False)
    assert await queue.cancel("nope", "x") == (None, False)


@pytest_twisted.ensureDeferred
async def test_cancels_racing_fetches_and_promotion_each_task_runs_or_is_cancelled(
    queue: TaskQueue, redis: Any, keys: Keys
) -> None:
    """600 tasks (half of them delayed and promoted while the race runs), a cancel for
    each, and batch fetches from two consumers, all in flight together: every task is
    exactly one of started or cancelled, and each cancel's answer says which."""
    plain = [Task.new(f"p{n}", None, now=reactor.seconds()) for n in range(300)]
    delayed = [Task.new(f"d{n}", None, now=reactor.seconds()) for n in range(300)]
    await defer.gatherResults([defer.ensureDeferred(queue.enqueue(t)) for t in plain])
    unlimited = RatePolicy(keys, ())
    await defer.gatherResults(
        [
            defer.ensureDeferred(queue.admit(t, unlimited, 1, "2026-12-07T00:00:00.000Z"))
            for t in delayed
        ]
    )
    everyone = plain + delayed
    started: list[str] = []

    async def fetcher(consumer: str) -> None:
        for _ in range(150):
            await queue.promote()
            batch = await queue.fetch_batch(consumer, 2, "2026-01-01T00:00:00.000Z")
            started.extend(Task.from_json(raw).id for raw, _ in batch.tasks)

    answers: dict[str, tuple[str | None, bool]] = {}

    async def canceller(tasks: list[Task]) -> None:
        for start in range(0, len(tasks), 4):  # a few at a time, between the fetches
            chunk = tasks[start : start + 4]
            results = await defer.gatherResults(
                [
                    defer.ensureDeferred(queue.cancel(t.id, "2026-01-01T00:00:00.000Z"))
                    for t in chunk
                ]
            )
            answers.update((t.id, answer) for t, answer in zip(chunk, results, strict=True))

    order = random.Random(12).sample(everyone, len(everyone))
    await defer.gatherResults(
        [defer.ensureDeferred(fetcher(c)) for c in ("race#0", "race#1")]
        + [defer.ensureDeferred(canceller(order[i::2])) for i in range(2)]
    )
    for _ in range(100):  # what the fetchers had not reached yet
        await queue.promote()
        batch = await queue.fetch_batch("race#0", 100, "2026-01-01T00:00:00.000Z")
        if not batch.tasks and not await redis.zcard(keys.delayed):
            break
        started.extend(Task.from_json(raw).id for raw, _ in batch.tasks)
    else:
        raise AssertionError("the queue did not drain")
    assert len(started) == len(set(started)), "a task started twice"
    cancelled = {task_id for task_id, (_, changed) in answers.items() if changed}
    assert cancelled.isdisjoint(started), "a task was both cancelled and started"
    assert cancelled | set(started) == {t.id for t in everyone}, (
        "a task neither ran nor was cancelled"
    )
    for task_id, (state, changed) in answers.items():
        record = await queue.status(task_id) or {}
        assert record["status"] == ("cancelled" if changed else "processing")
        assert changed or state == "processing", "a refused cancel names what it found"
    assert await redis.llen(keys.pending) == 0


@pytest_twisted.ensureDeferred
async def test_a_replayed_start_step_charges_no_second_attempt(
    queue: TaskQueue, redis: Any, keys: Keys
) -> None:
    """The consumer asks MARK_STARTED again when its reply timed out: same answer."""
    task, _ = await start(queue, redis)
    assert await queue.mark_started(task, "2026-01-01T00:00:00.000Z") == 1, "a replay"
    assert (await queue.status(task.id) or {})["attempts"] == "1"
    assert await queue.mark_started(task, "2026-01-01T00:00:05.000Z") == 2, "another start"


@pytest_twisted.ensureDeferred
async def test_a_cancelled_task_given_back_stays_cancelled_and_is_not_requeued(
    queue: TaskQueue, redis: Any, keys: Keys
) -> None:
    """Popped, cancelled before its start step, then given back (its start step failed)."""
    [task] = await enqueued(queue, "user", 1)
    raw = await queue.fetch(redis, keys.pending, keys.processing("p#0"), 1)
    assert raw is not None
    assert await queue.cancel(task.id, "2026-12-07T00:00:00.000Z") == ("cancelled", True)
    assert await queue.give_back("p#0", raw, 0.0) == "cancelled"
    assert await redis.llen(keys.processing("p#0")) == 0
    assert await redis.zcard(keys.delayed) == 0 and await redis.llen(keys.pending) == 0
    assert (await queue.status(task.id) or {})["status"] == "cancelled"


@pytest_twisted.ensureDeferred
async def test_a_cancelled_scheduled_task_expires_status_ttl_after_its_cancel(
    queue: TaskQueue, redis: Any, keys: Keys
) -> None:
    """Not STATUS_TTL plus the delay it was admitted with: it will never run."""
    task = new_task()
    await queue.admit(task, RatePolicy(keys, ()), 600_000, "2030-01-01T00:00:00.000Z")
    assert await redis.execute_command("PTTL", keys.status(task.id)) > 3600_000
    assert await queue.cancel(task.id, "2026-12-07T00:00:00.000Z") == ("cancelled", True)
    assert 3590_000 < await redis.execute_command("PTTL", keys.status(task.id)) <= 3600_000


@pytest_twisted.ensureDeferred
async def test_the_scripts_that_finish_a_task_publish_its_id(
    queue: TaskQueue, redis: Any, keys: Keys, redis_server: RedisAddress
) -> None:
    """COMPLETE (one message a call, the ids it recorded), FAIL and GIVE_BACK when dead,
    RECLAIM for a poison pill, CANCEL; a retry or a requeue publishes nothing."""
    heard: list[str] = []
    subscriber = connect_subscriber(redis_server, 2.0)
    subscriber.on_message = lambda channel, text: heard.append(f"{channel} {text}")
    try:
        connection = await subscriber.getConnection(peek=True)
        await connection.execute_command("SUBSCRIBE", keys.finished, apply_timeout=False)
        done = await enqueued(queue, "pub-", 2)
        fetched = (await queue.fetch_batch("p#0", 2, "2026-01-01T00:00:00.000Z")).tasks
        await defer.gatherResults(
            [
                defer.ensureDeferred(queue.complete("p#0", raw, t, "2026-01-01T00:00:01Z", 1.0))
                for (raw, _), t in zip(fetched, done, strict=True)
            ]
        )
        failing, raw = await start(queue, redis)
        assert await queue.fail("p#0", raw, failing, 1, "once", 0.0, "t1", 1.0) == "retrying"
        assert await queue.promote() == 1
        await queue.fetch(redis, keys.pending, keys.processing("p#0"), 1)
        assert await queue.fail("p#0", raw, failing, 2, "twice", 0.0, "t2", 1.0) == "dead"
        given, raw = await start(queue, redis)
        await queue.mark_started(given, "2026-01-01T00:00:09.000Z")  # attempts 2 of 2
        assert await queue.give_back("p#0", raw, 0.0) == "dead"
        poison, _ = await start(queue, redis, "gone:2:x#0")
        await queue.mark_started(poison, "2026-01-01T00:00:09.000Z")
        assert await queue.reclaim("gone:2:x", ["gone:2:x#0"], forget=True, force=True) == (0, 1)
        cancelled = new_task()
        await queue.enqueue(cancelled)
        assert await queue.cancel(cancelled.id, "2026-01-01T00:00:00.000Z") == ("cancelled", True)
        expected = [
            " ".join(t.id for t in done),
            failing.id,
            given.id,
            poison.id,
            cancelled.id,
        ]
        with contextlib.suppress(AssertionError):  # the comparison below says what came
            await eventually(lambda: defer.succeed(len(heard) >= len(expected)), timeout=5)
        assert heard == [f"{keys.finished} {ids}" for ids in expected]
    finally:
        await subscriber.disconnect()
