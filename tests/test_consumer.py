"""The consumer against a real Redis: handlers, failures, retries, stop, and dead consumers."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import txredisapi
from twisted.internet import defer, reactor

from conftest import connect_raw, eventually, sleep
from taskserver import admin
from taskserver.config import RedisAddress
from taskserver.consumer import ConsumerService, backoff_s, stored_result
from taskserver.keys import Keys
from taskserver.metrics import Tally
from taskserver.queue import TaskQueue
from taskserver.redisclient import RedisUnavailable
from taskserver.task import Task, iso_utc
from taskserver.tasklog import TaskLog, TaskLogFile

Factory = Callable[..., ConsumerService]


@pytest.fixture
def queue(redis: Any, keys: Keys) -> TaskQueue:
    return TaskQueue(redis, keys, status_ttl_s=3600, timeout_s=2.0, clock=reactor, max_attempts=3)


@pytest_twisted.async_yield_fixture
async def consumers(
    redis_server: RedisAddress, queue: TaskQueue, tmp_path: Path
) -> AsyncIterator[Factory]:
    """Start ConsumerServices with their own blocking pools; stopped at teardown."""
    made: list[tuple[ConsumerService, Any]] = []
    log_file = TaskLogFile(tmp_path / "logs", 1_000_000)

    def make(handler: Callable[[dict[str, Any]], Any], **options: Any) -> ConsumerService:
        concurrency = options.pop("concurrency", 2)
        paused = options.pop("paused", False)
        blocking = connect_raw(redis_server, poolsize=concurrency)
        service = ConsumerService(
            queue=queue,
            blocking_redis=blocking,
            handler=handler,
            task_log=options.pop("task_log", None) or TaskLog(log_file.write_line, pid=4242),
            concurrency=concurrency,
            heartbeat_ttl_s=options.pop("heartbeat_ttl_s", 1.0),
            shutdown_timeout_s=options.pop("shutdown_timeout_s", 2.0),
            clock=reactor,
            **options,
        )
        if paused:  # as a child started during the task log's outage is
            service.pause()
        service.startService()
        made.append((service, blocking))
        return service

    yield make
    for service, blocking in made:
        if service.running:
            await service.stopService()
        await blocking.disconnect()
    log_file.close()


async def enqueue(
    queue: TaskQueue, user: str = "u", payload: Any = None, type: str | None = None
) -> Task:
    task = Task.new(user, payload, now=reactor.seconds(), type=type)
    await queue.enqueue(task)
    return task


def status_is(queue: TaskQueue, task: Task, wanted: str) -> Callable[[], Any]:
    async def check() -> bool:
        record = await queue.status(task.id)
        return record is not None and record["status"] == wanted

    return check


def pop_waiting(redis: Any) -> Callable[[], Any]:
    """True once a consumer waits in its blocking pop (so the next task comes by it)."""

    async def check() -> bool:
        return "cmd=brpoplpush" in str(await redis.execute_command("CLIENT", "LIST"))

    return check


def log_lines(tmp_path: Path) -> list[str]:
    path = tmp_path / "logs" / "tasks.log"
    return path.read_text().splitlines() if path.exists() else []


def test_backoff_doubles_up_to_a_cap() -> None:
    assert [backoff_s(n) for n in (1, 2, 3)] == [0.05, 0.1, 0.2]
    assert backoff_s(50) == 0.5


@pytest_twisted.ensureDeferred
async def test_handler_gets_the_task_and_completion_is_logged(
    consumers: Factory, queue: TaskQueue, tmp_path: Path, keys: Keys, redis: Any
) -> None:
    seen: list[dict[str, Any]] = []
    service = consumers(seen.append)
    task = await enqueue(queue, "alice", {"x": [1, 2]})
    await eventually(status_is(queue, task, "completed"))
    assert seen == [
        {
            "id": task.id,
            "user_id": "alice",
            "payload": {"x": [1, 2]},
            "queued_at": task.queued_at,
            "attempts": 1,
        }
    ]
    [line] = log_lines(tmp_path)
    assert f'user_id="alice" task_id={task.id} status=completed' in line
    assert line.endswith(" pid=4242")
    for consumer_id in service.consumer_ids:
        assert await redis.llen(keys.processing(consumer_id)) == 0


@pytest.mark.parametrize("style", ["deferred", "coroutine"])
@pytest_twisted.ensureDeferred
async def test_asynchronous_handlers_are_awaited(
    consumers: Factory, queue: TaskQueue, style: str
) -> None:
    release: defer.Deferred[None] = defer.Deferred()

    async def coroutine_handler(task: dict[str, Any]) -> None:
        await release

    consumers(coroutine_handler if style == "coroutine" else (lambda task: release))
    task = await enqueue(queue)
    await eventually(status_is(queue, task, "processing"))
    release.callback(None)
    await eventually(status_is(queue, task, "completed"))


@pytest_twisted.ensureDeferred
async def test_a_failing_task_is_retried_until_it_succeeds(
    consumers: Factory, queue: TaskQueue, tmp_path: Path
) -> None:
    attempts: list[int] = []

    def flaky(task: dict[str, Any]) -> None:
        attempts.append(task["attempts"])
        if task["attempts"] < 3:
            raise ConnectionError("downstream is down")

    consumers(flaky, retry_backoff_s=0.05)
    task = await enqueue(queue)
    await eventually(status_is(queue, task, "completed"))
    assert attempts == [1, 2, 3]
    assert [line.split(" status=")[1].split()[0] for line in log_lines(tmp_path)] == [
        "retrying",
        "retrying",
        "completed",
    ]


@pytest_twisted.ensureDeferred
async def test_a_task_that_always_fails_ends_in_the_dead_letters(
    consumers: Factory, queue: TaskQueue, redis: Any, keys: Keys
) -> None:
    def broken(task: dict[str, Any]) -> None:
        raise ValueError("bad input")

    consumers(broken, retry_backoff_s=0.05)
    task = await enqueue(queue)
    await eventually(status_is(queue, task, "dead"))
    record = await queue.status(task.id) or {}
    assert (record["error"], record["attempts"]) == ("ValueError: bad input", "3")
    [entry] = await redis.lrange(keys.dead, 0, -1)
    assert task.id in entry


def test_a_result_is_kept_as_compact_json_or_a_note_says_why_not() -> None:
    assert stored_result(None, 100) is None
    assert stored_result({"a": [1, 2.5], "é": "ü"}, 100) == (
        '{"a":[1,2.5],"é":"ü"}'.encode(),
        "",
    )
    assert stored_result("x" * 9, 11) == (b'"' + b"x" * 9 + b'"', ""), "exactly at the bound"
    assert stored_result("x" * 10, 11) == (
        b"",
        "result not stored: 12 bytes, over RESULT_MAX_BYTES 11",
    )
    assert stored_result("é" * 5, 11) == (
        b"",
        "result not stored: 12 bytes, over RESULT_MAX_BYTES 11",
    )
    for value, why in [
        ({1, 2}, "set"),
        (b"raw", "bytes"),
        (float("nan"), "NaN or Infinity"),
        ([float("inf")], "NaN or Infinity"),
        ("\ud800", "a string holds a lone surrogate"),
        (object(), "object"),
    ]:
        assert stored_result(value, 1000) == (b"", f"result not stored: not JSON ({why})")


@pytest.mark.parametrize(
    ("returned", "result", "note"),
    [
        ({"sent": True, "to": ["a@b.c"]}, {"sent": True, "to": ["a@b.c"]}, None),
        ({1, 2}, None, "result not stored: not JSON (set)"),
        ("x" * 70, None, "result not stored: 72 bytes, over RESULT_MAX_BYTES 64"),
        (None, None, None),
    ],
)
@pytest_twisted.ensureDeferred
async def test_the_handlers_return_value_is_kept_with_the_record(
    consumers: Factory, queue: TaskQueue, returned: Any, result: Any, note: str | None
) -> None:
    async def handler(task: dict[str, Any]) -> Any:
        return returned

    consumers(handler, result_max_bytes=64)
    task = await enqueue(queue)
    await eventually(status_is(queue, task, "completed"))
    record = await queue.status(task.id) or {}
    assert (json.loads(record["result"]) if "result" in record else None) == result
    assert record.get("result_note") == note


@pytest_twisted.ensureDeferred
async def test_a_failed_attempt_keeps_its_error_and_the_success_after_it_its_result(
    consumers: Factory, queue: TaskQueue
) -> None:
    def flaky(task: dict[str, Any]) -> int:
        if task["attempts"] == 1:
            raise ConnectionError("downstream is down")
        return task["attempts"]

    consumers(flaky, retry_backoff_s=0.05)
    task = await enqueue(queue)
    await eventually(status_is(queue, task, "completed"))
    record = await queue.status(task.id) or {}
    assert (record["result"], record["error"]) == ("2", "ConnectionError: downstream is down")


@pytest_twisted.ensureDeferred
async def test_a_typed_task_runs_its_types_handler_and_its_line_says_the_type(
    consumers: Factory, queue: TaskQueue, tmp_path: Path
) -> None:
    ran: list[tuple[str, Any]] = []

    def default(task: dict[str, Any]) -> str:
        ran.append(("default", task.get("type")))
        return "default"

    def email(task: dict[str, Any]) -> str:
        ran.append(("email", task["type"]))
        return "sent"

    consumers(default, typed_handlers={"email": email}, concurrency=1)
    typed = await enqueue(queue, "alice", type="email")
    untyped = await enqueue(queue, "bob")
    await eventually(status_is(queue, untyped, "completed"))
    await eventually(status_is(queue, typed, "completed"))
    assert sorted(ran) == [("default", None), ("email", "email")]
    assert (await queue.status(typed.id) or {})["type"] == "email"
    assert (await queue.status(typed.id) or {})["result"] == '"sent"'
    assert "type" not in (await queue.status(untyped.id) or {})
    lines = {line.split("task_id=")[1][:32]: line for line in log_lines(tmp_path)}
    assert lines[typed.id].endswith(' pid=4242 type="email"')
    assert lines[untyped.id].endswith(" pid=4242"), "an untyped line is as it was"


@pytest_twisted.ensureDeferred
async def test_a_queued_task_whose_type_is_gone_fails_visibly(
    consumers: Factory, queue: TaskQueue, tmp_path: Path
) -> None:
    """TASK_HANDLERS lost its type after it was queued: retried, then dead, with why."""
    consumers(lambda task: None, typed_handlers={"email": lambda task: None}, retry_backoff_s=0.01)
    task = await enqueue(queue, type="resize")
    await eventually(status_is(queue, task, "dead"))
    record = await queue.status(task.id) or {}
    assert record["error"] == (
        "UnknownTaskType: no handler for task type 'resize' (TASK_HANDLERS has: email)"
    )
    assert record["attempts"] == "3"
    assert [line.split(" status=")[1].split()[0] for line in log_lines(tmp_path)] == [
        "retrying",
        "retrying",
        "dead",
    ]


@pytest_twisted.ensureDeferred
async def test_a_handler_that_runs_too_long_is_cancelled(
    consumers: Factory, queue: TaskQueue, redis: Any, keys: Keys
) -> None:
    cancelled: list[bool] = []

    def endless(task: dict[str, Any]) -> defer.Deferred[None]:
        return defer.Deferred(lambda d: cancelled.append(True))

    consumers(endless, task_timeout_s=0.1, retry_backoff_s=0.05)
    task = await enqueue(queue)
    await eventually(status_is(queue, task, "dead"))
    assert cancelled == [True, True, True]
    record = await queue.status(task.id) or {}
    assert record["error"] == "TaskTimeout: ran longer than 0.1 s"


@pytest_twisted.ensureDeferred
async def test_consumers_share_the_work(consumers: Factory, queue: TaskQueue) -> None:
    done: list[str] = []
    consumers(lambda task: done.append(task["id"]), concurrency=4)
    tasks = [await enqueue(queue, f"user{i}") for i in range(50)]

    async def all_done() -> bool:
        return len(done) == 50

    await eventually(all_done)
    assert sorted(done) == sorted(t.id for t in tasks)


@pytest_twisted.ensureDeferred
async def test_stop_lets_a_running_task_finish(
    consumers: Factory, queue: TaskQueue, redis: Any, keys: Keys
) -> None:
    release: defer.Deferred[None] = defer.Deferred()
    service = consumers(lambda task: release, shutdown_timeout_s=5.0)
    task = await enqueue(queue)
    await eventually(status_is(queue, task, "processing"))
    stopped = service.stopService()
    assert not stopped.called, "the stop waits for the running task"
    release.callback(None)
    await stopped
    assert (await queue.status(task.id) or {})["status"] == "completed"
    assert await redis.llen(keys.pending) == 0


@pytest_twisted.ensureDeferred
async def test_stop_gives_back_a_task_that_does_not_finish_in_time(
    consumers: Factory, queue: TaskQueue, redis: Any, keys: Keys
) -> None:
    service = consumers(lambda task: defer.Deferred(), shutdown_timeout_s=0.2)
    task = await enqueue(queue)
    await eventually(status_is(queue, task, "processing"))
    await service.stopService()
    assert await redis.lrange(keys.pending, 0, -1) == [task.to_json()]
    assert (await queue.status(task.id) or {})["status"] == "queued"
    assert not await redis.exists(keys.heartbeat(service.process_id))


@pytest_twisted.ensureDeferred
async def test_a_dead_consumers_task_runs_again(
    consumers: Factory, queue: TaskQueue, redis: Any, keys: Keys, tmp_path: Path
) -> None:
    """A process died holding a task: its heartbeat expires, a live process reaps and runs it."""
    dead = "otherhost:999:dead00"
    task = await enqueue(queue, "victim")
    await queue.heartbeat(dead, [f"{dead}#0"], ttl_s=0.5)
    assert await queue.fetch(redis, keys.pending, keys.processing(f"{dead}#0"), 1)
    await queue.mark_started(task, "2026-01-01T00:00:00.000Z")

    consumers(lambda task: None, heartbeat_ttl_s=1.0)
    # How soon is the fault suite's to measure; a loaded machine may take its time here.
    await eventually(status_is(queue, task, "completed"), timeout=30.0)
    record = await queue.status(task.id) or {}
    assert record["attempts"] == "2"
    assert f"task_id={task.id} status=completed" in log_lines(tmp_path)[0]
    assert await redis.llen(keys.processing(f"{dead}#0")) == 0


@pytest_twisted.ensureDeferred
async def test_an_entry_that_is_not_a_task_is_dropped(
    consumers: Factory, queue: TaskQueue, redis: Any, keys: Keys
) -> None:
    seen: list[Any] = []
    consumers(seen.append)
    await redis.lpush(keys.pending, "not json")
    task = await enqueue(queue)
    await eventually(status_is(queue, task, "completed"))
    assert [t["id"] for t in seen] == [task.id]

    async def processing_lists_empty() -> bool:
        names = await redis.keys(f"{keys.prefix}:*processing*")
        return not names

    await eventually(processing_lists_empty)


class LosesTheFirstReply:
    """A blocking Redis client whose first BRPOPLPUSH moves a task but whose reply is lost.

    That is what a connection that drops at the wrong moment (a Redis restart,
    a network blip) does: the task is in the consumer's list, the consumer
    does not know it.
    """

    def __init__(self, real: Any) -> None:
        self._real = real
        self._lost_one = False

    async def brpoplpush(self, source: str, destination: str, timeout: int) -> Any:
        moved = await self._real.brpoplpush(source, destination, timeout)
        if moved and not self._lost_one:
            self._lost_one = True
            raise txredisapi.ConnectionError("Lost connection")
        return moved


@pytest_twisted.ensureDeferred
async def test_a_task_whose_fetch_reply_was_lost_is_not_stuck(
    queue: TaskQueue, redis_server: RedisAddress, tmp_path: Path, redis: Any
) -> None:
    real = connect_raw(redis_server, poolsize=1)
    lossy = LosesTheFirstReply(real)
    log_file = TaskLogFile(tmp_path / "logs", 1_000_000)
    service = ConsumerService(
        queue=queue,
        blocking_redis=lossy,
        handler=lambda task: None,
        task_log=TaskLog(log_file.write_line, pid=1),
        concurrency=1,
        heartbeat_ttl_s=30.0,  # the process stays alive: no reaper would help
        shutdown_timeout_s=1.0,
        clock=reactor,
    )
    service.startService()
    try:

        async def pop_waiting() -> bool:
            return "cmd=brpoplpush" in str(await redis.execute_command("CLIENT", "LIST"))

        await eventually(pop_waiting)  # the queue is empty: the consumer blocks in the pop
        task = await enqueue(queue, "unlucky")
        await eventually(status_is(queue, task, "completed"), timeout=30.0)
        assert lossy._lost_one, "the reply of the pop that took the task was lost"
    finally:
        await service.stopService()
        await real.disconnect()
        log_file.close()


@pytest_twisted.ensureDeferred
async def test_tasks_awaiting_their_acknowledgement_are_bounded(
    consumers: Factory, queue: TaskQueue, monkeypatch: Any
) -> None:
    """Acknowledgements that never come back: at most 2 x CONCURRENCY entries, then no fetch.

    Every fetch is recorded with the room it asked for: the first fetch after
    one acknowledgement lands must be the third of all and ask for one task,
    which it could not be had the consumer fetched while the four were unanswered.
    """
    unanswered: list[defer.Deferred[None]] = []
    fetches: list[tuple[int, int]] = []  # (most, acknowledgements answered by then)
    real_fetch_batch = queue.fetch_batch

    def complete(*args: Any) -> defer.Deferred[None]:
        unanswered.append(defer.Deferred())
        return unanswered[-1]

    async def fetch_batch(consumer_id: str, most: int, *args: Any, **options: Any) -> Any:
        fetches.append((most, sum(d.called for d in unanswered)))
        return await real_fetch_batch(consumer_id, most, *args, **options)

    monkeypatch.setattr(queue, "complete", complete)
    monkeypatch.setattr(queue, "fetch_batch", fetch_batch)
    for n in range(10):
        await enqueue(queue, f"unacked-{n}")
    consumers(lambda task: None, concurrency=2)
    await eventually(lambda: defer.succeed(len(unanswered) >= 4))
    unanswered[0].callback(None)
    await eventually(lambda: defer.succeed(len(fetches) >= 3))
    assert fetches[:3] == [(2, 0), (2, 0), (1, 1)], "no fetch while 4 acknowledgements were due"
    await eventually(lambda: defer.succeed(len(unanswered) == 5))
    for d in unanswered:
        if not d.called:
            d.callback(None)


@pytest.mark.parametrize("outcome", ["completed", "retrying"])
@pytest_twisted.ensureDeferred
async def test_the_line_is_written_before_the_outcome_removes_the_entry(
    consumers: Factory, queue: TaskQueue, redis: Any, keys: Keys, monkeypatch: Any, outcome: str
) -> None:
    """A crash between the two steps runs the task again; it never loses the task's line.

    Only ``[retrying]`` guards a fix (FAIL used to remove the entry before the line was
    written); ``[completed]`` passed before it too and is here so neither path regresses.
    """
    events: list[tuple[str, Any]] = []

    def sink(line: str) -> None:
        events.append(("line", line.split(" status=")[1].split()[0]))

    def watched(name: str) -> Callable[..., Any]:
        real = getattr(queue, name)

        async def call(consumer_id: str, *args: Any) -> Any:
            events.append((name, await redis.llen(keys.processing(consumer_id))))
            return await real(consumer_id, *args)

        return call

    monkeypatch.setattr(queue, "complete", watched("complete"))
    monkeypatch.setattr(queue, "fail", watched("fail"))

    def handler(task: dict[str, Any]) -> None:
        if outcome == "retrying":
            raise ValueError("once")

    consumers(handler, task_log=TaskLog(sink, pid=1), retry_backoff_s=60.0)
    task = await enqueue(queue)
    await eventually(status_is(queue, task, outcome))
    step = "complete" if outcome == "completed" else "fail"
    assert events == [("line", outcome), (step, 1)], "line first, while the entry is still held"


@pytest_twisted.ensureDeferred
async def test_a_requeued_dead_task_reaches_the_handler_unchanged(
    consumers: Factory, queue: TaskQueue, redis: Any, keys: Keys
) -> None:
    """Dead, requeued with taskserver-admin, run again: the handler sees the payload it was sent."""
    payload = {"empty": [], "none": {}, "big": 12345678901234567890, "ключ": ["ü", [[]]]}
    seen: list[Any] = []
    broken = [True]

    def handler(task: dict[str, Any]) -> None:
        seen.append(task["payload"])
        if broken[0]:
            raise ValueError("not yet")

    consumers(handler, retry_backoff_s=0.01)
    task = await enqueue(queue, "requeued", payload)
    await eventually(status_is(queue, task, "dead"))
    broken[0] = False
    assert await admin.requeue(redis, keys, [task.id]) == 1
    await eventually(status_is(queue, task, "completed"))
    assert seen == [payload] * 4


@pytest_twisted.ensureDeferred
async def test_a_fail_whose_reply_timed_out_after_it_ran_is_not_recorded_twice(
    consumers: Factory, queue: TaskQueue, redis: Any, keys: Keys, monkeypatch: Any
) -> None:
    """The script ran, the reply came too late: the consumer's retry of it adds nothing."""
    real_fail = queue.fail
    answers: list[str] = []

    async def late_reply(*args: Any) -> str:
        answers.append(await real_fail(*args))
        if len(answers) == 1:
            raise RedisUnavailable("Redis did not answer within 2.0 s")
        return answers[-1]

    def broken(task: dict[str, Any]) -> None:
        raise ValueError("always")

    monkeypatch.setattr(queue, "fail", late_reply)
    monkeypatch.setattr(queue, "max_attempts", 1)
    consumers(broken)
    task = await enqueue(queue)
    await eventually(status_is(queue, task, "dead"))
    await eventually(lambda: defer.succeed(len(answers) == 2))
    assert answers == ["dead", "dead"], "the replay answers what the first try recorded"
    assert await redis.llen(keys.dead) == 1, "one dead-letter entry"


