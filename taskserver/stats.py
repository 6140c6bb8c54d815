# -*- test-case-name: tests.test_stats -*-
"""The cluster's numbers, read from Redis at once: the one source of every view of them.

``taskserver-admin stats``, the dashboard's overview and ``GET /metrics`` all
call :func:`read_stats`, so they show the same numbers. A read costs the same
with ten tasks queued or ten million: the queue's counts are LLEN and ZCARD,
processing is one LLEN per registered consumer, the metric totals are one
HGETALL of a hash whose size is bounded by the label sets (routes, codes,
tiers, buckets), never by the tasks (``lua/read_stats.lua``, one round trip).

The totals in :attr:`Keys.metrics` are the flushed sums of every process's
tallies (``taskserver.metrics``); histogram buckets there are per bucket
(not cumulative), with the sum in integer microseconds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import txredisapi
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from taskserver.config import RedisAddress
from taskserver.ids import process_of
from taskserver.keys import Keys
from taskserver.metrics import DURATION_BUCKETS
from taskserver.redisclient import RedisUnavailable, within
from taskserver.scripts import load
from taskserver.task import MalformedTask, Task

__all__ = ["ClusterStats", "Histogram", "RedisUnavailable", "read_stats"]

#: KEYS and ARGV: see the script's header.
READ_STATS = load("read_stats")
#: The history entries read (all the flush script keeps: 15 min at one per 5 s).
HISTORY_ENTRIES = 180
#: Latency percentiles are over the histogram's growth in this window.
LATENCY_WINDOW_S = 300
#: A workers entry not refreshed for this long is a process that is gone.
WORKER_GONE_AFTER_S = 10.0
#: Counters shown as the overview's totals: overview name -> metric name.
TOTALS = {
    "enqueued": "tasks_enqueued",
    "completed": "tasks_completed",
    "failed": "tasks_failed",
    "retried": "tasks_retried",
    "dead": "tasks_dead",
    "reclaimed": "tasks_reclaimed",
}

Labels = tuple[tuple[str, str], ...]


def address_label(address: RedisAddress) -> str:
    """``host:port`` (and ``/db`` unless 0): where Redis is, without user or password.

    With sentinels: the primary's name and the sentinels (the primary moves).
    """
    if address.sentinels:
        sentinels = ",".join(s.display() for s in address.sentinels)
        db = f"/{address.db}" if address.db else ""
        return f"{address.sentinel_master}{db} via sentinels {sentinels}"
    host = f"[{address.host}]" if ":" in address.host else address.host
    return f"{host}:{address.port}" + (f"/{address.db}" if address.db else "")


def parse_field(key: str) -> tuple[str, Labels]:
    """A field of the metrics hash as its name and labels (``le`` last, as written)."""
    name, *pairs = key.split("|")
    return name, tuple((k, v) for k, _, v in (pair.partition("=") for pair in pairs))


@dataclass(frozen=True)
class Histogram:
    """One histogram's observations: per-bucket (not cumulative) counts and the sum.

    ``bounds`` are the buckets' upper bounds, ascending, ``math.inf`` last.
    """

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum_s: float

    @classmethod
    def from_fields(cls, fields: Mapping[str, int], name: str, labels: Labels = ()) -> Histogram:
        """Histogram ``name`` with ``labels`` out of metric fields (missing buckets count 0).

        The bounds are DURATION_BUCKETS and any other bound found (so that a
        histogram that observed nothing yet still has all its buckets).
        """
        suffix = "".join(f"|{k}={v}" for k, v in labels)
        bucket_prefix = f"{name}_bucket{suffix}|le="
        found: dict[float, int] = {bound: 0 for bound in (*DURATION_BUCKETS, math.inf)}
        for key, value in fields.items():
            if key.startswith(bucket_prefix):
                bound = float(key[len(bucket_prefix) :])  # "+Inf" included
                found[bound] = found.get(bound, 0) + int(value)
        bounds = tuple(sorted(found))
        sum_us = int(fields.get(f"{name}_sum_us{suffix}", 0))
        return cls(bounds, tuple(found[b] for b in bounds), sum_us / 1_000_000)

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations <= it)`` per bucket, as Prometheus exposes them."""
        running, out = 0, []
        for bound, count in zip(self.bounds, self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out

    def since(self, earlier: Histogram) -> Histogram:
        """The observations made after ``earlier`` (a reading of the same totals).

        A bucket that went down means the totals were reset (Redis lost its
        data): its count since is its count now, as Prometheus's increase().
        """
        before = dict(zip(earlier.bounds, earlier.counts, strict=True))
        counts = tuple(
            _increase(before.get(b, 0), c) for b, c in zip(self.bounds, self.counts, strict=True)
        )
        sum_s = self.sum_s - earlier.sum_s if self.sum_s >= earlier.sum_s else self.sum_s
        return Histogram(self.bounds, counts, sum_s)

    def quantile(self, q: float) -> float | None:
        """The ``q``-quantile as Prometheus's histogram_quantile() estimates it; None if empty.

        Linear interpolation inside the bucket the rank falls in (the first
        bucket starts at 0); a rank in the +Inf bucket gives the largest
        finite bound.
        """
        buckets = self.cumulative()
        total = buckets[-1][1] if buckets else 0
        if total == 0 or not 0 <= q <= 1:
            return None
        rank = q * total
        index = next(
            (i for i, (_, count) in enumerate(buckets[:-1]) if count >= rank), len(buckets) - 1
        )
        if index == len(buckets) - 1:
            return buckets[-2][0] if len(buckets) > 1 else None
        end, count = buckets[index]
        start, below = (0.0, 0) if index == 0 else buckets[index - 1]
        if index == 0 and end <= 0:
            return end
        if count == below:  # rank 0 in an empty bucket (quantile 0): nothing to interpolate
            return start
        return start + (end - start) * (rank - below) / (count - below)


@dataclass(frozen=True)
class Sample:
    """One history entry: Redis time (ms) and the totals it copied then."""

    t_ms: int
    totals: Mapping[str, int]


@dataclass(frozen=True)
class Consumer:
    """One registered consumer: its in-flight tasks and whether its process has a heartbeat."""

    consumer_id: str
    in_flight: int
    alive: bool


@dataclass(frozen=True)
class RedisPanel:
    """What the dashboard shows about Redis (never its password)."""

    address: str
    embedded: bool
    up: bool
    used_memory_bytes: int | None = None
    version: str | None = None


@dataclass(frozen=True)
class ClusterStats:
    """One reading of the cluster: queue counts, metric totals, workers, Redis, history.

    ``now_s`` is Redis's clock (every process's timestamps in Redis are on
    it, whichever host it runs on). ``history`` is oldest first.
    """

    now_s: float
    pending: int
    suspects: int
    processing: int
    delayed: int
    dead: int
    oldest_pending_age_s: float | None
    metrics: Mapping[str, int]
    workers_seen: Sequence[Mapping[str, Any]]
    consumers: Sequence[Consumer]
    redis: RedisPanel
    history: Sequence[Sample] = field(default_factory=tuple)

    def counter(self, name: str, labels: Labels = ()) -> int:
        """A counter's total (0 if nothing counted it yet)."""
        return int(self.metrics.get(name + "".join(f"|{k}={v}" for k, v in labels), 0))

    def series(self, name: str) -> dict[Labels, int]:
        """Every label set of counter ``name`` and its total."""
        out: dict[Labels, int] = {}
        for key, value in self.metrics.items():
            found, labels = parse_field(key)
            if found == name and labels:
                out[labels] = int(value)
        return out

    def histograms(self, name: str) -> dict[Labels, Histogram]:
        """Every label set of histogram ``name`` (``()`` always among them)."""
        label_sets: set[Labels] = {()}
        for key in self.metrics:
            found, labels = parse_field(key)
            if found in (f"{name}_bucket", f"{name}_count", f"{name}_sum_us"):
                label_sets.add(tuple(pair for pair in labels if pair[0] != "le"))
        if len(label_sets) > 1:
            label_sets.discard(())  # a labelled histogram has no unlabelled series
        return {labels: Histogram.from_fields(self.metrics, name, labels) for labels in label_sets}

    def workers(self) -> list[dict[str, Any]]:
        """Processes seen within WORKER_GONE_AFTER_S, with their uptime (by Redis time)."""
        now_ms = self.now_s * 1000
        live = []
        for entry in self.workers_seen:
            if now_ms - entry["seen_at"] > WORKER_GONE_AFTER_S * 1000:
                continue
            live.append(
                {
                    "process_id": entry["process_id"],
                    "host": entry["host"],
                    "pid": entry["pid"],
                    "started_at": entry["started_at"],
                    "uptime_s": round(max(0.0, self.now_s - entry["started_at"]), 3),
                    "restarts": entry["restarts"],
                    "in_flight": entry["in_flight"],
                    "connections": entry["connections"],
                    "waiters": entry.get("waiters", 0),
                }
            )
        return sorted(live, key=lambda w: (w["host"], w["process_id"]))

    def processes(self) -> dict[str, dict[str, Any]]:
        """Tasks in flight per consumer, grouped by process, and whether it has a heartbeat."""
        out: dict[str, dict[str, Any]] = {}
        for consumer in sorted(self.consumers, key=lambda c: c.consumer_id):
            process = out.setdefault(
                process_of(consumer.consumer_id), {"alive": consumer.alive, "processing": {}}
            )
            process["processing"][consumer.consumer_id] = consumer.in_flight
        return out

    def throughput(self) -> list[dict[str, float]]:
        """Completed and failed per second between consecutive history samples, oldest first."""
        points = []
        for before, after in zip(self.history, self.history[1:], strict=False):
            seconds = (after.t_ms - before.t_ms) / 1000
            if seconds <= 0:
                continue
            rates = {
                f"{what}_per_s": round(
                    _increase(before.totals.get(name, 0), after.totals.get(name, 0)) / seconds, 3
                )
                for what, name in (("completed", "tasks_completed"), ("failed", "tasks_failed"))
            }
            points.append({"t": after.t_ms / 1000, **rates})
        return points

    def latency(self, name: str, window_s: float = LATENCY_WINDOW_S) -> Histogram | None:
        """Histogram ``name``'s observations over the last ``window_s`` of history.

        From the newest sample back to the newest one at least ``window_s``
        older (the oldest, while the history is shorter); None without two samples.
        """
        if len(self.history) < 2:
            return None
        newest = self.history[-1]
        earlier = self.history[0]
        for sample in self.history:
            if newest.t_ms - sample.t_ms >= window_s * 1000:
                earlier = sample
        return Histogram.from_fields(newest.totals, name).since(
            Histogram.from_fields(earlier.totals, name)
        )

    def overview(self, *, read_only: bool = False, tiers: Sequence[str] = ()) -> dict[str, Any]:
        """The dashboard's overview document (the contract's section 3); admin prints it too.

        ``rate_limited`` has every tier that refused a request, and ``tiers``
        (the configured ones, shown with 0 before their first refusal).
        """

        def percentiles(name: str) -> dict[str, float | None]:
            window = self.latency(name)
            return {
                f"p{round(q * 100)}": None if window is None else _rounded(window.quantile(q))
                for q in (0.5, 0.95)
            }

        return {
            "now": self.now_s,
            "queue": {
                "pending": self.pending,
                "processing": self.processing,
                "delayed": self.delayed,
                "dead": self.dead,
                "suspects": self.suspects,
                "oldest_pending_age_s": self.oldest_pending_age_s,
            },
            "totals": {shown: self.counter(name) for shown, name in TOTALS.items()},
            "rate_limited": {
                **dict.fromkeys(tiers, 0),
                **{
                    dict(labels).get("tier", ""): n
                    for labels, n in sorted(self.series("rate_limited").items())
                },
            },
            "latency": {
                "window_s": LATENCY_WINDOW_S,
                "wait": percentiles("task_wait_seconds"),
                "run": percentiles("task_duration_seconds"),
            },
            "throughput": self.throughput(),
            "workers": self.workers(),
            "redis": {
                "address": self.redis.address,
                "embedded": self.redis.embedded,
                "up": self.redis.up,
                "used_memory_bytes": self.redis.used_memory_bytes,
                "version": self.redis.version,
            },
            "read_only": read_only,
        }


async def read_stats(
    redis: Any,
    keys: Keys,
    clock: IReactorTime,
    timeout_s: float,
    *,
    redis_label: str,
    embedded: bool,
    history: bool = False,
) -> ClusterStats:
    """The cluster's numbers now; RedisUnavailable if Redis does not answer within ``timeout_s``.

    One script call, and ``INFO server`` and ``INFO memory`` sent alongside
    it (an INFO that Redis refuses, renamed away by a provider, only leaves
    the memory and version unknown).
    """
    script_keys = [
        keys.pending,
        keys.suspects,
        keys.dead,
        keys.delayed,
        keys.consumers,
        keys.metrics,
        keys.workers,
        keys.metrics_history,
    ]
    prefixes = [keys.processing(""), keys.heartbeat(""), HISTORY_ENTRIES if history else 0]
    calls = [
        READ_STATS(redis, script_keys, prefixes),
        redis.execute_command("INFO", "server"),
        redis.execute_command("INFO", "memory"),
    ]
    for call in calls:  # all three are on their way: one deadline for each, from now
        call.addTimeout(timeout_s, clock)
    try:
        reply = await within(calls[0], timeout_s, clock)
        info = _parse_info(await _optional(calls[1], timeout_s, clock))
        info.update(_parse_info(await _optional(calls[2], timeout_s, clock)))
    finally:
        for call in calls:  # an unread failure after ours is no news
            call.addErrback(lambda _: None)
    return _stats(reply, info, redis_label, embedded)


# ---------------------------------------------------------------- reply parsing


def _stats(
    reply: Sequence[Any], info: Mapping[str, str], label: str, embedded: bool
) -> ClusterStats:
    pending, suspects, dead, delayed, oldest, (seconds, micros), metrics, workers = reply[:8]
    flat, history = reply[8], reply[9]
    now_s = int(seconds) + int(micros) / 1_000_000
    consumers = [
        Consumer(str(flat[i]), int(flat[i + 1]), bool(int(flat[i + 2])))
        for i in range(0, len(flat), 3)
    ]
    memory = info.get("used_memory")
    return ClusterStats(
        now_s=now_s,
        pending=int(pending),
        suspects=int(suspects),
        processing=sum(c.in_flight for c in consumers),
        delayed=int(delayed),
        dead=int(dead),
        oldest_pending_age_s=_age(oldest, now_s),
        metrics={str(k): int(v) for k, v in _pairs(metrics)},
        workers_seen=list(_workers(_pairs(workers))),
        consumers=consumers,
        redis=RedisPanel(
            address=label,
            embedded=embedded,
            up=True,
            used_memory_bytes=int(memory) if memory is not None and memory.isdigit() else None,
            version=info.get("valkey_version") or info.get("redis_version"),
        ),
        history=list(reversed([s for s in map(_sample, history or []) if s is not None])),
    )


async def _optional(call: defer.Deferred[Any], timeout_s: float, clock: IReactorTime) -> str:
    """An INFO reply, or "" if Redis refused the command (unavailability still raises)."""
    try:
        return str(await within(call, timeout_s, clock))
    except txredisapi.ResponseError:
        return ""


def _parse_info(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        name, colon, value = line.partition(":")
        if colon and not name.startswith("#"):
            out[name.strip()] = value.strip()
    return out


def _pairs(flat: Sequence[Any] | None) -> Iterable[tuple[Any, Any]]:
    flat = flat or []
    return zip(flat[::2], flat[1::2], strict=True)


def _workers(entries: Iterable[tuple[Any, Any]]) -> Iterable[dict[str, Any]]:
    """The workers hash's entries that parse (one bad entry hides only itself)."""
    for _, raw in entries:
        try:
            entry = json.loads(raw)
            yield {
                "process_id": str(entry["process_id"]),
                "host": str(entry["host"]),
                "pid": int(entry["pid"]),
                "started_at": float(entry["started_at"]),
                "restarts": int(entry["restarts"]),
                "in_flight": int(entry["in_flight"]),
                "connections": int(entry["connections"]),
                # An entry from a version before the gauge: it holds none we know of.
                "waiters": int(entry.get("waiters", 0)),
                "seen_at": int(entry["seen_at"]),
            }
        except (ValueError, TypeError, KeyError):
            continue


def _sample(raw: Any) -> Sample | None:
    try:
        entry = json.loads(raw)
        return Sample(int(entry["t"]), {str(k): int(v) for k, v in entry["c"].items()})
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def _age(oldest: Any, now_s: float) -> float | None:
    """Seconds since the oldest pending task was due (None if none, or unreadable)."""
    if not oldest:
        return None
    try:
        queued_at = Task.from_json(str(oldest)).due_at
        queued_s = datetime.fromisoformat(queued_at.replace("Z", "+00:00")).timestamp()
    except (MalformedTask, ValueError):
        return None
    return round(max(0.0, now_s - queued_s), 3)


def _increase(before: int, after: int) -> int:
    """How much a total grew; a total that went down was reset, and grew by all it is now."""
    return after - before if after >= before else after


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)
