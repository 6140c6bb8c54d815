# -*- test-case-name: tests.test_metrics -*-
"""Counting in process, and flushing the counts to Redis once a second.

Every process keeps a :class:`Tally`: counters and histograms that cost a
dict increment on the path they measure. A :class:`MetricsFlusher` adds what
was counted since its last successful flush to the cluster's totals in Redis
(``keys.metrics``, HINCRBY only), in one script call per second, so the
totals are the whole cluster's whichever process reads them, and never go
down when a process restarts: a SIGKILLed process loses at most its last
second of counts. A flush that fails (Redis away, or no answer in time) is
sent again, the same batch under the same number, until Redis answers: the
script applies each batch of a process once, so a batch Redis applied whose
answer was lost is not counted twice.

A field of ``keys.metrics`` is the metric's name (without the ``taskserver_``
prefix and the ``_total`` suffix) and its labels, sorted:
``http_requests|code=202|route=/api/v1/task``. A histogram is three kinds of
field: ``<name>_bucket[|labels]|le=<bound>`` (observations in that bucket
only, not cumulative), ``<name>_count[|labels]`` and ``<name>_sum_us[|labels]``
(the sum in integer microseconds). Buckets nothing fell into are not written.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from taskserver.config import Settings
from taskserver.keys import Keys
from taskserver.logthrottle import WarningThrottle
from taskserver.redisclient import within
from taskserver.scripts import load

#: KEYS: metrics, workers, history, sampled, applied. ARGV: see lua/add_metrics.lua.
ADD_METRICS = load("add_metrics")

#: Upper bounds (seconds) of the duration histograms' buckets; a last one, ``+Inf``, follows.
DURATION_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)
#: How each bucket's bound is written in its field: ``repr(float)``, then ``+Inf``.
BUCKET_LABELS = (*(repr(bound) for bound in DURATION_BUCKETS), "+Inf")

FLUSH_EVERY_S = 1.0
#: History: one sample per this many ms cluster-wide (a little under 5 s, so a
#: flush every second always finds the previous sample's marker expired by the 5th).
SAMPLE_EVERY_MS = 4900
HISTORY_LENGTH = 180
#: A workers entry not refreshed for this long is removed (its process died).
WORKER_FORGOTTEN_AFTER_MS = 60_000
#: How long the script remembers the last batch number it applied for a process
#: (refreshed by each flush): a batch re-sent after a silence longer than this
#: would be counted again, so it is far longer than any Redis outage we ride out.
APPLIED_FORGOTTEN_AFTER_MS = 3_600_000

#: Counter names (fields without labels).
TASKS_ENQUEUED = "tasks_enqueued"
TASKS_COMPLETED = "tasks_completed"
TASKS_FAILED = "tasks_failed"
TASKS_RETRIED = "tasks_retried"
TASKS_DEAD = "tasks_dead"
TASKS_RECLAIMED = "tasks_reclaimed"
TASKS_CANCELLED = "tasks_cancelled"
WORKER_RESTARTS = "worker_restarts"
#: Failed attempts to write the task log (each retry that fails counts again).
TASK_LOG_WRITE_ERRORS = "task_log_write_errors"
#: Histogram names.
TASK_DURATION = "task_duration_seconds"
TASK_WAIT = "task_wait_seconds"
HTTP_DURATION = "http_request_duration_seconds"
HTTP_REQUESTS = "http_requests"
RATE_LIMITED = "rate_limited"
#: The tier every per-address limit counts as.
IP_TIER = "ip"
#: The code a request is counted with when its connection closed before its
#: answer (nginx's "client closed request"); no answer carries it.
CLIENT_CLOSED_REQUEST = 499


def configured_tiers(settings: Settings) -> list[str]:
    """The tiers a refusal can be counted under, as configured: what ``rate_limited`` shows
    (with 0 before a tier's first refusal) in admin ``stats`` and the dashboard alike."""
    return [tier.name for tier in settings.rate_limits] + (
        [IP_TIER] if settings.ip_rate_limits else []
    )


def field(name: str, labels: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> str:
    """The field of ``name`` with ``labels``: ``name|k1=v1|k2=v2``, labels sorted by name."""
    pairs = labels.items() if isinstance(labels, Mapping) else labels
    return name + "".join(f"|{k}={v}" for k, v in sorted(pairs))


#: Paths that are a route of their own, as their label.
_ROUTES = {
    path.encode("ascii"): path
    for path in (
        "/api/v1/task",
        "/api/v1/tasks",
        "/healthz",
        "/readyz",
        "/kill",
        "/metrics",
        "/dashboard",
        "/",
    )
}
_ROUTES[b"/openapi.json"] = "/openapi.json"
_ROUTES[b"/api/v1/tasks"] = "/api/v1/tasks"
_TASK_PREFIX = b"/api/v1/task/"
_DASHBOARD_PREFIX = b"/dashboard/"


def route_label(method: bytes | str, path: bytes | str) -> str:
    """The route a request's path belongs to, from a fixed set (``other`` for the rest).

    Bounded whatever clients send: task ids and unknown paths never become
    labels. The method does not split a route (a 405 says so in its code).
    """
    if isinstance(path, str):
        path = path.encode("utf-8", "surrogateescape")
    label = _ROUTES.get(path)
    if label is not None:
        return label
    if path.startswith(_TASK_PREFIX):
        rest = path[len(_TASK_PREFIX) :]
        return "/api/v1/task/{task_id}" if rest and b"/" not in rest else "other"
    if path.startswith(_DASHBOARD_PREFIX):
        return "/dashboard"
    return "other"


class Histogram:
    """One histogram series: per-bucket counts, the count and the sum (in microseconds)."""

    __slots__ = ("_bucket_fields", "_count_field", "_sum_field", "buckets", "count", "sum_us")

    def __init__(self, name: str, labels: str = "") -> None:
        """``labels`` is the encoded label part, ``|k=v...`` (``""`` for none)."""
        self._bucket_fields = tuple(f"{name}_bucket{labels}|le={bound}" for bound in BUCKET_LABELS)
        self._count_field = f"{name}_count{labels}"
        self._sum_field = f"{name}_sum_us{labels}"
        self.buckets = [0] * len(BUCKET_LABELS)
        self.count = 0
        self.sum_us = 0

    def observe(self, seconds: float) -> None:
        """Count one observation; a negative one (clocks of two hosts) counts as 0."""
        if seconds < 0:
            seconds = 0.0
        # previous bound < seconds <= bound; past the last bound, +Inf.
        self.buckets[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.count += 1
        self.sum_us += round(seconds * 1_000_000)

    def take(self, into: dict[str, int]) -> None:
        """Add the counts to ``into`` (by field) and start again from zero."""
        if not self.count:
            return
        for name, n in zip(self._bucket_fields, self.buckets, strict=True):
            if n:
                into[name] = into.get(name, 0) + n
        into[self._count_field] = into.get(self._count_field, 0) + self.count
        into[self._sum_field] = into.get(self._sum_field, 0) + self.sum_us
        self.buckets = [0] * len(BUCKET_LABELS)
        self.count = 0
        self.sum_us = 0


class Tally:
    """The counts of one process since they were last taken (by its flusher).

    Cheap on purpose: counting is a dict increment, an observation a bisect
    and three additions; field names are built once per series.
    """

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._histograms: dict[str, Histogram] = {}
        self._request_fields: dict[tuple[str, int], str] = {}
        self._route_histograms: dict[str, Histogram] = {}

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to the counter ``name`` (a field: the name and its encoded labels)."""
        self._counts[name] = self._counts.get(name, 0) + n

    def rate_limited(self, tier: str) -> None:
        """A request refused by ``tier`` (its RateLimit-Policy name, or :data:`IP_TIER`)."""
        self.count(f"{RATE_LIMITED}|tier={tier}")

    def observe(self, name: str, seconds: float) -> None:
        """One observation of the unlabelled histogram ``name``."""
        histogram = self._histograms.get(name)
        if histogram is None:
            histogram = self._histograms[name] = Histogram(name)
        histogram.observe(seconds)

    def request(self, route: str, code: int, seconds: float | None = None) -> None:
        """One answered HTTP request: ``http_requests{code,route}`` and its duration (if timed)."""
        key = (route, code)
        counter = self._request_fields.get(key)
        if counter is None:
            counter = self._request_fields[key] = field(
                HTTP_REQUESTS, {"code": str(code), "route": route}
            )
        self._counts[counter] = self._counts.get(counter, 0) + 1
        if seconds is None:
            return
        histogram = self._route_histograms.get(route)
        if histogram is None:
            histogram = self._route_histograms[route] = Histogram(HTTP_DURATION, f"|route={route}")
        histogram.observe(seconds)

    def has_counts(self) -> bool:
        """Has anything been counted since the last take?"""
        return any(self._counts.values()) or any(
            h.count for h in (*self._histograms.values(), *self._route_histograms.values())
        )

    def take(self) -> dict[str, int]:
        """Every field's count since the last take (non-zero ones only), and start again."""
        taken = {name: n for name, n in self._counts.items() if n}
        self._counts = {}
        for histogram in (*self._histograms.values(), *self._route_histograms.values()):
            histogram.take(taken)
        return taken


class MetricsFlusher(Service):
    """Adds a Tally's counts to the totals in Redis every second, and once at a stop.

    One script call per flush (lua/add_metrics.lua) carries a batch: every
    delta counted since the batch before was applied, numbered per process.
    A batch that failed or got no answer in time is sent again as it is,
    under its number, until Redis answers; counts made meanwhile wait for the
    next batch. Redis may have applied a call whose answer was lost: the
    script skips a number it has already applied, so a total is never counted
    twice. Flushes never overlap (the loop's, the master's own, the last one):
    each waits for the one before. Failures are logged through a
    WarningThrottle, not once a second.
    """

    log = Logger()

    def __init__(
        self,
        tally: Tally,
        redis: Callable[[], Any],
        keys: Keys,
        clock: IReactorTime,
        timeout_s: float,
        *,
        worker_id: str | None = None,
        worker: Callable[[], dict[str, Any]] | None = None,
        every_s: float = FLUSH_EVERY_S,
        flushed: Callable[[], None] = lambda: None,
    ) -> None:
        """``redis()`` gives the connection to flush on, or None to skip a flush (kept for later).

        It is called only when there is something to send. ``worker_id`` and
        ``worker()`` (the entry's fields but ``seen_at``) make each flush
        write this process's workers entry; a clean stop removes it. The
        master has none. ``flushed()`` is called after each flush Redis
        answered.
        """
        self._tally = tally
        self._redis = redis
        self._keys = keys
        self._clock = clock
        self._timeout_s = timeout_s
        self._worker_id = worker_id
        self._worker = worker
        self._every_s = every_s
        self._flushed = flushed
        #: Where the script keeps the number of this process's last applied batch.
        self._applied_key = keys.metrics_applied(uuid.uuid4().hex)
        #: The batch sent and not acknowledged yet, and its number.
        self._batch: dict[str, int] | None = None
        self._seq = 0
        self._lock = defer.DeferredLock()
        self._loop: task.LoopingCall | None = None
        self._looping: defer.Deferred[Any] | None = None
        self._warnings = WarningThrottle(self.log, clock)

    def has_unsent(self) -> bool:
        """Are there counts that Redis does not have yet (a batch on its way included)?"""
        return self._batch is not None or self._tally.has_counts()

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(lambda: defer.Deferred.fromCoroutine(self.flush()))
        self._loop.clock = self._clock
        self._looping = self._loop.start(self._every_s, now=False)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        """Stop the loop; the last flush waits for the flushes under way (each bounded)."""
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        if self._looping is not None:
            await self._looping
            self._looping = None
        await self.flush(final=True)

    async def flush(self, final: bool = False) -> bool:
        """Send the batch not yet acknowledged, or a new one; True if Redis has every count.

        ``final``: the process stops cleanly, so its workers entry goes.
        """
        await self._lock.acquire()
        try:
            resending = self._batch is not None
            if not await self._send(final):
                return False
            if resending and self._tally.has_counts() and not await self._send(final):
                return False  # the counts that waited for the re-sent batch, now
        finally:
            self._lock.release()
        self._flushed()
        return True

    async def _send(self, final: bool) -> bool:
        """Send one batch (a new one unless one awaits its answer); True once Redis has it."""
        if self._batch is None and not self._tally.has_counts() and self._worker_id is None:
            return True
        redis = self._redis()
        if redis is None:
            return False  # no batch taken: later counts join this one
        if self._batch is None:
            self._batch = self._tally.take()
            self._seq += 1
        args: list[Any] = [
            self._worker_id or "",
            "" if final or self._worker is None else json.dumps(self._worker()),
            HISTORY_LENGTH,
            SAMPLE_EVERY_MS,
            WORKER_FORGOTTEN_AFTER_MS,
            self._seq,
            APPLIED_FORGOTTEN_AFTER_MS,
        ]
        for name, n in self._batch.items():
            args += [name, n]
        keys = self._keys
        try:
            await within(
                ADD_METRICS(
                    redis,
                    [
                        keys.metrics,
                        keys.workers,
                        keys.metrics_history,
                        keys.metrics_sampled,
                        self._applied_key,
                    ],
                    args,
                ),
                self._timeout_s,
                self._clock,
            )
        except Exception as e:
            self._warnings.warn(f"could not add metrics to Redis (sent again next time): {e}")
            return False
        self._batch = None
        return True


def worker_entry(
    process_id: str,
    started_at: float,
    restarts: int,
    in_flight: int,
    connections: int,
    waiters: int,
) -> dict[str, Any]:
    """A child's workers entry, but ``seen_at`` (the flush script adds Redis's time).

    ``waiters``: its open ``?wait=`` requests (:attr:`taskserver.waiters.Waiters.count`),
    summed over the live entries as ``taskserver_waiters``.
    """
    return {
        "process_id": process_id,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started_at": started_at,
        "restarts": restarts,
        "in_flight": in_flight,
        "connections": connections,
        "waiters": waiters,
    }