@pytest_twisted.ensureDeferred
async def test_a_handler_error_with_a_lone_surrogate_is_recorded(
    consumers: Factory, queue: TaskQueue, redis: Any, keys: Keys
) -> None:
    """An error about a surrogateescape file name (ordinary on Linux) cannot strand its task."""

    def handler(task: dict[str, Any]) -> None:
        raise FileNotFoundError("no such file: '\udcff.csv'")

    consumers(handler, retry_backoff_s=0.01)
    task = await enqueue(queue)
    await eventually(status_is(queue, task, "dead"))
    record = await queue.status(task.id) or {}
    assert (record["error"], record["attempts"]) == (
        "FileNotFoundError: no such file: '\\udcff.csv'",
        "3",
    )
    assert await redis.llen(keys.dead) == 1


@pytest.mark.parametrize("step", ["complete", "fail"])
@pytest_twisted.ensureDeferred
async def test_an_outcome_that_cannot_be_recorded_gives_the_task_back(
    consumers: Factory, queue: TaskQueue, redis: Any, keys: Keys, monkeypatch: Any, step: str
) -> None:
    """Not Redis being away (retrying would not help): the entry comes back and runs again."""
    real = getattr(queue, step)
    broke: list[bool] = []

    async def broken_once(*args: Any) -> Any:
        if not broke:
            broke.append(True)
            raise txredisapi.InvalidData("as a value that cannot be encoded does")
        return await real(*args)

    attempts: list[int] = []

    def handler(task: dict[str, Any]) -> None:
        attempts.append(task["attempts"])
        if step == "fail" and task["attempts"] == 1:
            raise ValueError("once")

    monkeypatch.setattr(queue, step, broken_once)
    service = consumers(handler, retry_backoff_s=0.05)
    task = await enqueue(queue)
    await eventually(status_is(queue, task, "completed"))
    assert broke and attempts == [1, 2]
    assert await redis.llen(keys.processing(service.consumer_ids[0])) == 0
    assert await redis.zcard(keys.delayed) == 0 and await redis.llen(keys.pending) == 0


