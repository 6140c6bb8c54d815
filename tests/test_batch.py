"""Batches: the envelope (pure), one ADMIT call for a whole batch (real Redis), the route."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from test_queue import script_calls
from twisted.internet import defer, reactor
from twisted.internet.task import Clock

from conftest import RunningServer
from harness import Twistd, wait_for, wait_until_logged
from taskserver.batch import BATCH_IDENTITY, batch_items, item_task_id
from taskserver.coalesce import MOST_PER_CALL, Coalescer
from taskserver.config import parse_rate_limits
from taskserver.httpserver import ApiError
from taskserver.idempotency import Claim, IdempotencyKeys, fingerprint
from taskserver.keys import Keys
from taskserver.queue import TaskQueue
from taskserver.ratelimit import RatePolicy
from taskserver.task import TASK_ID, Task, iso_utc

JSON = {"Content-Type": "application/json"}

# ------------------------------------------------------------------ the envelope


@pytest.mark.parametrize(
    ("document", "code"),
    [
        ([], "invalid_batch"),
        ("tasks", "invalid_batch"),
        ({}, "invalid_batch"),
        ({"tasks": {"user_id": "u"}}, "invalid_batch"),
        ({"tasks": [], "extra": 1}, "invalid_batch"),
        ({"tasks": []}, "empty_batch"),
        ({"tasks": [{}] * 4}, "batch_too_large"),
    ],
)
def test_a_bad_envelope_is_a_400_with_its_own_code(document: Any, code: str) -> None:
    with pytest.raises(ApiError) as raised:
        batch_items(document, most=3)
    assert (raised.value.status, raised.value.code) == (400, code)


def test_items_are_returned_as_they_are_bad_ones_included() -> None:
    items = [{"user_id": "a"}, "not a task", {"user_id": "b"}]
    assert batch_items({"tasks": items}, most=3) == items


def test_item_ids_are_task_ids_derived_from_the_batch() -> None:
    ids = [item_task_id("b" * 32, i) for i in range(500)]
    assert all(TASK_ID.match(i) for i in ids) and len(set(ids)) == 500
    assert ids == [item_task_id("b" * 32, i) for i in range(500)], "deterministic"
    assert item_task_id("c" * 32, 0) != ids[0]


def test_submit_all_sends_more_than_most_in_one_call() -> None:
    clock, calls = Clock(), []

    def send(items: list[int]) -> defer.Deferred[list[int]]:
        calls.append(items)
        return defer.succeed([n * 10 for n in items])

    coalescer: Coalescer[int, int] = Coalescer(send, clock)
    before = coalescer.submit(-1)
    answers = coalescer.submit_all(list(range(MOST_PER_CALL + 50)))
    clock.advance(0)
    assert calls == [[-1, *range(MOST_PER_CALL + 50)]], "one call, though over MOST_PER_CALL"
    assert before.result == -10
    assert answers.result == [n * 10 for n in range(MOST_PER_CALL + 50)], "one list, in order"


def test_a_cancelled_submit_all_is_left_out_and_a_failure_fails_it_whole() -> None:
    clock, calls = Clock(), []
    failing = False

    def send(items: list[int]) -> defer.Deferred[list[int]]:
        calls.append(items)
        return defer.fail(RuntimeError("down")) if failing else defer.succeed(items)

    coalescer: Coalescer[int, int] = Coalescer(send, clock)
    gone, kept = coalescer.submit_all([1, 2]), coalescer.submit_all([3])
    gone.addErrback(lambda f: f.trap(defer.CancelledError))
    gone.cancel()
    clock.advance(0)
    assert calls == [[3]] and kept.result == [3], "the cancelled batch never left"
    failing = True
    failed = coalescer.submit_all([4, 5])
    clock.advance(0)
    assert isinstance(failed.result.value, RuntimeError)
    failed.addErrback(lambda f: None)


# ------------------------------------------------------------------ one call in Redis


@pytest_twisted.ensureDeferred
async def test_a_batch_of_500_is_one_admit_call_charging_each_user(redis: Any, keys: Keys) -> None:
    queue = TaskQueue(redis, keys, status_ttl_s=60, timeout_s=2.0, clock=reactor)
    policy = RatePolicy(keys, parse_rate_limits("1/60s"))
    tasks = [(Task.new(f"batch-user-{n % 499}", n, reactor.seconds()), 0, "") for n in range(500)]
    later = iso_utc(reactor.seconds() + 60)
    tasks[7] = (Task.new("batch-user-late", 7, reactor.seconds(), run_at=later), 60_000, later)
    await queue.admit_all([(Task.new("batch-warm", 0, reactor.seconds()), 0, "")], policy)
    before = await script_calls(redis)  # after the script is loaded (EVALSHA, not EVAL)
    decisions, durable = await queue.admit_all(tasks, policy)
    assert await script_calls(redis) - before == 1, "the whole batch in one script call"
    assert durable
    # users 0 and 499 % 499 == 0: the second is refused by user 0's own limit
    assert [d.allowed for d in decisions].count(False) == 1 and not decisions[499].allowed
    assert await queue.status(tasks[0][0].id) is not None
    assert (await queue.status(tasks[7][0].id) or {})["status"] == "scheduled"
    assert await queue.status(tasks[499][0].id) is None
    assert await redis.llen(keys.pending) >= 498


# ------------------------------------------------------------------ the route


async def post_batch(
    server: RunningServer, document: Any, headers: dict[str, str] | None = None
) -> tuple[Any, Any]:
    body = document if isinstance(document, bytes) else json.dumps(document).encode()
    response = await treq.post(
        server.url + "/api/v1/tasks", data=body, headers={**JSON, **(headers or {})}
    )
    return response, json.loads(await response.content())


@pytest.fixture
def server(start_server: Callable[..., RunningServer]) -> RunningServer:
    return start_server()


@pytest_twisted.ensureDeferred
async def test_results_come_in_the_items_order(server: RunningServer) -> None:
    items = [
        {"user_id": "r-a", "payload": 1},
        {"user_id": "r-a", "payload": 2},  # the same user in the same second: 429
        {"user_id": ""},
        {"user_id": "r-b", "delay_s": 60},
        "nope",
    ]
    response, answer = await post_batch(server, {"tasks": items})
    assert response.code == 200, answer
    results = answer["results"]
    assert [r["status"] for r in results] == [202, 429, 400, 202, 400]
    assert set(results[0]["task"]) == {"task_id", "user_id", "status", "queued_at"}
    assert results[0]["task"]["user_id"] == "r-a" and results[0]["task"]["status"] == "queued"
    assert results[1]["error"] == "rate_limited" and results[1]["retry_after_s"] >= 1
    assert results[2]["error"] == "invalid_user_id" and results[2]["message"]
    assert results[3]["task"]["status"] == "scheduled" and results[3]["task"]["run_at"]
    assert results[4]["error"] == "not_an_object"
    record = await treq.get(server.url + f"/api/v1/task/{results[0]['task']['task_id']}")
    assert record.code == 200


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{", 400, "invalid_json"),
        (b"[]", 400, "invalid_batch"),
        (b'{"tasks": 1}', 400, "invalid_batch"),
        (b'{"tasks": []}', 400, "empty_batch"),
        (json.dumps({"tasks": [{"user_id": "u"}] * 501}).encode(), 400, "batch_too_large"),
        (b'{"tasks": ["' + b"x" * (1024 * 1024) + b'"]}', 413, "body_too_large"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_bad_batch_is_refused_whole(
    server: RunningServer, body: bytes, status: int, code: str
) -> None:
    response, answer = await post_batch(server, body)
    assert (response.code, answer["error"]) == (status, code)


@pytest_twisted.ensureDeferred
async def test_a_batch_may_be_larger_than_a_single_post(server: RunningServer) -> None:
    big = {"tasks": [{"user_id": f"big-{n}", "payload": "y" * 1000} for n in range(200)]}
    response, answer = await post_batch(server, big)
    assert response.code == 200 and len(answer["results"]) == 200
    single = await treq.post(
        server.url + "/api/v1/task",
        data=json.dumps({"user_id": "big", "payload": "y" * 100_000}).encode(),
        headers=JSON,
    )
    assert single.code == 413, "the single route keeps its own cap"


@pytest_twisted.ensureDeferred
async def test_an_idempotency_key_covers_the_batch(server: RunningServer) -> None:
    document = {"tasks": [{"user_id": "idem-a"}, {"user_id": "idem-a"}, {"user_id": "idem-b"}]}
    key = {"Idempotency-Key": "batch-key-1"}
    first, answer = await post_batch(server, document, key)
    assert first.code == 200 and [r["status"] for r in answer["results"]] == [202, 429, 202]
    again, replayed = await post_batch(server, document, key)
    assert again.code == 200 and replayed == answer, "the same answer, the same task ids"
    assert again.headers.getRawHeaders("Idempotent-Replayed") == ["true"]
    other, refused = await post_batch(server, {"tasks": [{"user_id": "idem-c"}]}, key)
    assert (other.code, refused["error"]) == (422, "idempotency_key_reused")


@pytest_twisted.ensureDeferred
async def test_a_batch_whose_first_request_is_in_flight_is_409(
    server: RunningServer, redis: Any, keys: Keys
) -> None:
    """A claim without its answer yet: the first request is still being handled."""
    document = {"tasks": [{"user_id": "inflight"}]}
    claims = IdempotencyKeys(redis, keys, 2.0, reactor, server.settings.status_ttl_s)
    claim = Claim("f" * 32, fingerprint(BATCH_IDENTITY, document), "2026-12-07T00:00:00.000Z")
    assert await claims.claim(BATCH_IDENTITY, "in-flight", claim) is None
    response, answer = await post_batch(server, document, {"Idempotency-Key": "in-flight"})
    assert (response.code, answer["error"]) == (409, "idempotency_key_in_use")
    assert response.headers.getRawHeaders("Retry-After") == ["1"]


@pytest_twisted.ensureDeferred
async def test_an_abandoned_batch_claim_is_taken_over(
    server: RunningServer, redis: Any, keys: Keys
) -> None:
    """A claim whose request died before its answer (old by its TTL): the retry admits."""
    document = {"tasks": [{"user_id": "abandoned"}]}
    claims = IdempotencyKeys(redis, keys, 2.0, reactor, 60)  # as if claimed long ago
    claim = Claim("e" * 32, fingerprint(BATCH_IDENTITY, document), "2026-12-07T00:00:00.000Z")
    assert await claims.claim(BATCH_IDENTITY, "abandoned", claim) is None
    response, answer = await post_batch(server, document, {"Idempotency-Key": "abandoned"})
    assert response.code == 200 and answer["results"][0]["status"] == 202, answer
    again, replayed = await post_batch(server, document, {"Idempotency-Key": "abandoned"})
    assert (again.code, replayed) == (200, answer)


@pytest_twisted.ensureDeferred
async def test_a_batch_whose_answer_was_lost_after_its_admission_is_not_admitted_again(
    server: RunningServer, redis: Any, keys: Keys
) -> None:
    """The first request's script ran, its answer never got stored (a hang-up, a late
    reply, a crash): a retry rebuilds the answer from the items' records."""
    document = {
        "tasks": [{"user_id": "lost-a", "payload": 1}, {"user_id": "lost-b"}, {"user_id": 7}]
    }
    batch_id = "c" * 32
    claims = IdempotencyKeys(redis, keys, 2.0, reactor, 60)  # as if claimed long ago
    claim = Claim(batch_id, fingerprint(BATCH_IDENTITY, document), "2026-12-07T00:00:00.000Z")
    assert await claims.claim(BATCH_IDENTITY, "lost", claim) is None
    queue = TaskQueue(redis, keys, status_ttl_s=60, timeout_s=2.0, clock=reactor)
    first = Task(item_task_id(batch_id, 0), "lost-a", 1, iso_utc(reactor.seconds()))
    await queue.enqueue(first)  # item 1 was refused by its user's limit: no record
    response, answer = await post_batch(server, document, {"Idempotency-Key": "lost"})
    assert response.code == 200 and response.headers.getRawHeaders("Idempotent-Replayed")
    results = answer["results"]
    assert [r["status"] for r in results] == [202, 429, 400], results
    assert results[0]["task"]["task_id"] == first.id, "the task that exists, not a second one"
    # The server's admissions list each task for its user (USER_TASKS_MAX); ours did not.
    for user in ("lost-a", "lost-b"):
        assert await redis.exists(keys.user_tasks(user)) == 0, f"{user}'s item admitted again"
    again, replayed = await post_batch(server, document, {"Idempotency-Key": "lost"})
    assert (again.code, replayed) == (200, answer), "the rebuilt answer is kept"


