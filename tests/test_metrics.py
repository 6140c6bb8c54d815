"""Counting in process and flushing to Redis: the field encoding, the Tally, the flush script."""

from __future__ import annotations

import itertools
import json
import os
import socket
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
import treq
import valkey
from test_web import Connection, fake_api
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent

from conftest import RunningServer, connect_raw, eventually, unused_port
from harness import Twistd, alive, wait_for
from taskserver import metrics
from taskserver.cluster.listener import bind_listener
from taskserver.cluster.master import Master
from taskserver.config import RateTier, RedisAddress, Settings
from taskserver.consumer import ConsumerService
from taskserver.keys import Keys
from taskserver.metrics import (
    ADD_METRICS,
    BUCKET_LABELS,
    DURATION_BUCKETS,
    Histogram,
    MetricsFlusher,
    Tally,
    field,
    route_label,
    worker_entry,
)
from taskserver.queue import Batch, Reclaimed, TaskQueue
from taskserver.redisclient import RedisUnavailable
from taskserver.task import Task
from taskserver.tasklog import TaskLog

# ------------------------------------------------------------------ pure logic


def test_a_field_is_the_name_and_its_labels_sorted() -> None:
    assert field("tasks_enqueued") == "tasks_enqueued"
    assert field("http_requests", {"route": "/healthz", "code": "200"}) == (
        "http_requests|code=200|route=/healthz"
    )
    assert field("rate_limited", [("tier", "1/1s")]) == "rate_limited|tier=1/1s"


@pytest.mark.parametrize(
    ("path", "label"),
    [
        (b"/api/v1/task", "/api/v1/task"),
        (b"/api/v1/task/0123456789abcdef0123456789abcdef", "/api/v1/task/{task_id}"),
        (b"/api/v1/task/not-an-id", "/api/v1/task/{task_id}"),
        (b"/api/v1/tasks", "/api/v1/tasks"),
        (b"/api/v1/task/", "other"),
        (b"/api/v1/task/a/b", "other"),
        (b"/healthz", "/healthz"),
        (b"/readyz", "/readyz"),
        (b"/kill", "/kill"),
        (b"/metrics", "/metrics"),
        (b"/openapi.json", "/openapi.json"),
        (b"/", "/"),
        (b"/dashboard", "/dashboard"),
        (b"/dashboard/static/dashboard.js", "/dashboard"),
        (b"/dashboard/api/dead/x/requeue", "/dashboard"),
        (b"/dashboardx", "other"),
        (b"/nothing/here", "other"),
        (b"//healthz", "other"),
        ("/healthz", "/healthz"),
    ],
)
def test_route_labels_are_a_bounded_set(path: bytes | str, label: str) -> None:
    assert route_label(b"GET", path) == label


def test_the_bucket_bounds_are_written_as_python_floats_then_inf() -> None:
    assert BUCKET_LABELS[0] == "0.001" and BUCKET_LABELS[9] == "1.0"
    assert BUCKET_LABELS[-1] == "+Inf" and len(BUCKET_LABELS) == len(DURATION_BUCKETS) + 1


def test_a_histogram_counts_each_observation_in_its_own_bucket_only() -> None:
    histogram = Histogram("task_duration_seconds")
    for seconds in (0.001, 0.0011, 0.0025, 1.0, 300.0, 300.5, -2.0):
        histogram.observe(seconds)
    taken: dict[str, int] = {}
    histogram.take(taken)
    assert taken == {
        # previous bound < v <= bound; a negative one (two hosts' clocks) counts as 0
        "task_duration_seconds_bucket|le=0.001": 2,
        "task_duration_seconds_bucket|le=0.0025": 2,
        "task_duration_seconds_bucket|le=1.0": 1,
        "task_duration_seconds_bucket|le=300.0": 1,
        "task_duration_seconds_bucket|le=+Inf": 1,
        "task_duration_seconds_count": 7,
        "task_duration_seconds_sum_us": 1000 + 1100 + 2500 + 1_000_000 + 300_000_000 + 300_500_000,
    }
    again: dict[str, int] = {}
    histogram.take(again)
    assert again == {}, "taken means reset"


