# -*- test-case-name: tests.test_supervisor -*-
"""The one exponential back-off: crash loops in the master, Redis errors and task retries.

A process that dies after it was serving is restarted at once; one that
dies before it was ready (a broken build, a port taken by someone else)
is restarted after a delay that doubles with each failure in a row, so a
crash loop cannot spin the CPU or flood the log.
"""

from __future__ import annotations

FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0


def backoff_delay(
    failures: int, first_s: float = FIRST_BACKOFF_S, max_s: float = MAX_BACKOFF_S
) -> float:
    """Seconds to wait after ``failures`` failures in a row: 0, then first_s doubling up to max_s.

    The defaults are the master's (children, embedded Redis); the consumer
    passes its own bounds for Redis errors and for task retries (with jitter).
    """
    if failures <= 0:
        return 0.0
    return float(min(max_s, first_s * 2 ** min(failures - 1, 64)))