@pytest_twisted.ensureDeferred
async def test_a_paused_consumer_starts_nothing_until_resumed(
    consumers: Factory, queue: TaskQueue, redis: Any, keys: Keys, tmp_path: Path
) -> None:
    """Back-pressure from a full task log: the tasks wait in the queue, then run."""
    seen: list[str] = []
    # Paused from its start: once started, a fetch under way when pause() comes
    # may still find and start a batch (the tasks are marked started with it).
    service = consumers(lambda task: seen.append(task["id"]), paused=True)
    waiting = [await enqueue(queue) for _ in range(3)]
    # Long enough for a few fetches of an unpaused dispatcher (it fetches within one turn).
    await sleep(0.3)
    assert seen == [], "nothing started while paused"
    assert await redis.llen(keys.pending) == 3
    service.resume()
    for task in waiting:
        await eventually(status_is(queue, task, "completed"))
    assert seen == [task.id for task in waiting]
    assert len(log_lines(tmp_path)) == 3


@pytest_twisted.ensureDeferred
async def test_a_task_running_when_fetching_pauses_finishes_and_logs_its_line(
    consumers: Factory, queue: TaskQueue, tmp_path: Path
) -> None:
    gate: defer.Deferred[None] = defer.Deferred()
    started: list[str] = []

    def held(task: dict[str, Any]) -> defer.Deferred[None]:
        started.append(task["id"])
        return gate

    service = consumers(held, concurrency=1)
    task = await enqueue(queue)
    await eventually(lambda: defer.succeed(started == [task.id]))
    service.pause()
    gate.callback(None)
    await eventually(status_is(queue, task, "completed"))
    [line] = log_lines(tmp_path)
    assert f"task_id={task.id} status=completed" in line