def test_a_tally_hands_over_its_counts_once() -> None:
    tally = Tally()
    assert not tally.has_counts()
    tally.count("tasks_enqueued")
    tally.count("tasks_enqueued", 2)
    tally.rate_limited("1/1s")
    tally.rate_limited("ip")
    tally.observe("task_wait_seconds", 0.02)
    for _ in range(3):
        tally.request("/api/v1/task", 202, 0.004)
    tally.request("other", 404, 0.0001)
    assert tally.has_counts()
    assert tally.take() == {
        "tasks_enqueued": 3,
        "rate_limited|tier=1/1s": 1,
        "rate_limited|tier=ip": 1,
        "task_wait_seconds_bucket|le=0.025": 1,
        "task_wait_seconds_count": 1,
        "task_wait_seconds_sum_us": 20_000,
        "http_requests|code=202|route=/api/v1/task": 3,
        "http_requests|code=404|route=other": 1,
        "http_request_duration_seconds_bucket|route=/api/v1/task|le=0.005": 3,
        "http_request_duration_seconds_count|route=/api/v1/task": 3,
        "http_request_duration_seconds_sum_us|route=/api/v1/task": 12_000,
        "http_request_duration_seconds_bucket|route=other|le=0.001": 1,
        "http_request_duration_seconds_count|route=other": 1,
        "http_request_duration_seconds_sum_us|route=other": 100,
    }
    assert not tally.has_counts() and tally.take() == {}


