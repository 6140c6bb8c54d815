"""Repeated warnings: the first at once, then one summary per window (on a Clock)."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent

from taskserver.logthrottle import WarningThrottle


def throttle_on_a_clock() -> tuple[WarningThrottle, Clock, list[str]]:
    clock, lines = Clock(), []
    log = Logger(observer=lambda event: lines.append(formatEvent(event)))
    return WarningThrottle(log, clock, window_s=10.0), clock, lines


def test_repeated_warnings_are_summarised_once_per_window() -> None:
    throttle, clock, lines = throttle_on_a_clock()
    for _ in range(500):
        throttle.warn("Redis did not answer within 1.0 s")
    throttle.warn("something else")
    assert lines == ["Redis did not answer within 1.0 s", "something else"]
    clock.advance(9.9)
    throttle.warn("Redis did not answer within 1.0 s")
    assert len(lines) == 2, "still counting"
    clock.advance(0.1)
    assert lines[2:] == ["Redis did not answer within 1.0 s (500 more in the last 10 s)"]
    throttle.warn("Redis did not answer within 1.0 s")
    clock.advance(10)
    assert lines[3:] == ["Redis did not answer within 1.0 s (1 more in the last 10 s)"]
    clock.advance(10)  # a quiet window: the warning is forgotten
    assert len(lines) == 4 and not clock.getDelayedCalls()
    throttle.warn("Redis did not answer within 1.0 s")
    assert lines[4:] == ["Redis did not answer within 1.0 s"], "new again: written at once"
