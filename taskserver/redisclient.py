# -*- test-case-name: tests.test_queue -*-
"""Redis connection pools and the deadline every request-path call gets.

txredisapi waits silently for a connection while Redis is down and has no
reply timeout by default, so every call that a client waits on goes through
:func:`within`: it either answers within the deadline or raises
:class:`RedisUnavailable`, which the web layer turns into a 503.
"""

from __future__ import annotations

from typing import Any, TypeVar

import txredisapi
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.ssl import optionsForClientTLS

from taskserver.config import RedisAddress

T = TypeVar("T")

#: Reconnect quickly after an outage: a consumer should be fetching again
#: within a couple of seconds of Redis coming back, not txredisapi's 10 s.
RECONNECT_INITIAL_DELAY_S = 0.1
RECONNECT_MAX_DELAY_S = 0.5
CONNECT_TIMEOUT_S = 2

#: Redis error replies that mean "cannot serve now", not "your command is wrong".
_UNAVAILABLE_REPLIES = (
    "OOM",
    "LOADING",
    "READONLY",
    "MASTERDOWN",
    "BUSY",
    "TRYAGAIN",
    "CLUSTERDOWN",
)


class RedisUnavailable(Exception):
    """Redis did not answer within the deadline, the connection failed, or it refused to serve."""


def connect(address: RedisAddress, poolsize: int, reply_timeout_s: float | None) -> Any:
    """A lazy, reconnecting txredisapi pool (the handler is usable at once).

    ``reply_timeout_s`` bounds every non-blocking command; blocking pops are
    exempt in txredisapi and use their own finite pop timeout instead.
    Numbers are not converted: a task id ``"42"`` must stay a string.
    """
    tls: Any = optionsForClientTLS(address.host) if address.tls else False
    handler = txredisapi.lazyConnectionPool(
        host=address.host,
        port=address.port,
        dbid=address.db or None,
        poolsize=poolsize,
        reconnect=True,
        charset="utf-8",
        password=address.password,
        username=address.username,
        ssl_context_factory=tls,
        connectTimeout=CONNECT_TIMEOUT_S,
        replyTimeout=reply_timeout_s,
        convertNumbers=False,
    )
    factory = handler._factory
    factory.initialDelay = RECONNECT_INITIAL_DELAY_S
    factory.maxDelay = RECONNECT_MAX_DELAY_S
    return handler


def is_unavailable(error: BaseException) -> bool:
    """True for failures that mean Redis cannot serve right now.

    Not CancelledError: that is the caller giving up (a client that went
    away), and must stay a cancellation so that nobody answers a 503 to a
    closed connection.
    """
    if isinstance(error, txredisapi.ConnectionError | defer.TimeoutError):
        return True
    if isinstance(error, txredisapi.ResponseError):
        return str(error).startswith(_UNAVAILABLE_REPLIES)
    return False


def describe(error: BaseException, seconds: float) -> str:
    """What went wrong, in words an operator reads in a log (not ``(1.0, 'Deferred')``)."""
    if isinstance(error, defer.TimeoutError | txredisapi.TimeoutError):
        return f"Redis did not answer within {float(seconds)} s"
    if isinstance(error, txredisapi.ConnectionError):
        return f"no working connection to Redis ({str(error) or type(error).__name__})"
    return f"Redis cannot serve now: {error}"


async def within(d: defer.Deferred[T], seconds: float, clock: IReactorTime) -> T:
    """Await ``d`` for at most ``seconds``; unavailability becomes RedisUnavailable."""
    d.addTimeout(seconds, clock)
    try:
        return await d
    except Exception as e:
        if is_unavailable(e):
            raise RedisUnavailable(describe(e, seconds)) from e
        raise
