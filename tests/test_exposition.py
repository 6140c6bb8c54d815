"""GET /metrics: prometheus_client's own parser reads what we expose, from real servers."""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample as PromSample
from twisted.internet import reactor

from conftest import RunningServer, eventually, unused_port
from harness import Load, Twistd, wait_for
from taskserver.config import RateTier, RedisAddress
from taskserver.exposition import exposition
from taskserver.keys import Keys
from taskserver.metrics import DURATION_BUCKETS
from taskserver.stats import ClusterStats, Consumer, RedisPanel, read_stats
from taskserver.task import Task

Families = dict[str, Any]


def parse(text: bytes | str) -> Families:
    """Metric families by name (counters without ``_total``, as the parser names them)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(families: Families, sample_name: str, **labels: str) -> float:
    """The one sample named ``sample_name`` with exactly ``labels``."""
    found = [
        s
        for family in families.values()
        for s in family.samples
        if s.name == sample_name and s.labels == labels
    ]
    assert len(found) == 1, f"{sample_name}{labels}: {found}"
    return float(found[0].value)


def reading(**overrides: Any) -> ClusterStats:
    fields: dict[str, Any] = {
        "now_s": 1000.0,
        "pending": 5,
        "suspects": 1,
        "processing": 2,
        "delayed": 3,
        "dead": 4,
        "oldest_pending_age_s": 12.5,
        "metrics": {
            "tasks_enqueued": 10,
            "tasks_completed": 7,
            "tasks_failed": 2,
            "tasks_retried": 1,
            "tasks_dead": 1,
            "tasks_reclaimed": 3,
            "worker_restarts": 2,
            "task_log_write_errors": 5,
            "rate_limited|tier=1/1s": 6,
            "rate_limited|tier=ip": 1,
            "http_requests|code=202|route=/api/v1/task": 10,
            "http_requests|code=429|route=/api/v1/task": 7,
            "http_request_duration_seconds_bucket|route=/api/v1/task|le=0.001": 4,
            "http_request_duration_seconds_bucket|route=/api/v1/task|le=0.005": 12,
            "http_request_duration_seconds_bucket|route=/api/v1/task|le=+Inf": 1,
            "http_request_duration_seconds_count|route=/api/v1/task": 17,
            "http_request_duration_seconds_sum_us|route=/api/v1/task": 2_500_000,
            "task_duration_seconds_bucket|le=0.1": 5,
            "task_duration_seconds_bucket|le=1.0": 2,
            "task_duration_seconds_count": 7,
            "task_duration_seconds_sum_us": 1_250_000,
        },
        "workers_seen": [
            {"seen_at": 999_000, "started_at": 1.0, "process_id": "a", "host": "h", "pid": 1}
            | {"restarts": 0, "in_flight": 0, "connections": 0, "waiters": 3},
            {"seen_at": 980_000, "started_at": 1.0, "process_id": "b", "host": "h", "pid": 2}
            | {"restarts": 0, "in_flight": 0, "connections": 0, "waiters": 5},
        ],
        "consumers": [Consumer("a#0", 2, True)],
        "redis": RedisPanel("127.0.0.1:6379", embedded=True, up=True),
    }
    return ClusterStats(**{**fields, **overrides})


def test_the_counters_are_exposed_with_their_totals_and_labels() -> None:
    families = parse(exposition(reading()))
    for name, expected in (
        ("tasks_enqueued", 10),
        ("tasks_completed", 7),
        ("tasks_failed", 2),
        ("tasks_retried", 1),
        ("tasks_dead", 1),
        ("tasks_reclaimed", 3),
        ("worker_restarts", 2),
        ("task_log_write_errors", 5),
    ):
        assert families[f"taskserver_{name}"].type == "counter"
        assert value(families, f"taskserver_{name}_total") == expected
    assert families["taskserver_rate_limited"].type == "counter"
    assert value(families, "taskserver_rate_limited_total", tier="1/1s") == 6
    assert value(families, "taskserver_rate_limited_total", tier="ip") == 1
    assert value(families, "taskserver_http_requests_total", route="/api/v1/task", code="429") == 7
    for family in families.values():
        assert family.documentation, f"{family.name} has HELP text"


def test_histograms_are_cumulative_with_count_and_sum() -> None:
    families = parse(exposition(reading()))
    http = families["taskserver_http_request_duration_seconds"]
    assert http.type == "histogram"
    route = "/api/v1/task"
    buckets = {
        s.labels["le"]: s.value
        for s in http.samples
        if s.name.endswith("_bucket") and s.labels["route"] == route
    }
    assert list(buckets) == [*(repr(b) for b in DURATION_BUCKETS), "+Inf"]
    assert (buckets["0.001"], buckets["0.0025"], buckets["0.005"], buckets["+Inf"]) == (
        4,
        4,
        16,
        17,
    )
    assert value(families, "taskserver_http_request_duration_seconds_count", route=route) == 17
    assert value(families, "taskserver_http_request_duration_seconds_sum", route=route) == 2.5
    assert value(families, "taskserver_task_duration_seconds_bucket", le="1.0") == 7
    assert value(families, "taskserver_task_duration_seconds_sum") == 1.25
    assert value(families, "taskserver_task_wait_seconds_count") == 0, "nothing waited yet"
    assert value(families, "taskserver_task_wait_seconds_bucket", le="0.001") == 0


def test_the_gauges_read_the_queue_now() -> None:
    families = parse(exposition(reading()))
    assert families["taskserver_queue_tasks"].type == "gauge"
    states = {"pending": 5, "processing": 2, "delayed": 3, "dead": 4, "suspects": 1}
    for state, expected in states.items():
        assert value(families, "taskserver_queue_tasks", state=state) == expected
    assert value(families, "taskserver_queue_oldest_age_seconds") == 12.5
    assert value(families, "taskserver_workers") == 1, "b last reported 20 s ago"
    assert families["taskserver_waiters"].type == "gauge"
    assert value(families, "taskserver_waiters") == 3, "a's; b's 5 are a gone process's"
    assert value(families, "taskserver_redis_up") == 1


def test_the_waiters_are_summed_over_the_live_children() -> None:
    entry = {"started_at": 1.0, "host": "h", "restarts": 0, "in_flight": 0, "connections": 0}
    workers = [
        entry | {"seen_at": 999_000, "process_id": "a", "pid": 1, "waiters": 3},
        entry | {"seen_at": 998_000, "process_id": "c", "pid": 3, "waiters": 4},
        entry | {"seen_at": 997_000, "process_id": "old", "pid": 4},  # from before the gauge
    ]
    families = parse(exposition(reading(workers_seen=workers)))
    assert value(families, "taskserver_waiters") == 7
    families = parse(exposition(reading(workers_seen=[])))
    assert value(families, "taskserver_waiters") == 0, "no child: none, not absent"


def test_the_readme_s_metrics_table_lists_every_metric_exposed() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    documented = set(re.findall(r"^\| `(taskserver_\w+)` \|", readme, re.MULTILINE))
    exposed = {
        family.name + ("_total" if family.type == "counter" else "")
        for family in parse(exposition(reading())).values()
    }
    assert exposed == documented


def test_the_delayed_state_says_it_holds_scheduled_tasks_too() -> None:
    help_text = parse(exposition(reading()))["taskserver_queue_tasks"].documentation
    assert "delayed: retries and scheduled tasks" in help_text


def test_an_empty_queue_has_oldest_age_zero_and_no_labelled_series() -> None:
    families = parse(exposition(reading(oldest_pending_age_s=None, metrics={})))
    assert value(families, "taskserver_queue_oldest_age_seconds") == 0
    assert families["taskserver_rate_limited"].samples == []
    assert families["taskserver_http_request_duration_seconds"].samples == []
    assert value(families, "taskserver_tasks_completed_total") == 0


def test_without_redis_only_redis_up_zero() -> None:
    families = parse(exposition(None))
    assert list(families) == ["taskserver_redis_up"]
    assert families["taskserver_redis_up"].samples == [PromSample("taskserver_redis_up", {}, 0.0)]


# ------------------------------------------------------------------ the route, on a real server


async def scrape(server: RunningServer, headers: dict[str, str] | None = None) -> Any:
    return await treq.get(server.url + "/metrics", headers=headers)


@pytest_twisted.ensureDeferred
async def test_get_metrics_answers_the_totals_in_redis(
    start_server: Callable[..., RunningServer], redis: Any, keys: Keys
) -> None:
    await redis.hset(keys.metrics, "tasks_completed", 41)
    await redis.lpush(keys.dead, ["x", "y"])
    server = start_server()
    response = await scrape(server)
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == [CONTENT_TYPE_LATEST]
    families = parse(await response.content())
    assert value(families, "taskserver_tasks_completed_total") == 41
    assert value(families, "taskserver_queue_tasks", state="dead") == 2
    assert value(families, "taskserver_redis_up") == 1


@pytest_twisted.ensureDeferred
async def test_metrics_token_requires_the_bearer_token(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server(metrics_token="s3cret")
    for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        refused = await scrape(server, headers)
        assert refused.code == 401, headers
        assert refused.headers.getRawHeaders("www-authenticate") == ['Bearer realm="metrics"']
        assert (await refused.json())["error"] == "unauthorized"
    allowed = await scrape(server, {"Authorization": "Bearer s3cret"})
    assert allowed.code == 200
    assert "taskserver_tasks_completed_total" in (await allowed.text())


@pytest_twisted.ensureDeferred
async def test_metrics_are_not_rate_limited(start_server: Callable[..., RunningServer]) -> None:
    server = start_server(ip_rate_limits=(RateTier("ip", 1, 60_000),))
    codes = [(await scrape(server)).code for _ in range(5)]
    assert codes == [200] * 5


@pytest_twisted.ensureDeferred
async def test_without_redis_a_scrape_is_200_with_redis_up_zero(
    start_server: Callable[..., RunningServer],
) -> None:
    nowhere = RedisAddress("127.0.0.1", unused_port())
    server = start_server(redis=nowhere, redis_timeout_s=0.3, shutdown_timeout_s=0.2)
    response = await scrape(server)
    assert response.code == 200
    families = parse(await response.content())
    assert list(families) == ["taskserver_redis_up"]
    assert value(families, "taskserver_redis_up") == 0


@pytest_twisted.ensureDeferred
async def test_an_open_wait_shows_in_taskserver_waiters_until_it_is_answered(
    start_server: Callable[..., RunningServer],
) -> None:
    """Through a real child: its workers entry carries its waiters, and a scrape sums them."""
    server = start_server()
    posted = await treq.post(
        server.url + "/api/v1/task",
        json={"user_id": "gauge", "delay_s": 3600},
        headers={"Content-Type": "application/json"},
    )
    assert posted.code == 202
    task_id = (await posted.json())["task_id"]

    async def waiters_shown(expected: int) -> bool:
        return (
            value(parse(await (await scrape(server)).content()), "taskserver_waiters") == expected
        )

    await eventually(lambda: waiters_shown(0))
    waiting = treq.get(f"{server.url}/api/v1/task/{task_id}?wait=30")
    await eventually(lambda: waiters_shown(1))
    assert server.child.waiters is not None and server.child.waiters.count == 1
    cancelled = await treq.delete(f"{server.url}/api/v1/task/{task_id}")
    assert cancelled.code == 200
    answered = await waiting
    assert answered.code == 200 and (await answered.json())["status"] == "cancelled"
    await eventually(lambda: waiters_shown(0))


# ------------------------------------------------------------------ a scrape stays bounded


async def command_calls(redis: Any) -> dict[str, int]:
    """Calls per command so far (INFO commandstats counts those a script makes too)."""
    info = str(await redis.execute_command("INFO", "commandstats"))
    return {name: int(n) for name, n in re.findall(r"cmdstat_([a-z|]+):calls=(\d+)", info)}


async def calls_of_one_read(redis: Any, keys: Keys) -> dict[str, int]:
    """The commands Redis ran for one read_stats (and the INFO that measured it)."""
    before = await command_calls(redis)
    await read_stats(redis, keys, reactor, 5.0, redis_label="-", embedded=True, history=True)
    after = await command_calls(redis)
    return {name: n - before.get(name, 0) for name, n in after.items() if n > before.get(name, 0)}


FILL = "for _ = 1, tonumber(ARGV[1]) do redis.call('LPUSH', KEYS[1], ARGV[2]) end return 1"
TASK = Task("a" * 32, "u", None, "2026-01-01T00:00:00.000Z").to_json()


@pytest_twisted.ensureDeferred
async def test_a_read_does_the_same_commands_with_200000_tasks_pending(
    redis: Any, keys: Keys
) -> None:
    """No command per task: the counts are LLEN and ZCARD, the oldest one LINDEX."""
    await redis.sadd(keys.consumers, ["h:1:a#0", "h:1:a#1"])
    empty = await calls_of_one_read(redis, keys)
    await redis.execute_command("EVAL", FILL, 1, keys.pending, 200_000, TASK)
    await redis.execute_command("EVAL", FILL, 1, keys.processing("h:1:a#0"), 1000, TASK)
    await redis.execute_command("EVAL", FILL, 1, keys.dead, 1000, TASK)
    assert await redis.llen(keys.pending) == 200_000
    full = await calls_of_one_read(redis, keys)
    assert full == empty
    assert (full["llen"], full["lindex"], full["zcard"]) == (3 + 2, 1, 1), "one LLEN per consumer"
    assert not set(full) & {"lpop", "rpop", "scan", "keys", "sort", "lpos", "lrem"}
    assert full.get("lrange") == 1, "the history only"
    stats = await read_stats(redis, keys, reactor, 5.0, redis_label="-", embedded=True)
    assert (stats.pending, stats.processing, stats.dead) == (200_000, 1000, 1000)
    assert stats.oldest_pending_age_s is not None and stats.oldest_pending_age_s > 0


# ------------------------------------------------------------------ a real cluster


class Scraper:
    """Scrapes through several connections at once: each says first which child it is on.

    Connections opened together are spread over the children; on each, GET
    /healthz names the child's pid, then GET /metrics goes to that same child.
    """

    def __init__(self, url: str) -> None:
        self.port = int(url.rpartition(":")[2])

    def open(self, connections: int = 6) -> dict[http.client.HTTPConnection, int]:
        """Connections opened together, each with the pid of the child it reached."""
        opened = [
            http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            for _ in range(connections)
        ]
        for connection in opened:
            connection.connect()
        by_child = {}
        for connection in opened:
            with contextlib.suppress(OSError, http.client.HTTPException):  # a child dying
                connection.request("GET", "/healthz", headers={"Host": "localhost"})
                by_child[connection] = json.loads(connection.getresponse().read())["pid"]
        return by_child

    def scrape_each_child(self) -> dict[int, Families]:
        """A scrape from each child reached on new connections (a dying one may not answer).

        One scrape per child, in the order they were taken (the dict's order): a
        second scrape of a child would take the first one's place in that order,
        and a later total would then seem to come before an earlier one.
        """
        by_child = self.open()
        answers = {}
        try:
            for connection, pid in by_child.items():
                if pid in answers:
                    continue
                try:
                    connection.request("GET", "/metrics", headers={"Host": "localhost"})
                    response = connection.getresponse()
                    body = response.read()
                except (OSError, http.client.HTTPException):
                    continue
                assert response.status == 200, body
                answers[pid] = parse(body)
            return answers
        finally:
            for connection in by_child:
                connection.close()

    def kill(self, pid: int) -> None:
        """GET /kill on a connection that reached the child ``pid`` (loopback: allowed)."""
        by_child = self.open()
        try:
            for connection, reached in by_child.items():
                if reached == pid:
                    connection.request("GET", "/kill", headers={"Host": "localhost"})
                    assert connection.getresponse().status == 200
                    return
            raise AssertionError(f"no connection reached child {pid}")
        finally:
            for connection in by_child:
                connection.close()


def counters(families: Families) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every counter sample (and histogram bucket, count and sum: counters too)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in families.values()
        if family.type in ("counter", "histogram")
        for s in family.samples
    }


def test_every_child_shows_the_cluster_totals_and_a_killed_child_takes_none_back(
    twistd: Callable[..., Twistd],
) -> None:
    server = twistd(WORKERS="2")
    children = server.wait_until_ready(2)
    scraper = Scraper(server.url)
    first = [server.post_task(f"metrics-{n}") for n in range(20)]
    assert all(first)
    seen: list[dict[tuple[str, tuple[tuple[str, str], ...]], float]] = []

    def completed_everywhere(expected: int) -> bool:
        answers = scraper.scrape_each_child()
        seen.extend(counters(f) for f in answers.values())
        totals = {pid: value(f, "taskserver_tasks_completed_total") for pid, f in answers.items()}
        return set(totals) == set(children) and set(totals.values()) == {expected}

    wait_for(
        lambda: completed_everywhere(20), timeout=30, what="completed == 20 from both children"
    )
    restarts_before = seen[-1][("taskserver_worker_restarts_total", ())]

    load = Load(server, threads=2, limit=200, users="metrics-load")
    scraper.kill(children[0])
    while not load.done():
        seen.extend(counters(f) for f in scraper.scrape_each_child().values())
    load.finish()
    replacement = wait_for(
        lambda: [pid for pid in server.ready_pids() if pid not in children],
        timeout=60,
        what="the killed child replaced",
    )

    def restart_counted() -> bool:
        answers = scraper.scrape_each_child()
        seen.extend(counters(f) for f in answers.values())
        restarts = {value(f, "taskserver_worker_restarts_total") for f in answers.values()}
        alive = {children[1], *replacement}
        return bool(answers) and set(answers) >= alive and min(restarts) > restarts_before

    wait_for(
        restart_counted, timeout=30, what="worker_restarts_total rose, seen from both children"
    )
    for earlier, later in itertools.pairwise(seen):
        for series, before in earlier.items():
            assert series in later and later[series] >= before, (
                f"{series} went down: {before} -> {later[series]}"
            )
    assert seen[-1][("taskserver_tasks_completed_total", ())] >= 20
    assert server.stop() == 0