class RecordingRedis:
    """Answers EVALSHA with a Deferred the test fires: what the flusher sent, and when."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list[Any], Any]] = []

    def evalsha(self, sha1: str, keys: list[str], args: list[Any]) -> Any:
        from twisted.internet import defer

        answer: defer.Deferred[Any] = defer.Deferred()
        self.calls.append((keys, args, answer))
        return answer

    def deltas(self, n: int) -> dict[str, int]:
        args = self.calls[n][1]
        return {args[i]: args[i + 1] for i in range(7, len(args), 2)}

    def batch(self, n: int) -> int:
        """The number of the batch call ``n`` sent."""
        return int(self.calls[n][1][5])


def test_the_flusher_sends_once_a_second_and_never_two_at_once() -> None:
    clock, tally, redis = Clock(), Tally(), RecordingRedis()
    flusher = MetricsFlusher(tally, lambda: redis, Keys("p"), clock, 1.0)
    flusher.startService()
    tally.count("tasks_completed")
    clock.advance(0.99)
    assert redis.calls == []
    clock.advance(0.01)
    assert [redis.deltas(0)] == [{"tasks_completed": 1}]
    assert redis.calls[0][1][:2] == ["", ""], "the master's: no workers entry"
    tally.count("tasks_completed")
    clock.advance(0.5)
    redis.calls[0][2].callback(0)
    clock.advance(1.0)
    assert len(redis.calls) == 2 and redis.deltas(1) == {"tasks_completed": 1}
    redis.calls[1][2].callback(0)
    clock.advance(1.0)
    assert len(redis.calls) == 2, "nothing counted, no worker entry: no call"
    stopped = flusher.stopService()
    assert stopped.called


def test_a_failed_flush_is_sent_again_as_it_was_and_warns_once_per_window() -> None:
    """Redis may have applied a batch whose answer was lost: the same batch goes again."""
    clock, tally, redis = Clock(), Tally(), RecordingRedis()
    flusher = MetricsFlusher(tally, lambda: redis, Keys("p"), clock, 0.5)
    flusher.startService()
    with capturedLogs() as logged:
        for second in range(5):
            tally.count("tasks_enqueued")
            clock.advance(0.5)  # the deadline of the flush before: it fails
            clock.advance(0.5)  # the next flush
            assert redis.deltas(second) == {"tasks_enqueued": 1}
            assert redis.batch(second) == 1
            if second == 2:
                tally.count("tasks_dead")  # counted while a flush is on its way
        assert flusher.has_unsent()
        redis.calls[4][2].callback(0)
        assert len(redis.calls) == 6, "what was counted meanwhile goes right after, apart"
        assert redis.deltas(5) == {"tasks_enqueued": 4, "tasks_dead": 1}
        assert redis.batch(5) == 2
        redis.calls[5][2].callback(0)
    assert not flusher.has_unsent()
    warnings = [formatEvent(e) for e in logged if e["log_level"] == LogLevel.warn]
    assert warnings == [
        "could not add metrics to Redis (sent again next time): Redis did not answer within 0.5 s"
    ]
    flusher.stopService()


def test_a_stop_waits_for_a_flush_made_outside_the_loop() -> None:
    """The master flushes after a reclaim too; a stop lets that finish, then flushes last."""
    clock, tally, redis = Clock(), Tally(), RecordingRedis()
    flusher = MetricsFlusher(tally, lambda: redis, Keys("p"), clock, 2.0)
    flusher.startService()
    tally.count("worker_restarts")
    aside = defer.Deferred.fromCoroutine(flusher.flush())
    stopped = flusher.stopService()
    assert len(redis.calls) == 1 and not stopped.called, "the stop waits for that flush"
    redis.calls[0][2].errback(ConnectionError("pool closed"))
    assert aside.called
    assert len(redis.calls) == 2, "then the last flush sends the batch again"
    assert redis.deltas(1) == {"worker_restarts": 1} and redis.batch(1) == 1
    redis.calls[1][2].callback(0)
    assert stopped.called and not flusher.has_unsent()


def test_the_flusher_waits_while_it_has_no_connection() -> None:
    clock, tally = Clock(), Tally()
    connection: list[RecordingRedis] = []
    flusher = MetricsFlusher(
        tally, lambda: connection[0] if connection else None, Keys("p"), clock, 1.0
    )
    flusher.startService()
    tally.count("worker_restarts")
    clock.advance(3.0)
    assert flusher.has_unsent()
    connection.append(RecordingRedis())
    tally.count("worker_restarts")
    clock.advance(1.0)
    assert connection[0].deltas(0) == {"worker_restarts": 2}
    flusher.stopService()


def test_a_worker_entry_is_this_process() -> None:
    entry = worker_entry("abc-0-1", 1764630000.5, 2, 3, 4, 5)
    assert entry == {
        "process_id": "abc-0-1",
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started_at": 1764630000.5,
        "restarts": 2,
        "in_flight": 3,
        "connections": 4,
        "waiters": 5,
    }


# ------------------------------------------------------------------ the script, in Redis


def script_keys(keys: Keys, process: str = "test") -> list[str]:
    applied = f"{keys.metrics}:applied:{process}"
    return [keys.metrics, keys.workers, keys.metrics_history, keys.metrics_sampled, applied]


#: The script's batch numbers for :func:`add`'s callers that do not care.
_batches = itertools.count(1)


async def add(
    redis: Any,
    keys: Keys,
    deltas: dict[str, int],
    worker_id: str = "",
    entry: str = "",
    history: int = 180,
    batch: int | None = None,
) -> int:
    number = next(_batches) if batch is None else batch
    args: list[Any] = [worker_id, entry, history, 4900, 60_000, number, 3_600_000]
    for name, n in deltas.items():
        args += [name, n]
    return int(await ADD_METRICS(redis, script_keys(keys), args))


async def redis_ms(redis: Any) -> int:
    seconds, micros = await redis.execute_command("TIME")
    return int(seconds) * 1000 + int(micros) // 1000


@pytest_twisted.ensureDeferred
async def test_the_script_adds_deltas_to_the_totals(redis: Any, keys: Keys) -> None:
    await add(redis, keys, {"tasks_enqueued": 3, "http_requests|code=202|route=/api/v1/task": 3})
    await add(redis, keys, {"tasks_enqueued": 2, "tasks_completed": 5})
    assert await redis.hgetall(keys.metrics) == {
        "tasks_enqueued": "5",
        "tasks_completed": "5",
        "http_requests|code=202|route=/api/v1/task": "3",
    }


@pytest_twisted.ensureDeferred
async def test_the_script_applies_each_batch_of_a_process_once(redis: Any, keys: Keys) -> None:
    await add(redis, keys, {"tasks_completed": 10}, batch=1)
    await add(redis, keys, {"tasks_completed": 10}, batch=1)  # its answer was lost: again
    await add(redis, keys, {"tasks_completed": 1}, batch=2)
    assert await redis.hget(keys.metrics, "tasks_completed") == "11"
    ttl = await redis.execute_command("PTTL", script_keys(keys)[4])
    assert 0 < ttl <= metrics.APPLIED_FORGOTTEN_AFTER_MS, "a dead process's number goes"


@pytest_twisted.ensureDeferred
async def test_the_script_writes_the_worker_entry_with_redis_time(redis: Any, keys: Keys) -> None:
    before = await redis_ms(redis)
    entry = worker_entry("w-0-0", 1764630000.25, 1, 2, 3, 4)
    assert (entry["in_flight"], entry["connections"], entry["waiters"]) == (2, 3, 4)
    await add(redis, keys, {}, "w-0-0", json.dumps(entry))
    after = await redis_ms(redis)
    stored = json.loads((await redis.hgetall(keys.workers))["w-0-0"])
    assert before <= stored.pop("seen_at") <= after
    assert stored == entry
    await add(redis, keys, {"tasks_completed": 1}, "w-0-0", "")  # a clean stop
    assert await redis.hgetall(keys.workers) == {}
    assert await redis.hget(keys.metrics, "tasks_completed") == "1"


@pytest_twisted.ensureDeferred
async def test_the_script_forgets_workers_not_seen_for_a_minute(redis: Any, keys: Keys) -> None:
    now = await redis_ms(redis)
    await redis.hset(keys.workers, "dead", json.dumps({"seen_at": now - 61_000}))
    await redis.hset(keys.workers, "quiet", json.dumps({"seen_at": now - 30_000}))
    await redis.hset(keys.workers, "garbage", "not json")
    await add(redis, keys, {}, "me", json.dumps({"pid": 1}))
    assert sorted(await redis.hkeys(keys.workers)) == ["me", "quiet"]


@pytest_twisted.ensureDeferred
async def test_the_script_samples_task_totals_once_per_period(redis: Any, keys: Keys) -> None:
    assert await add(redis, keys, {}) == 1, "the first flush finds no marker"
    assert json.loads(await redis.lindex(keys.metrics_history, 0))["c"] == {}
    deltas = {
        "tasks_completed": 4,
        "rate_limited|tier=ip": 2,
        "task_wait_seconds_count": 4,
        "task_duration_seconds_bucket|le=0.001": 4,
        "http_requests|code=202|route=/api/v1/task": 4,
        "worker_restarts": 1,
    }
    assert await add(redis, keys, deltas) == 0, "within the period: no sample"
    ttl_ms = int(await redis.execute_command("PTTL", keys.metrics_sampled))
    assert 0 < ttl_ms <= 4900
    await redis.delete(keys.metrics_sampled)  # the period is over
    before = await redis_ms(redis)
    assert await add(redis, keys, {"tasks_completed": 1}) == 1
    newest = json.loads(await redis.lindex(keys.metrics_history, 0))
    assert before <= newest["t"] <= await redis_ms(redis)
    assert newest["c"] == {
        "tasks_completed": 5,  # after this flush's increments
        "rate_limited|tier=ip": 2,
        "task_wait_seconds_count": 4,
        "task_duration_seconds_bucket|le=0.001": 4,
    }
    assert await redis.llen(keys.metrics_history) == 2


@pytest_twisted.ensureDeferred
async def test_the_history_is_capped(redis: Any, keys: Keys) -> None:
    for n in range(5):
        await redis.delete(keys.metrics_sampled)
        await add(redis, keys, {"tasks_enqueued": 1}, history=3)
        assert await redis.llen(keys.metrics_history) == min(n + 1, 3)
    newest_first = [
        json.loads(entry)["c"]["tasks_enqueued"]
        for entry in await redis.lrange(keys.metrics_history, 0, -1)
    ]
    assert newest_first == [5, 4, 3]


# ------------------------------------------------------------------ the flusher, in Redis


@pytest_twisted.ensureDeferred
async def test_a_flush_that_failed_is_sent_with_the_next(
    redis: Any, keys: Keys, redis_server: RedisAddress
) -> None:
    """Redis away (nothing listens on the port): the deltas wait; then they all arrive once."""
    nowhere = connect_raw(RedisAddress("127.0.0.1", unused_port()), poolsize=1)
    target = [nowhere]
    tally = Tally()
    flusher = MetricsFlusher(tally, lambda: target[0], keys, reactor, 0.2)
    tally.count("tasks_enqueued", 2)
    with capturedLogs() as logged:
        assert not await flusher.flush()
    assert [e for e in logged if e["log_level"] == LogLevel.warn], "the failure is logged"
    assert await redis.hgetall(keys.metrics) == {}
    tally.count("tasks_enqueued")
    target[0] = redis
    assert await flusher.flush()
    assert await redis.hgetall(keys.metrics) == {"tasks_enqueued": "3"}
    assert await flusher.flush() and await redis.hgetall(keys.metrics) == {"tasks_enqueued": "3"}
    await nowhere.disconnect()


@pytest_twisted.ensureDeferred
async def test_a_batch_applied_after_its_deadline_is_not_counted_again(
    redis: Any, keys: Keys, redis_server: RedisAddress
) -> None:
    """The flush gives up waiting, Redis runs it later anyway; the re-sent batch is skipped."""
    flushing = connect_raw(redis_server, poolsize=1)
    await flushing.ping()
    tally = Tally()
    flusher = MetricsFlusher(tally, lambda: flushing, keys, reactor, 0.2)
    tally.count("tasks_enqueued")
    assert await flusher.flush()  # the script is loaded now
    tally.count("tasks_completed", 10)
    # A slow reply ahead of ours on the one connection: the flush's answer comes too late.
    slow = flushing.execute_command("BLPOP", keys.metrics + ":nothing", "0.5")
    assert not await flusher.flush()
    await slow

    async def applied() -> bool:
        return await redis.hget(keys.metrics, "tasks_completed") == "10"

    await eventually(applied)
    assert await flusher.flush()
    assert await redis.hget(keys.metrics, "tasks_completed") == "10"
    await flushing.disconnect()


@pytest_twisted.ensureDeferred
async def test_a_child_s_flusher_keeps_its_entry_fresh_and_removes_it_at_a_stop(
    redis: Any, keys: Keys
) -> None:
    clock, tally = Clock(), Tally()
    in_flight = [0]
    flusher = MetricsFlusher(
        tally,
        lambda: redis,
        keys,
        clock,
        1.0,
        worker_id="w-1-0",
        worker=lambda: worker_entry("w-1-0", 1.0, 0, in_flight[0], 0, 0),
    )
    flusher.startService()
    tally.count("tasks_completed")
    clock.advance(1.0)

    async def entry() -> dict[str, Any] | None:
        raw = await redis.hget(keys.workers, "w-1-0")
        return json.loads(raw) if raw else None

    first = await eventually(entry)
    assert first["in_flight"] == 0
    in_flight[0] = 2

    async def updated() -> bool:
        # A flush is due each second of the Clock; one whose reply is still on its way when
        # the Clock moves is followed at the next whole second, so move it on each look.
        clock.advance(1.0)
        now = await entry()
        return now is not None and now["in_flight"] == 2

    await eventually(updated)
    await flusher.stopService()
    assert await entry() is None
    assert await redis.hget(keys.metrics, "tasks_completed") == "1"


def test_the_flush_script_is_loaded_with_its_snippet() -> None:
    assert metrics.ADD_METRICS.source.count("local function now_ms()") == 1


# ------------------------------------------------------------------ what the server counts


def request_counts(tally: Tally) -> dict[str, int]:
    return {name: n for name, n in tally.take().items() if name.startswith("http_requests")}


def test_a_request_is_timed_from_its_headers_to_its_answer() -> None:
    clock = Clock()
    api, queue, _ = fake_api(clock=clock)
    connection = Connection(api, clock)
    queue.pending_status = defer.Deferred()
    connection.send(b"GET /api/v1/task/" + b"a" * 32 + b" HTTP/1.1\r\nHost: x\r\n")
    clock.advance(5.0)  # before its headers were complete: not counted
    connection.send(b"\r\n")
    clock.advance(0.3)
    queue.pending_status.callback(None)
    assert connection.transport.value().startswith(b"HTTP/1.1 404 Not Found")
    assert api.tally.take() == {
        "http_requests|code=404|route=/api/v1/task/{task_id}": 1,
        "http_request_duration_seconds_bucket|route=/api/v1/task/{task_id}|le=0.5": 1,
        "http_request_duration_seconds_count|route=/api/v1/task/{task_id}": 1,
        "http_request_duration_seconds_sum_us|route=/api/v1/task/{task_id}": 300_000,
    }


def test_every_answer_is_counted_once_on_its_route() -> None:
    clock = Clock()
    api, _, _ = fake_api(clock=clock)
    connection = Connection(api, clock)
    post = b"POST /api/v1/task HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    body = b'{"user_id": "u"}'
    connection.send(post + b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    connection.send(
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    connection.send(b"PUT /api/v1/task HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    connection.send(b"GET /dashboard/static/x.js HTTP/1.1\r\nHost: x\r\n\r\n")
    assert connection.transport.value().count(b"HTTP/1.1 ") == 5
    counts = api.tally.take()
    requests = {name: n for name, n in counts.items() if name.startswith("http_requests")}
    [dashboard] = [name for name in requests if name.endswith("|route=/dashboard")]
    assert requests.pop(dashboard) == 1  # its code is the dashboard's business
    assert requests == {
        "http_requests|code=202|route=/api/v1/task": 1,
        "http_requests|code=405|route=/api/v1/task": 1,
        "http_requests|code=200|route=/healthz": 1,
        "http_requests|code=404|route=other": 1,
    }
    assert counts["tasks_enqueued"] == 1
    assert counts["http_request_duration_seconds_count|route=/api/v1/task"] == 2


def test_the_channel_s_own_answers_count_as_other() -> None:
    clock = Clock()
    api, _, _ = fake_api(clock=clock)
    Connection(api, clock).send(b"NOT HTTP AT ALL\r\n\r\n")
    slow = Connection(api, clock, request_timeout_s=5.0)
    slow.send(b"POST /api/v1/task HTTP/1.1\r\nHost: x\r\n")
    clock.advance(5.0)
    assert api.tally.take() == {
        "http_requests|code=400|route=other": 1,
        "http_requests|code=408|route=other": 1,
    }


def test_a_request_whose_client_went_away_counts_once_as_499() -> None:
    clock = Clock()
    api, queue, _ = fake_api(clock=clock)
    connection = Connection(api, clock)
    queue.pending_status = defer.Deferred()  # the answer never comes
    connection.send(b"GET /api/v1/task/" + b"a" * 32 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    clock.advance(5.0)
    connection.close()
    assert api.tally.take() == {
        "http_requests|code=499|route=/api/v1/task/{task_id}": 1,
        "http_request_duration_seconds_bucket|route=/api/v1/task/{task_id}|le=5.0": 1,
        "http_request_duration_seconds_count|route=/api/v1/task/{task_id}": 1,
        "http_request_duration_seconds_sum_us|route=/api/v1/task/{task_id}": 5_000_000,
    }
    answered = Connection(api, clock)
    answered.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\n")
    answered.close()  # the second one's headers never all arrived: no route, not counted
    assert request_counts(api.tally) == {"http_requests|code=200|route=/healthz": 1}


def test_a_client_gone_in_the_middle_of_its_body_counts_as_other_and_its_connection_closes() -> (
    None
):
    """twisted.web sets a request's path only once its body is in: until then it has no route."""
    clock = Clock()
    api, _, _ = fake_api(clock=clock)
    connection = Connection(api, clock)
    closed: list[bool] = []
    connection.site.on_close = lambda: closed.append(True)
    connection.send(b'POST /api/v1/task HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"u')
    assert connection.site.channels == {connection.channel}
    clock.advance(1.0)
    connection.close()
    assert connection.site.channels == set() and closed == [True]
    assert request_counts(api.tally) == {"http_requests|code=499|route=other": 1}