@pytest_twisted.ensureDeferred
async def test_a_start_step_whose_reply_timed_out_is_retried_and_a_cancel_it_found_holds(
    consumers: Factory, queue: TaskQueue, redis: Any, keys: Keys, monkeypatch: Any
) -> None:
    """Popped, then cancelled before its start step, whose first reply is lost: the
    consumer asks again (no guess), hears "cancelled", and never runs it."""
    real_mark_started = queue.mark_started
    answers: list[int] = []

    async def cancelled_then_late(task_: Task, started_at: str) -> int:
        if not answers:
            assert await queue.cancel(task_.id, started_at) == ("cancelled", True)
        answers.append(await real_mark_started(task_, started_at))
        if len(answers) == 1:
            raise RedisUnavailable("Redis did not answer within 2.0 s")
        return answers[-1]

    monkeypatch.setattr(queue, "mark_started", cancelled_then_late)
    seen: list[dict[str, Any]] = []
    service = consumers(seen.append, concurrency=1)

    await eventually(pop_waiting(redis))  # the queue is empty: the next task comes by the pop
    task = await enqueue(queue)

    async def entry_gone() -> bool:
        return bool(answers) and await redis.llen(keys.processing(service.consumer_ids[0])) == 0

    await eventually(entry_gone)
    assert seen == [], "a cancelled task never runs"
    assert answers == [0, 0], "asked again, and both answers said cancelled"
    assert (await queue.status(task.id) or {})["status"] == "cancelled"
    assert service.cancelled_dropped == 1


