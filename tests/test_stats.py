"""read_stats against a real Redis with hand-written metric fields; the quantile math alone."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from conftest import unused_port
from taskserver.config import RedisAddress
from taskserver.keys import Keys
from taskserver.metrics import (
    DURATION_BUCKETS,
    TASK_WAIT,
    TASKS_COMPLETED,
    MetricsFlusher,
    Tally,
    worker_entry,
)
from taskserver.redisclient import connect
from taskserver.stats import (
    ClusterStats,
    Histogram,
    RedisPanel,
    RedisUnavailable,
    Sample,
    _age,
    address_label,
    parse_field,
    read_stats,
)
from taskserver.task import Task, iso_utc

# ------------------------------------------------------------------ the quantile math


def histogram(bounds: tuple[float, ...], counts: tuple[int, ...], sum_s: float = 0.0) -> Histogram:
    return Histogram((*bounds, math.inf), counts, sum_s)


def test_quantiles_interpolate_inside_the_bucket_the_rank_falls_in() -> None:
    h = histogram((1.0, 2.0, 4.0), (1, 2, 1, 0))  # cumulative 1, 3, 4, 4
    assert h.quantile(0.5) == pytest.approx(1.5)  # rank 2: half-way through (1, 2]
    assert h.quantile(0.95) == pytest.approx(3.6)  # rank 3.8: 0.8 of the way through (2, 4]
    assert h.quantile(0.25) == pytest.approx(1.0)  # rank 1: the top of the first bucket


def test_the_first_bucket_starts_at_zero() -> None:
    assert histogram((1.0, 2.0), (4, 0, 0)).quantile(0.5) == pytest.approx(0.5)


def test_a_rank_in_the_inf_bucket_gives_the_largest_finite_bound() -> None:
    assert histogram((1.0, 2.0, 4.0), (1, 0, 0, 5)).quantile(0.5) == 4.0


def test_quantile_0_with_an_empty_first_bucket_is_its_start() -> None:
    assert histogram((1.0, 2.0), (0, 3, 0)).quantile(0) == 0.0


def test_an_empty_histogram_has_no_quantile() -> None:
    assert histogram((1.0,), (0, 0)).quantile(0.5) is None


def test_cumulative_counts_add_up_the_buckets() -> None:
    h = histogram((0.1, 1.0), (3, 0, 2), 1.5)
    assert h.cumulative() == [(0.1, 3), (1.0, 3), (math.inf, 5)]
    assert h.count == 5


def test_since_takes_the_growth_and_a_reset_bucket_counts_from_zero() -> None:
    before = histogram((1.0, 2.0), (5, 5, 0), 10.0)
    after = histogram((1.0, 2.0), (7, 3, 1), 12.5)
    assert after.since(before) == histogram((1.0, 2.0), (2, 3, 1), 2.5)


def test_a_histogram_from_fields_has_every_standard_bucket() -> None:
    fields = {
        "task_wait_seconds_bucket|le=0.005": 2,
        "task_wait_seconds_bucket|le=+Inf": 1,
        "task_wait_seconds_count": 3,
        "task_wait_seconds_sum_us": 1_500_000,
        "task_duration_seconds_bucket|le=0.005": 99,
    }
    h = Histogram.from_fields(fields, "task_wait_seconds")
    assert h.bounds == (*DURATION_BUCKETS, math.inf)
    assert dict(zip(h.bounds, h.counts, strict=True))[0.005] == 2
    assert (h.count, h.sum_s) == (3, 1.5)
    route = Histogram.from_fields(
        {"x_bucket|route=/a|le=0.1": 4, "x_bucket|route=/b|le=0.1": 7}, "x", (("route", "/a"),)
    )
    assert route.count == 4


def test_fields_parse_into_name_and_labels() -> None:
    assert parse_field("http_requests|code=200|route=/api/v1/task/{task_id}") == (
        "http_requests",
        (("code", "200"), ("route", "/api/v1/task/{task_id}")),
    )
    assert parse_field("tasks_completed") == ("tasks_completed", ())


def test_the_redis_label_has_no_password() -> None:
    address = RedisAddress("db.example", 6380, username="u", password="secret", db=2)
    assert address_label(address) == "db.example:6380/2"
    assert address_label(RedisAddress("::1", 6379)) == "[::1]:6379"


def stats_with(history: list[Sample], **overrides: Any) -> ClusterStats:
    fields: dict[str, Any] = {
        "now_s": 1000.0,
        "pending": 0,
        "suspects": 0,
        "processing": 0,
        "delayed": 0,
        "dead": 0,
        "oldest_pending_age_s": None,
        "metrics": {},
        "workers_seen": [],
        "consumers": [],
        "redis": RedisPanel("127.0.0.1:1", embedded=True, up=True),
        "history": history,
    }
    return ClusterStats(**{**fields, **overrides})


def test_throughput_is_one_point_per_pair_of_samples_oldest_first() -> None:
    history = [
        Sample(0, {"tasks_completed": 0}),
        Sample(5000, {"tasks_completed": 10, "tasks_failed": 5}),
        Sample(10000, {"tasks_completed": 30, "tasks_failed": 5}),
    ]
    assert stats_with(history).throughput() == [
        {"t": 5.0, "completed_per_s": 2.0, "failed_per_s": 1.0},
        {"t": 10.0, "completed_per_s": 4.0, "failed_per_s": 0.0},
    ]


def wait_sample(t_s: int, fast: int, slow: int) -> Sample:
    """A history entry whose wait histogram has ``fast`` observations <= 5 ms, ``slow`` <= 10 s."""
    return Sample(
        t_s * 1000,
        {
            "task_wait_seconds_bucket|le=0.005": fast,
            "task_wait_seconds_bucket|le=10.0": slow,
            "task_wait_seconds_count": fast + slow,
        },
    )


def test_latency_is_over_the_last_window_of_history() -> None:
    """Slow waits that ended before the window are not in the percentiles."""
    history = [wait_sample(0, 0, 0), wait_sample(100, 0, 1000)]
    history += [wait_sample(t, (t - 100) // 5, 1000) for t in range(105, 405, 5)]
    stats = stats_with(history)
    window = stats.latency("task_wait_seconds")
    assert window is not None and window.count == 60, "from t=100 to t=400"
    overview = stats.overview()["latency"]
    assert overview["window_s"] == 300
    assert 0.0025 < overview["wait"]["p95"] <= 0.005
    assert overview["run"] == {"p50": None, "p95": None}, "no task ran"


def test_with_less_history_than_the_window_latency_is_over_all_of_it() -> None:
    stats = stats_with([wait_sample(0, 1, 0), wait_sample(5, 1, 4)])
    window = stats.latency("task_wait_seconds")
    assert window is not None and window.count == 4
    assert stats_with([wait_sample(0, 1, 0)]).overview()["latency"]["wait"]["p50"] is None


# ------------------------------------------------------------------ against Redis


async def redis_ms(redis: Any) -> int:
    seconds, micros = await redis.execute_command("TIME")
    return int(seconds) * 1000 + int(micros) // 1000


def worker(process_id: str, seen_at: int, started_at: float, **more: Any) -> str:
    entry = {
        "process_id": process_id,
        "host": "h",
        "pid": 7,
        "started_at": started_at,
        "restarts": 1,
        "in_flight": 2,
        "connections": 3,
        "seen_at": seen_at,
        **more,
    }
    return json.dumps(entry)


async def read(redis: Any, keys: Keys, history: bool = True) -> ClusterStats:
    return await read_stats(
        redis, keys, reactor, 2.0, redis_label="127.0.0.1:9", embedded=True, history=history
    )


@pytest_twisted.ensureDeferred
async def test_read_stats_reads_the_queue_the_metrics_and_the_workers(
    redis: Any, keys: Keys
) -> None:
    now_ms = await redis_ms(redis)
    oldest = Task.new("u", {"n": 1}, now_ms / 1000 - 42.0)
    await redis.lpush(
        keys.pending, [oldest.to_json(), Task.new("u", None, now_ms / 1000).to_json()]
    )
    await redis.lpush(keys.suspects, ["s"])
    await redis.lpush(keys.dead, ["d1", "d2", "d3"])
    await redis.zadd(keys.delayed, 1, "a", 2, "b")
    await redis.sadd(keys.consumers, ["h:1:a#0", "h:2:b#0"])
    await redis.lpush(keys.processing("h:1:a#0"), ["x", "y"])
    await redis.lpush(keys.processing("h:2:b#0"), ["z"])
    await redis.set(keys.heartbeat("h:1:a"), "1")
    await redis.hset(keys.metrics, "tasks_completed", 12)
    await redis.hset(keys.metrics, "tasks_failed", 3)
    await redis.hset(keys.metrics, "rate_limited|tier=1/1s", 4)
    await redis.hset(keys.metrics, "rate_limited|tier=ip", 1)
    await redis.hset(keys.workers, "live", worker("live", now_ms - 2000, now_ms / 1000 - 60))
    await redis.hset(keys.workers, "gone", worker("gone", now_ms - 11_000, now_ms / 1000 - 60))
    await redis.hset(keys.workers, "broken", "{not json")
    await redis.lpush(keys.metrics_history, [json.dumps({"t": 0, "c": {"tasks_completed": 0}})])
    await redis.lpush(keys.metrics_history, [json.dumps({"t": 5000, "c": {"tasks_completed": 5}})])

    stats = await read(redis, keys)
    overview = stats.overview()
    assert abs(overview["now"] * 1000 - now_ms) < 5000
    assert overview["queue"] == {
        "pending": 2,
        "processing": 3,
        "delayed": 2,
        "dead": 3,
        "suspects": 1,
        "oldest_pending_age_s": pytest.approx(42.0, abs=2.0),
    }
    assert overview["totals"] == {
        "enqueued": 0,
        "completed": 12,
        "failed": 3,
        "retried": 0,
        "dead": 0,
        "reclaimed": 0,
    }
    assert overview["rate_limited"] == {"1/1s": 4, "ip": 1}
    configured = stats.overview(tiers=["1/1s", "20/60s"])["rate_limited"]
    assert configured == {"1/1s": 4, "20/60s": 0, "ip": 1}, "configured tiers shown with 0"
    assert overview["throughput"] == [{"t": 5.0, "completed_per_s": 1.0, "failed_per_s": 0.0}]
    [live] = overview["workers"]
    assert live["process_id"] == "live" and "seen_at" not in live
    assert live["uptime_s"] == pytest.approx(60.0, abs=5.0)
    assert (live["pid"], live["restarts"], live["in_flight"], live["connections"]) == (7, 1, 2, 3)
    assert stats.processes() == {
        "h:1:a": {"alive": True, "processing": {"h:1:a#0": 2}},
        "h:2:b": {"alive": False, "processing": {"h:2:b#0": 1}},
    }
    info = str(await redis.execute_command("INFO", "server"))
    assert overview["redis"]["version"] and overview["redis"]["version"] in info
    assert overview["redis"]["used_memory_bytes"] > 0
    assert (overview["redis"]["address"], overview["redis"]["embedded"]) == ("127.0.0.1:9", True)
    assert overview["redis"]["up"] is True and overview["read_only"] is False


@pytest_twisted.ensureDeferred
async def test_an_empty_cluster_reads_as_zeros_and_nulls(redis: Any, keys: Keys) -> None:
    overview = (await read(redis, keys)).overview(read_only=True)
    assert overview["queue"]["oldest_pending_age_s"] is None
    assert set(overview["totals"].values()) == {0}
    assert overview["throughput"] == [] and overview["workers"] == []
    assert overview["latency"]["wait"] == {"p50": None, "p95": None}
    assert overview["read_only"] is True


@pytest_twisted.ensureDeferred
async def test_history_is_read_only_when_asked_for(redis: Any, keys: Keys) -> None:
    for t in (0, 5000):
        await redis.lpush(keys.metrics_history, [json.dumps({"t": t, "c": {}})])
    assert (await read(redis, keys, history=False)).history == []
    assert [s.t_ms for s in (await read(redis, keys)).history] == [0, 5000], "oldest first"


@pytest_twisted.ensureDeferred
async def test_a_pending_entry_that_is_not_a_task_has_no_age(redis: Any, keys: Keys) -> None:
    await redis.lpush(keys.pending, ["garbage"])
    stats = await read(redis, keys)
    assert (stats.pending, stats.oldest_pending_age_s) == (1, None)


@pytest_twisted.ensureDeferred
async def test_the_oldest_pending_task_is_the_one_consumed_next(redis: Any, keys: Keys) -> None:
    now_ms = await redis_ms(redis)
    for age_s in (300, 200, 100):  # LPUSH: the first pushed is consumed first (RPOPLPUSH)
        task = Task("a" * 32, "u", None, iso_utc(now_ms / 1000 - age_s))
        await redis.lpush(keys.pending, [task.to_json()])
    stats = await read(redis, keys)
    assert stats.oldest_pending_age_s == pytest.approx(300, abs=2.0)


@pytest_twisted.ensureDeferred
async def test_no_answer_is_redis_unavailable() -> None:
    nowhere = connect(RedisAddress("127.0.0.1", unused_port()), 1, 0.3)
    try:
        with pytest.raises(RedisUnavailable):
            await read_stats(
                nowhere, Keys("x"), reactor, 0.3, redis_label="127.0.0.1:1", embedded=False
            )
    finally:
        await nowhere.disconnect()


@pytest_twisted.ensureDeferred
async def test_what_the_flusher_writes_is_what_read_stats_reads(redis: Any, keys: Keys) -> None:
    """The writer's side (taskserver.metrics) and ours agree on the fields."""
    tally = Tally()
    tally.count(TASKS_COMPLETED, 3)
    tally.observe(TASK_WAIT, 0.004)
    tally.observe(TASK_WAIT, 7.0)
    tally.rate_limited("ip")
    started = reactor.seconds() - 5

    def entry() -> dict[str, Any]:
        return worker_entry("p", started, restarts=2, in_flight=1, connections=4, waiters=0)

    flusher = MetricsFlusher(tally, lambda: redis, keys, reactor, 2.0, worker_id="p", worker=entry)
    assert await flusher.flush()
    stats = await read(redis, keys)
    assert stats.counter(TASKS_COMPLETED) == 3
    assert stats.overview()["rate_limited"] == {"ip": 1}
    [wait] = stats.histograms(TASK_WAIT).values()
    assert (wait.count, wait.sum_s) == (2, pytest.approx(7.004))
    assert dict(wait.cumulative())[0.005] == 1
    [live] = stats.workers()
    assert (live["process_id"], live["restarts"], live["connections"]) == ("p", 2, 4)
    assert live["uptime_s"] == pytest.approx(5.0, abs=2.0)
    assert [s.totals.get(TASKS_COMPLETED) for s in stats.history] == [3], "the first sample"


def test_the_oldest_pending_age_of_a_delayed_task_counts_from_its_run_at() -> None:
    task = Task.new("u", None, now=0.0, run_at=iso_utc(3600.0))
    assert _age(task.to_json(), 3610.0) == 10.0, "its hour of delay is no wait"