@pytest_twisted.ensureDeferred
async def test_the_master_flushes_a_restart_counted_while_redis_was_down(
    settings: Settings, redis: Any, keys: Keys, redis_server: RedisAddress
) -> None:
    """No second death needed: the master opens its pool for counts once Redis is back."""
    listener = bind_listener("127.0.0.1", 0)
    master = Master(settings, listener, reactor)
    master.redis = redis_server
    master.running = True  # as started, without its children and embedded Redis
    try:
        master._redis_down()
        master.tally.count("worker_restarts")  # a child restarted while Redis was away
        assert not await master._metrics.flush()
        master._redis_back()
        assert await master._metrics.flush()
        assert await redis.hget(keys.metrics, "worker_restarts") == "1"
        assert master._pool is None, "closed again: no standing pool"
    finally:
        master.running = False
        await master._close_pool()
        listener.close()


class UnmarkableQueue:
    """One task, fetched by the blocking pop; marking it started fails once (Redis away)."""

    def __init__(self, raw: str) -> None:
        self.keys = Keys("unmarkable")
        self.raw: str | None = raw
        self.completed: list[str] = []
        self.marks = 0

    async def heartbeat(self, *args: Any) -> None:
        pass

    async def reap(self, own_process_id: str) -> Reclaimed:
        return Reclaimed(0, 0)

    async def promote(self) -> None:
        pass

    async def fetch_batch(self, *args: Any, **kwargs: Any) -> Batch:
        return Batch([])

    async def fetch(self, *args: Any) -> str | None:
        raw, self.raw = self.raw, None
        if raw is None:
            await defer.Deferred()  # nothing more: waits, as an empty queue
        return raw

    async def mark_started(self, task: Task, started_at: str) -> int:
        self.marks += 1
        if self.marks == 1:
            raise RedisUnavailable("Redis did not answer within 1.0 s")
        return 1

    async def complete(self, consumer_id: str, raw: str, *args: Any) -> bool:
        self.completed.append(raw)
        return True


