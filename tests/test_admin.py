"""taskserver-admin: its operations against a real Redis, and the installed command itself."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor

from harness import Twistd, wait_for
from taskserver import admin, deadletters
from taskserver.cluster.embedded import EMBEDDED_ADDRESS_FILE
from taskserver.config import RedisAddress, Settings
from taskserver.keys import Keys
from taskserver.queue import TaskQueue
from taskserver.stats import TOTALS
from taskserver.task import Task

ADMIN = str(Path(sys.executable).parent / "taskserver-admin")


@pytest.fixture
def queue(redis: Any, keys: Keys) -> TaskQueue:
    return TaskQueue(redis, keys, 3600, 2.0, reactor, max_attempts=1)


async def dead_task(queue: TaskQueue, redis: Any, user: str) -> Task:
    task = Task.new(user, None, reactor.seconds())
    await queue.enqueue(task)
    raw = await queue.fetch(redis, queue.keys.pending, queue.keys.processing("h:1:a#0"), 1)
    await queue.mark_started(task, "t")
    assert await queue.fail("h:1:a#0", raw, task, 1, "boom", 1, "t", 1) == "dead"
    return task


@pytest_twisted.ensureDeferred
async def test_stats_dead_requeue_purge(queue: TaskQueue, redis: Any, keys: Keys) -> None:
    first = await dead_task(queue, redis, "a")
    second = await dead_task(queue, redis, "b")
    await queue.enqueue(Task.new("c", None, reactor.seconds()))
    await queue.heartbeat("h:1:a", ["h:1:a#0"], ttl_s=30)

    address = RedisAddress("127.0.0.1", 6379, password="secret")
    report = await admin.stats(redis, keys, reactor, address, embedded=False)
    assert {k: report["queue"][k] for k in ("pending", "dead", "delayed", "processing")} == {
        "pending": 1,
        "dead": 2,
        "delayed": 0,
        "processing": 0,
    }
    assert report["processes"] == {"h:1:a": {"alive": True, "processing": {"h:1:a#0": 0}}}
    assert report["redis"]["address"] == "127.0.0.1:6379" and "secret" not in json.dumps(report)

    listed = await deadletters.dead_letters(redis, keys, limit=10)
    assert [entry["task"]["id"] for entry in listed] == [second.id, first.id]
    assert listed[0]["error"] == "boom"

    assert await deadletters.requeue(redis, keys, [first.id]) == 1
    assert await queue.status(first.id) == {
        "status": "queued",
        "user_id": "a",
        "attempts": "0",
        "queued_at": first.queued_at,
    }, "nothing left of the last run (error, started_at, finished_at, duration_ms)"
    assert await redis.llen(keys.pending) == 2
    assert await deadletters.purge(redis, keys) == 1
    assert await redis.llen(keys.dead) == 0


PAYLOADS = [
    [],
    {},
    12345678901234567890,
    {"ключ": ["ü", {"😀": [[[]], {}], "big": -98765432109876543210, "x": 1.5e300}]},
]


@pytest.mark.parametrize("payload", PAYLOADS, ids=["list", "object", "big-int", "unicode"])
@pytest.mark.parametrize("death", ["failed", "killed-its-process"])
@pytest_twisted.ensureDeferred
async def test_a_requeued_task_is_exactly_the_task_that_died(
    queue: TaskQueue, redis: Any, keys: Keys, payload: Any, death: str
) -> None:
    """Requeue takes the task's own text: no re-encoding ([] stays [], big integers stay exact)."""
    task = Task.new("ü-user", payload, reactor.seconds())
    await queue.enqueue(task)
    consumer = "h:2:b#0"
    raw = await queue.fetch(redis, keys.pending, keys.processing(consumer), 1)
    assert raw == task.to_json()
    await queue.mark_started(task, "t")
    if death == "failed":
        assert await queue.fail(consumer, raw, task, 1, "boom", 1, "t", 1) == "dead"
    else:
        assert await queue.reclaim("h:2:b", [consumer], forget=True, force=True) == (0, 1)
    assert await deadletters.requeue(redis, keys, []) == 1
    [pending] = await redis.lrange(keys.pending, 0, -1)
    assert pending.encode("utf-8") == task.to_json().encode("utf-8")
    assert Task.from_json(pending).handler_argument(1)["payload"] == payload


@pytest_twisted.ensureDeferred
async def test_requeue_reads_entries_written_before_it_knew_better(redis: Any, keys: Keys) -> None:
    """An entry as FAIL has always written it, with an error that mimics the task field."""
    task = Task.new("old", [], reactor.seconds())
    error = json.dumps('x","task":{"id":"' + "f" * 32 + '"}')
    entry = f'{{"error":{error},"attempts":3,"failed_at_ms":1,"task":{task.to_json()}}}'
    await redis.lpush(keys.dead, entry)
    assert await deadletters.requeue(redis, keys, ["f" * 32]) == 0, "the error is not a task"
    assert await deadletters.requeue(redis, keys, [task.id]) == 1
    assert await redis.lrange(keys.pending, 0, -1) == [task.to_json()]