@pytest_twisted.ensureDeferred
async def test_redis_down_is_503_for_the_whole_batch(
    start_server: Callable[..., RunningServer],
) -> None:
    from taskserver.config import RedisAddress

    server = start_server(redis=RedisAddress("127.0.0.1", 1), redis_timeout_s=0.2)
    response, answer = await post_batch(server, {"tasks": [{"user_id": "down"}]})
    assert (response.code, answer["error"]) == (503, "redis_unavailable")


# ------------------------------------------------------------------ through twistd


def test_a_batch_through_the_real_cluster(twistd: Callable[..., Twistd], tmp_path: Path) -> None:
    """Mixed items (valid, invalid, rate-limited) through ``twistd -n taskserver``: results
    in order, the accepted ones run, a replay answers the same, a metric per item."""
    server = twistd(WORKERS="2")
    server.wait_until_ready(2)
    items: list[Any] = [
        {"user_id": "e2e-a", "payload": {"n": 0}},
        {"user_id": "e2e-a", "payload": {"n": 1}},  # 1/1s for e2e-a: 429
        {"user_id": "e2e-b", "payload": {"n": 2}, "extra": True},  # unknown_field
        {"user_id": "e2e-c", "payload": {"n": 3}},
        {"user_id": "e2e-d", "delay_s": 0.5},
        42,
    ]
    key = {"Idempotency-Key": "e2e-batch"}
    code, answer = server.request("POST", "/api/v1/tasks", {"tasks": items}, key)
    assert code == 200, answer
    results = answer["results"]
    assert [r["status"] for r in results] == [202, 429, 400, 202, 202, 400]
    assert results[1]["error"] == "rate_limited" and results[1]["retry_after_s"] >= 1
    assert [results[2]["error"], results[5]["error"]] == ["unknown_field", "not_an_object"]
    assert results[4]["task"]["status"] == "scheduled"
    accepted = {r["task"]["task_id"] for r in results if r["status"] == 202}
    assert len(accepted) == 3

    code, replayed = server.request("POST", "/api/v1/tasks", {"tasks": items}, key)
    assert (code, replayed) == (200, answer), "a replay: the same answer, the same ids"
    code, other = server.request("POST", "/api/v1/tasks", {"tasks": items[:1]}, key)
    assert (code, other["error"]) == (422, "idempotency_key_reused")

    counts = wait_until_logged(tmp_path / "logs", accepted)
    assert all(counts[task_id] == 1 for task_id in accepted), "each ran once, replay or not"
    for task_id in accepted:
        wait_for(lambda t=task_id: server.status_of(t) == "completed", what=f"{task_id} done")

    def counted() -> bool:  # each child adds its counts to Redis every few seconds
        metrics = urllib.request.urlopen(server.url + "/metrics", timeout=5).read().decode()
        enqueued = re.search(r"^taskserver_tasks_enqueued_total (\S+)", metrics, re.MULTILINE)
        refused = re.search(r'^taskserver_rate_limited_total\{tier="1s"\} (\S+)', metrics, re.M)
        return bool(enqueued and refused and (float(enqueued[1]), float(refused[1])) == (3, 1))

    wait_for(counted, what="3 enqueued and 1 refused in /metrics")
    code, too_many = server.request("POST", "/api/v1/tasks", {"tasks": [{"user_id": "x"}] * 501})
    assert (code, too_many["error"]) == (400, "batch_too_large")
    assert server.stop() == 0