def test_a_start_step_that_failed_is_asked_again_and_its_answer_observed() -> None:
    """No guess from the task's text: the attempt number (and so the wait) is Redis's answer."""
    clock, tally = Clock(), Tally()
    raw = Task.new("u", {}, 0.0).to_json()
    queue = UnmarkableQueue(raw)
    consumer = ConsumerService(
        queue=queue,  # type: ignore[arg-type]
        blocking_redis=None,
        handler=lambda task: None,
        task_log=TaskLog(lambda line: None, 1),
        concurrency=1,
        heartbeat_ttl_s=10.0,
        shutdown_timeout_s=1.0,
        clock=clock,
        tally=tally,
    )
    with capturedLogs():
        consumer.startService()
        clock.advance(0.1)
    assert (queue.completed, queue.marks) == ([raw], 2)
    counts = tally.take()
    assert counts.get("tasks_completed") == 1
    assert counts["task_wait_seconds_count"] == 1
    assert counts["task_duration_seconds_count"] == 1


async def metrics_hash(redis: Any, keys: Keys) -> dict[str, int]:
    return {name: int(n) for name, n in (await redis.hgetall(keys.metrics)).items()}


def has(expected: dict[str, int]) -> Any:
    """A check for ``eventually``: the totals include ``expected``."""

    async def check(redis: Any, keys: Keys) -> dict[str, int] | None:
        totals = await metrics_hash(redis, keys)
        return totals if all(totals.get(k) == v for k, v in expected.items()) else None

    return check