def admin_stats(cwd: Path) -> dict[str, Any]:
    result = subprocess.run(
        [ADMIN, "stats", "--json"], cwd=cwd, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def scraped_numbers(server: Twistd) -> dict[str, float]:
    """The totals and queue gauges of GET /metrics, named as in the overview."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {
        (s.name, s.labels.get("state", "")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    numbers = {f"totals.{k}": samples[(f"taskserver_tasks_{k}_total", "")] for k in TOTALS}
    for state in ("pending", "processing", "delayed", "dead", "suspects"):
        numbers[f"queue.{state}"] = samples[("taskserver_queue_tasks", state)]
    return numbers


def overview_numbers(report: dict[str, Any]) -> dict[str, float]:
    numbers = {f"totals.{k}": float(report["totals"][k]) for k in TOTALS}
    for state in ("pending", "processing", "delayed", "dead", "suspects"):
        numbers[f"queue.{state}"] = float(report["queue"][state])
    return numbers


def test_the_installed_command_finds_the_embedded_redis(
    twistd: Callable[..., Twistd], tmp_path: Path
) -> None:
    server = twistd(WORKERS="1")
    server.wait_until_listening()
    task_id = server.post_task("from-admin-test")
    assert task_id
    wait_for(lambda: server.status_of(task_id) == "completed", what="the task completed")
    report = admin_stats(tmp_path)
    assert set(report) >= {"queue", "totals", "latency", "workers", "redis", "processes"}
    assert report["redis"]["embedded"] is True
    assert report["rate_limited"] == {t.name: 0 for t in Settings().rate_limits}, "none refused"

    def same_numbers() -> bool:
        """admin stats and /metrics agree (once the last second's counts are flushed)."""
        return scraped_numbers(server) == overview_numbers(admin_stats(tmp_path))

    wait_for(same_numbers, timeout=10, what="admin stats and /metrics show the same numbers")
    text = subprocess.run(
        [ADMIN, "stats"], cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    assert text.returncode == 0, text.stderr
    assert re.search(r"^pending +0 ", text.stdout, re.M) and "embedded" in text.stdout
    assert server.stop() == 0
    assert not (tmp_path / "data" / EMBEDDED_ADDRESS_FILE).exists()

    gone = subprocess.run(
        [ADMIN, "stats"], cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    assert gone.returncode == 1
    assert gone.stderr.strip() == (
        "taskserver-admin: no Redis configured and no running taskserver in DATA_DIR 'data'"
    )


async def script_usec(redis: Any) -> tuple[int, int]:
    """Script calls so far and the microseconds Redis spent in them (INFO commandstats)."""
    info = str(await redis.execute_command("INFO", "commandstats"))
    found = re.findall(r"cmdstat_eval(?:sha)?:calls=(\d+),usec=(\d+)", info)
    return sum(int(calls) for calls, _ in found), sum(int(usec) for _, usec in found)


@pytest_twisted.ensureDeferred
async def test_requeueing_a_full_dead_letter_list_holds_redis_up_for_milliseconds(
    redis: Any, keys: Keys
) -> None:
    """10,000 entries (the default DEAD_LETTER_MAX), oldest first, in bounded calls.

    Redis answers nothing else while a script runs: one script of LREMs from the
    head took 1.8 s here (every POST a 503 meanwhile).
    """
    tasks = [Task.new("u", {"n": n, "pad": "x" * 100}, 0) for n in range(10_000)]
    entries = [
        f'{{"error":"boom","attempts":3,"failed_at_ms":1,"task":{t.to_json()}}}' for t in tasks
    ]
    for start in range(0, len(entries), 1000):  # tasks[0] died first: the oldest entry
        await redis.lpush(keys.dead, entries[start : start + 1000])
    calls_before, usec_before = await script_usec(redis)
    assert await deadletters.requeue(redis, keys, []) == 10_000
    calls_after, usec_after = await script_usec(redis)
    assert calls_after - calls_before >= 10_000 // deadletters.REQUEUE_BATCH, "bounded calls"
    assert usec_after - usec_before < 500_000, "Redis time in the requeue's scripts"
    assert await redis.llen(keys.dead) == 0
    oldest_first = list(reversed(await redis.lrange(keys.pending, 0, -1)))
    assert oldest_first == [t.to_json() for t in tasks], "the oldest dead task runs first"


@pytest_twisted.ensureDeferred
async def test_requeue_by_id_takes_the_named_tasks_only(
    queue: TaskQueue, redis: Any, keys: Keys
) -> None:
    tasks = [await dead_task(queue, redis, f"user-{n}") for n in range(4)]
    named = [tasks[2].id, tasks[0].id, tasks[2].id]
    assert await deadletters.requeue(redis, keys, named) == 2, "each named task once"
    oldest_first = list(reversed(await redis.lrange(keys.pending, 0, -1)))
    assert oldest_first == [tasks[0].to_json(), tasks[2].to_json()]
    listed = await deadletters.dead_letters(redis, keys, limit=10)
    assert [entry["task"]["id"] for entry in listed] == [tasks[3].id, tasks[1].id]


class DiesMeanwhile:
    """A Redis client during which a task is dead-lettered right after every LLEN."""

    def __init__(self, real: Any, keys: Keys) -> None:
        self._real = real
        self._keys = keys
        self.died = 0

    async def llen(self, key: str) -> int:
        count = int(await self._real.llen(key))
        await self._real.lpush(self._keys.dead, '{"error":"late","task":{}}')
        self.died += 1
        return count

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@pytest_twisted.ensureDeferred
async def test_purge_counts_what_it_deleted(queue: TaskQueue, redis: Any, keys: Keys) -> None:
    for user in ("a", "b"):
        await dead_task(queue, redis, user)
    meanwhile = DiesMeanwhile(redis, keys)
    purged = await deadletters.purge(meanwhile, keys)
    assert purged == 2 + meanwhile.died - await redis.llen(keys.dead)