@pytest_twisted.ensureDeferred
async def test_a_delayed_tasks_wait_is_counted_from_its_run_at(
    consumers: Factory, queue: TaskQueue
) -> None:
    """Submitted an hour ago to run now: it waited for no one, the hour is its delay."""
    now = reactor.seconds()
    task = Task.new("u", None, now=now - 3600, run_at=iso_utc(now))
    await queue.enqueue(task)
    tally = Tally()
    consumers(lambda task: None, tally=tally)
    await eventually(status_is(queue, task, "completed"))
    counts = tally.take()
    assert counts["task_wait_seconds_count"] == 1
    assert counts["task_wait_seconds_sum_us"] < 60_000_000, "the delay counted as a wait"


@pytest_twisted.ensureDeferred
async def test_start_steps_retried_through_an_outage_are_not_run_time(
    consumers: Factory, queue: TaskQueue, redis: Any, monkeypatch: Any
) -> None:
    """The first start step's reply is lost (a retry after the back-off): the task's
    duration_ms is its handler's time, not the back-off's."""
    real_mark_started = queue.mark_started
    calls: list[str] = []

    async def lost_once(task_: Task, started_at: str) -> int:
        calls.append(started_at)
        attempts = await real_mark_started(task_, started_at)
        if len(calls) == 1:
            raise RedisUnavailable("Redis did not answer within 2.0 s")
        return attempts

    monkeypatch.setattr(queue, "mark_started", lost_once)
    consumers(lambda task: None, concurrency=1)
    # A task the fetch script finds is started by it; only one that comes by the pop has
    # a start step of its own (a loaded machine fetched first and the test saw no call).
    await eventually(pop_waiting(redis))
    task = await enqueue(queue)
    await eventually(status_is(queue, task, "completed"))
    record = await queue.status(task.id) or {}
    assert len(calls) == 2 and calls[0] == calls[1], "asked again with the same stamp"
    assert record["attempts"] == "1", "the replay charged no second attempt"
    assert float(record["duration_ms"]) < 0.5 * backoff_s(1) * 1000, record