@pytest_twisted.ensureDeferred
async def test_a_child_counts_admissions_refusals_and_outcomes(
    start_server: Callable[..., RunningServer], redis: Any, keys: Keys
) -> None:
    """Through a real child: 3 tasks of 3 users, a 429 per tier that refuses, and their runs."""
    server = start_server()
    first_tier = server.settings.rate_limits[0].name
    for n in range(3):
        assert (await post_task(server, f"user-{n}")).code == 202
    assert (await post_task(server, "user-0")).code == 429  # the second within 1 s
    totals = await eventually(lambda: has({"tasks_enqueued": 3, "tasks_completed": 3})(redis, keys))
    assert totals[f"rate_limited|tier={first_tier}"] == 1
    assert totals["http_requests|code=202|route=/api/v1/task"] == 3
    assert totals["http_requests|code=429|route=/api/v1/task"] == 1
    assert totals["task_duration_seconds_count"] == 3
    assert totals["task_wait_seconds_count"] == 3
    assert "tasks_failed" not in totals and "tasks_dead" not in totals
    entries = await redis.hgetall(keys.workers)
    assert list(entries) == [server.child.consumers.process_id]  # type: ignore[union-attr]
    entry = json.loads(next(iter(entries.values())))
    assert entry["pid"] == os.getpid() and entry["restarts"] == 0
    assert entry["in_flight"] == 0 and entry["host"] == socket.gethostname()
    assert entry["waiters"] == 0
    await server.stop()
    assert await redis.hgetall(keys.workers) == {}, "a clean stop removes its entry"


