"""within(): a deadline on a Clock, and failures said in words (what the 503's log line says)."""

from __future__ import annotations

import pytest
import txredisapi
from twisted.internet import defer
from twisted.internet.task import Clock

from taskserver.redisclient import RedisUnavailable, within


@pytest.mark.parametrize(
    ("error", "text"),
    [
        (defer.TimeoutError(1.0, "Deferred"), "Redis did not answer within 1 s"),
        (
            txredisapi.TimeoutError("Not received Redis response in 1.0 seconds"),
            "Redis did not answer within 1 s",
        ),
        (
            txredisapi.ConnectionError("Lost connection"),
            "no working connection to Redis (Lost connection)",
        ),
        (
            txredisapi.ResponseError("OOM command not allowed"),
            "Redis cannot serve now: OOM command not allowed",
        ),
    ],
)
def test_redis_failures_are_said_in_words(error: Exception, text: str) -> None:
    clock = Clock()
    d: defer.Deferred[None] = defer.Deferred()
    waiting = defer.ensureDeferred(within(d, 1.0, clock))
    d.errback(error)
    failure = waiting.result
    waiting.addErrback(lambda _: None)
    assert isinstance(failure.value, RedisUnavailable)
    assert str(failure.value) == text


def test_a_deadline_is_a_deadline() -> None:
    """No answer within the time: RedisUnavailable at that time, not later (Clock, not a wall)."""
    clock = Clock()
    waiting = defer.ensureDeferred(within(defer.Deferred(), 1.0, clock))
    clock.advance(0.999)
    assert not waiting.called
    clock.advance(0.001)
    failure = waiting.result
    waiting.addErrback(lambda _: None)
    assert str(failure.value) == "Redis did not answer within 1 s"