@pytest_twisted.ensureDeferred
async def test_after_an_outage_an_entry_it_does_not_hold_goes_back_to_the_queue(
    consumers: Factory, queue: TaskQueue, redis: Any, keys: Keys, monkeypatch: Any
) -> None:
    """A failover without WAIT_REPLICAS can bring back the entry of a task whose
    acknowledgement the old primary answered (its record says processing): once a write
    had to be retried, the consumer gives back what it does not hold before it fetches."""
    real_complete = queue.complete
    failed: list[str] = []

    async def lost_once(*args: Any, **kwargs: Any) -> bool:
        if not failed:
            failed.append("once")
            raise RedisUnavailable("Redis did not answer within 2.0 s")
        return await real_complete(*args, **kwargs)

    monkeypatch.setattr(queue, "complete", lost_once)
    seen: list[str] = []
    service = consumers(lambda task: seen.append(task["id"]), concurrency=1)
    ghost = Task.new("ghost", None, now=reactor.seconds())
    await redis.lpush(keys.processing(service.consumer_ids[0]), ghost.to_json())
    await redis.hset(keys.status(ghost.id), "status", "processing")
    trigger = await enqueue(queue)
    await eventually(status_is(queue, trigger, "completed"))
    await eventually(status_is(queue, ghost, "completed"))
    assert failed and seen.count(ghost.id) == 1, seen