@pytest_twisted.ensureDeferred
async def test_failed_attempts_count_as_retried_then_dead(
    start_server: Callable[..., RunningServer], redis: Any, keys: Keys
) -> None:
    def fail(task: dict[str, Any]) -> None:
        raise RuntimeError("no")

    server = start_server(handler=fail, max_attempts=2, retry_backoff_s=0.01)
    assert (await post_task(server, "doomed")).code == 202
    totals = await eventually(
        lambda: has({"tasks_failed": 2, "tasks_retried": 1, "tasks_dead": 1})(redis, keys)
    )
    assert totals["task_duration_seconds_count"] == 2, "every attempt"
    assert totals["task_wait_seconds_count"] == 1, "the first start only"
    assert "tasks_completed" not in totals


@pytest_twisted.ensureDeferred
async def test_a_refusal_by_the_per_address_tier_counts_as_ip(
    start_server: Callable[..., RunningServer], redis: Any, keys: Keys
) -> None:
    server = start_server(ip_rate_limits=(RateTier("ip-60s", 1, 60_000),))
    assert (await post_task(server, "a")).code == 202
    assert (await post_task(server, "b")).code == 429
    totals = await eventually(lambda: has({"rate_limited|tier=ip": 1})(redis, keys))
    assert not [name for name in totals if name.startswith("rate_limited|tier=1")]


@pytest_twisted.ensureDeferred
async def test_what_the_reaper_gives_back_counts_as_reclaimed(
    start_server: Callable[..., RunningServer], redis: Any, keys: Keys
) -> None:
    """A process died holding two tasks: the child's reaper returns them, and they run."""
    queue = TaskQueue(redis, keys, status_ttl_s=3600, timeout_s=2.0, clock=reactor)
    dead = "otherhost:999:dead00"
    await queue.heartbeat(dead, [f"{dead}#0"], ttl_s=0.3)
    for n in range(2):
        await queue.enqueue(Task.new(f"victim-{n}", None, now=reactor.seconds()))
        assert await queue.fetch(redis, keys.pending, keys.processing(f"{dead}#0"), 1)
    start_server()
    totals = await eventually(
        lambda: has({"tasks_reclaimed": 2, "tasks_completed": 2})(redis, keys), timeout=30.0
    )
    assert "tasks_enqueued" not in totals, "enqueued by the queue itself, not through the API"


