# -*- test-case-name: tests.test_supervisor -*-
"""The one crash-loop back-off of the master: for children and for the embedded Redis.

A process that dies after it was serving is restarted at once; one that
dies before it was ready (a broken build, a port taken by someone else)
is restarted after a delay that doubles with each failure in a row, so a
crash loop cannot spin the CPU or flood the log.
"""

from __future__ import annotations

FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0


def backoff_delay(failures: int) -> float:
    """Seconds to wait before the next start after ``failures`` failed starts in a row."""
    if failures <= 0:
        return 0.0
    return min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** min(failures - 1, 32))
