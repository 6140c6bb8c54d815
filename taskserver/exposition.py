# -*- test-case-name: tests.test_exposition -*-
"""``GET /metrics``'s text: one :class:`ClusterStats` as Prometheus metric families.

The numbers are the cluster's (read from Redis by :func:`taskserver.stats.read_stats`),
so every child answers the same, and prometheus_client writes the text: a
custom collector on a fresh registry per scrape, nothing kept between scrapes.
When Redis does not answer, the scrape still succeeds with
``taskserver_redis_up 0`` alone, as exporters do: a failed scrape would
look like taskserver being down, and the counters are not known then.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from taskserver.stats import ClusterStats, Histogram

PREFIX = "taskserver_"

#: Unlabelled counters: metric name in Redis -> HELP.
COUNTERS = {
    "tasks_enqueued": "Tasks accepted into the queue.",
    "tasks_completed": "Task attempts that ended without an error.",
    "tasks_failed": "Task attempts that raised or timed out.",
    "tasks_retried": "Failed attempts whose task will run again.",
    "tasks_dead": "Tasks moved to the dead-letter list.",
    "tasks_reclaimed": "Tasks returned to the queue from a consumer whose process died.",
    "tasks_cancelled": "Queued or scheduled tasks cancelled (DELETE), each once.",
    "worker_restarts": "Cluster children restarted by their master.",
    "task_log_write_errors": "Failed attempts to write the task log (its lines are kept, retried).",
}
#: Histograms: name -> (HELP, label names).
HISTOGRAMS = {
    "http_request_duration_seconds": ("Time to answer an HTTP request, per route.", ("route",)),
    "task_duration_seconds": ("Handler run time of one task attempt.", ()),
    "task_wait_seconds": (
        "Time from queued (a delayed task: due) to the first attempt's start.",
        (),
    ),
}
#: taskserver_queue_tasks' states, in the order shown.
QUEUE_STATES = ("pending", "processing", "delayed", "dead", "suspects")


def exposition(stats: ClusterStats | None) -> bytes:
    """The text of a scrape (``None``: Redis did not answer)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(stats))
    return generate_latest(registry)


class StatsCollector:
    """A prometheus_client collector over one reading of the cluster."""

    def __init__(self, stats: ClusterStats | None) -> None:
        self._stats = stats

    def describe(self) -> list[Metric]:
        return []  # names are not checked against other collectors: there are none

    def collect(self) -> Iterator[Metric]:
        stats = self._stats
        up = GaugeMetricFamily(
            PREFIX + "redis_up", "1 if Redis answered this scrape, else 0 (and nothing else shown)."
        )
        up.add_metric([], 0 if stats is None else 1)
        yield up
        if stats is None:
            return
        for name, help_text in COUNTERS.items():
            yield CounterMetricFamily(PREFIX + name, help_text, value=stats.counter(name))
        yield self._labelled(
            "rate_limited",
            "Requests refused per rate-limit tier (named as in RateLimit-Policy; ip: per address).",
            ("tier",),
        )
        yield self._labelled(
            "http_requests", "HTTP requests answered, per route and status code.", ("route", "code")
        )
        for name, (help_text, label_names) in HISTOGRAMS.items():
            yield self._histogram(name, help_text, label_names)
        queue = GaugeMetricFamily(
            PREFIX + "queue_tasks",
            "Tasks per state now (delayed: retries and scheduled tasks; suspects: waiting to run"
            " alone after their process died).",
            labels=["state"],
        )
        for state in QUEUE_STATES:
            queue.add_metric([state], getattr(stats, state))
        yield queue
        yield GaugeMetricFamily(
            PREFIX + "queue_oldest_age_seconds",
            "Age of the oldest pending task, from its run_at if delayed (0 when none is pending).",
            value=stats.oldest_pending_age_s or 0.0,
        )
        yield GaugeMetricFamily(
            PREFIX + "workers",
            "Cluster children that reported within the last 10 s.",
            value=len(stats.workers()),
        )
        yield GaugeMetricFamily(
            PREFIX + "waiters",
            "Open GET /api/v1/task/<id>?wait= requests, summed over those children (as of"
            " each one's last report, once a second; a child that died counts its last"
            " report until it is forgotten, 10 s on).",
            value=sum(worker["waiters"] for worker in stats.workers()),
        )

    def _labelled(self, name: str, help_text: str, label_names: tuple[str, ...]) -> Metric:
        assert self._stats is not None
        family = CounterMetricFamily(PREFIX + name, help_text, labels=label_names)
        for labels, total in sorted(self._stats.series(name).items()):
            values = dict(labels)
            family.add_metric([values.get(label, "") for label in label_names], total)
        return family

    def _histogram(self, name: str, help_text: str, label_names: tuple[str, ...]) -> Metric:
        assert self._stats is not None
        family = HistogramMetricFamily(PREFIX + name, help_text, labels=label_names)
        for labels, histogram in sorted(self._stats.histograms(name).items()):
            if label_names and not labels:
                continue  # nothing observed yet: no series (its labels are unknown)
            values = dict(labels)
            family.add_metric(
                [values.get(label, "") for label in label_names],
                _buckets(histogram),
                histogram.sum_s,
            )
        return family


def _buckets(histogram: Histogram) -> list[tuple[str, float]]:
    return [(floatToGoString(bound), count) for bound, count in histogram.cumulative()]