async def post_task(server: RunningServer, user_id: str) -> Any:
    response = await treq.post(
        server.url + "/api/v1/task",
        json={"user_id": user_id},
        headers={"Content-Type": "application/json"},
    )
    await response.content()
    return response


# ------------------------------------------------------------------ a real cluster


@pytest.mark.serial  # kills and counts under load
def test_a_cluster_s_totals_and_workers_are_in_redis(
    twistd: Callable[..., Twistd], redis_server: RedisAddress, keys: Keys
) -> None:
    """twistd with two children on the test Redis: the totals of 20 tasks add up, one fresh
    entry per child; a poison task kills a child twice: the master counts both restarts,
    its reclaim and the dead letter, and the new entries say how often their slot restarted."""
    client = valkey.Valkey(
        host=redis_server.host,
        port=redis_server.port,
        password=redis_server.password,
        decode_responses=True,
    )
    auth = f":{redis_server.password}@" if redis_server.password else ""
    server = twistd(
        WORKERS="2",
        REDIS_URL=f"redis://{auth}{redis_server.host}:{redis_server.port}/0",
        KEY_PREFIX=keys.prefix,
        TASK_HANDLER="sample_handlers:poison_or_slow",
        SLOW_HANDLER_S="0.01",
        MAX_ATTEMPTS="2",
    )
    pids = server.wait_until_ready(2)
    tasks = 20
    assert all(server.post_task(f"cluster-{n}") for n in range(tasks))

    def totals() -> dict[str, int]:
        return {name: int(n) for name, n in client.hgetall(keys.metrics).items()}

    def counted(wanted: dict[str, int]) -> dict[str, int] | None:
        now = totals()
        return now if all(now.get(name) == n for name, n in wanted.items()) else None

    first = wait_for(
        lambda: counted(
            {
                "tasks_enqueued": tasks,
                "tasks_completed": tasks,
                "http_requests|code=202|route=/api/v1/task": tasks,
            }
        ),
        timeout=30.0,
        what="the totals of 20 tasks",
    )
    assert first["task_duration_seconds_count"] == tasks
    assert "worker_restarts" not in first and "tasks_reclaimed" not in first

    def fresh_workers() -> list[dict[str, Any]]:
        seconds, micros = client.time()
        now_ms = seconds * 1000 + micros // 1000
        entries = [json.loads(raw) for raw in client.hgetall(keys.workers).values()]
        return [entry for entry in entries if now_ms - entry["seen_at"] < 10_000]

    def one_per_child(expected: list[int]) -> list[dict[str, Any]] | None:
        fresh = fresh_workers()
        return fresh if sorted(entry["pid"] for entry in fresh) == sorted(expected) else None

    entries = wait_for(lambda: one_per_child(pids), what="one fresh entry per child")
    assert {(entry["restarts"], entry["host"]) for entry in entries} == {(0, socket.gethostname())}

    def post_poison() -> bool:
        """The child that accepts it may run it and die before its 202 is out: the client
        retries with its Idempotency-Key (one task whatever the tries), as test_cluster does."""
        try:
            code, _ = server.request(
                "POST",
                "/api/v1/task",
                {"user_id": "p", "payload": {"poison": True}},
                {"Idempotency-Key": "poison-1"},
            )
        except OSError:
            return False
        return code in (200, 202)

    wait_for(post_poison, timeout=10.0, what="the poison task accepted")
    wait_for(
        lambda: counted({"worker_restarts": 2, "tasks_reclaimed": 1, "tasks_dead": 1}),
        timeout=30.0,
        what="two restarts, one reclaim, one dead letter",
    )
    ready = wait_for(lambda: len(server.ready_pids()) == 4 and server.ready_pids(), what="4")
    living = [pid for pid in ready if alive(pid)]
    killed = sorted(set(ready) - set(living))
    assert len(living) == len(killed) == 2
    entries = wait_for(lambda: one_per_child(living), timeout=20.0, what="the new entries")
    assert sum(entry["restarts"] for entry in entries) == 2
    assert server.stop() == 0
    left = sorted(json.loads(raw)["pid"] for raw in client.hgetall(keys.workers).values())
    assert left == killed, "clean stops remove their entries; the killed ones wait to expire"
    client.close()
