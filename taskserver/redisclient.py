# -*- test-case-name: tests.test_queue -*-
"""Redis connection pools and the deadline every request-path call gets.

txredisapi waits silently for a connection while Redis is down and has no
reply timeout by default, so every call that a client waits on goes through
:func:`within`: it either answers within the deadline or raises
:class:`RedisUnavailable`, which the web layer turns into a 503.
"""

from __future__ import annotations

import socket
from typing import Any, TypeVar

import txredisapi
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LogEvent,
    Logger,
    PredicateResult,
)
from zope.interface import implementer

from taskserver.config import RedisAddress
from taskserver.sentinel import primary_pool

T = TypeVar("T")

#: Reconnect quickly after an outage: a consumer should be fetching again
#: within a couple of seconds of Redis coming back, not txredisapi's 10 s.
RECONNECT_INITIAL_DELAY_S = 0.1
RECONNECT_MAX_DELAY_S = 0.5
CONNECT_TIMEOUT_S = 2
#: How often :class:`RedisLinkWatch` asks Redis whether it is there.
LINK_CHECK_EVERY_S = 0.5
#: Twisted's ClientService (txredisapi's reconnecting slots) logs each retry as this.
RECONNECT_LOG_FORMAT = "Scheduling retry"
#: txredisapi logs this once per pooled connection it drops after an outage.
DEAD_CONNECTION_MESSAGE = ("Discarding dead connection.",)
#: txredisapi logs this when AUTH fails; with a password we retry, so it repeats per attempt.
AUTH_FAILED_PREFIX = "Redis error: could not auth"
#: ... and this when SELECT fails (REDIS_URL's database beyond the server's ``databases``).
SELECT_FAILED_PREFIX = "Redis error: could not set dbid"
#: ... and at most one line of each is written per this many seconds.
SETUP_REFUSED_LOG_EVERY_S = 60.0

#: Redis error replies that mean "cannot serve now", not "your command is wrong".
_UNAVAILABLE_REPLIES = (
    "OOM",
    "LOADING",
    "READONLY",
    "MASTERDOWN",
    "UNBLOCKED",
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
    With ``address.sentinels`` the pool follows the primary they name
    (taskserver/sentinel.py): every pool of every process is built here, so
    every one of them follows it.
    """
    if address.sentinels:
        handler, factories = primary_pool(address, poolsize, CONNECT_TIMEOUT_S, reply_timeout_s)
        for factory in factories:
            _mend(factory)
        return handler
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
    # txredisapi has no argument for its back-off: its documented class
    # attributes are set on the pool's factory, which the handler only holds
    # privately. This is the one place; tests/test_embedded.py breaks if it moves.
    _mend(handler._factory)
    return handler


class _PubSubMessages:
    """Mixed into a pool's protocol: Pub/Sub messages go to ``factory.on_message``.

    Every other reply (the SUBSCRIBE confirmation, ROLE, AUTH) goes to the
    reply queue as before, so the protocol's own set-up (Sentinel's ROLE check
    included) still works.
    """

    factory: Any
    transport: Any

    def connectionMade(self) -> None:
        keep_alive(self.transport)
        super().connectionMade()  # type: ignore[misc]

    def replyReceived(self, reply: Any) -> None:
        if isinstance(reply, list) and len(reply) == 3 and reply[0] == "message":
            self.factory.on_message(reply[1], reply[2])
            return
        super().replyReceived(reply)  # type: ignore[misc]


#: TCP keepalive of the subscriber: probes after this long silent, this often, this many.
KEEPALIVE_IDLE_S = 5
KEEPALIVE_INTERVAL_S = 2
KEEPALIVE_PROBES = 3


def keep_alive(transport: Any) -> None:
    """Have the kernel probe a connection that is silent, and drop it when no one answers.

    A subscriber writes nothing while it listens, so no reply timeout can tell
    it that its Redis vanished without closing the connection (a host powered
    off, a partition, a failover to a replica on another host): then the
    probes do, within about 11 s, and the pool reconnects (to the new primary).
    """
    try:
        handle = transport.getHandle()
        handle.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):  # Linux; elsewhere the system's own timings
            handle.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
            handle.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
            handle.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)
    except (AttributeError, OSError):  # not a TCP socket (a test's transport)
        pass


def connect_subscriber(address: RedisAddress, reply_timeout_s: float | None) -> Any:
    """A one-connection pool for SUBSCRIBE; each message goes to ``on_message(channel, text)``,
    an attribute of the factory returned, which its user sets (it drops them until then).

    Built by :func:`connect`, so it reconnects with the same back-off and, with
    ``address.sentinels``, follows the primary like every other pool. Returns
    the txredisapi factory: its ``getConnection(peek=True)`` waits for the
    connection, and its ``disconnect()`` closes it for good. The protocol class
    is swapped before the reactor can connect (connections are made in a later turn).
    """
    factory = connect(address, 1, reply_timeout_s)._factory
    base = factory.protocol
    factory.protocol = type(f"Subscribing{base.__name__}", (_PubSubMessages, base), {})
    factory.on_message = lambda channel, text: None
    return factory


def _mend(factory: Any) -> None:
    """A capped back-off, and retrying forever, on one txredisapi factory."""
    factory.initialDelay = RECONNECT_INITIAL_DELAY_S
    factory.maxDelay = RECONNECT_MAX_DELAY_S
    # txredisapi stops reconnecting for good when AUTH fails or times out
    # (RedisProtocol.connectionMade calls factory.stopTrying()). A refused
    # AUTH is what a client meets when another process holds the port
    # while the embedded Redis restarts, and a rotated password is fixed
    # without a restart: keep trying. Our own disconnect() does not go
    # through stopTrying. Same place, same test as the delays above.
    factory.stopTrying = _keep_trying


def _keep_trying() -> defer.Deferred[None]:
    return defer.succeed(None)


@implementer(ILogFilterPredicate)
class _NotAReconnectAttempt:
    """Says no to the per-attempt lines, maybe to everything else.

    A failed AUTH or SELECT is written, but at most once per
    SETUP_REFUSED_LOG_EVERY_S for each (by the events' own timestamps): it says
    why Redis is unreachable, and the pool retries it twice a second.
    """

    def __init__(self) -> None:
        self._failure_logged_at: dict[str, float] = {}

    def __call__(self, event: LogEvent) -> PredicateResult:
        namespace, format = str(event.get("log_namespace", "")), str(event.get("log_format", ""))
        if namespace.endswith(".ClientService") and format.startswith(RECONNECT_LOG_FORMAT):
            return PredicateResult.no
        message = event.get("message")
        if message == DEAD_CONNECTION_MESSAGE:
            return PredicateResult.no
        for prefix in (AUTH_FAILED_PREFIX, SELECT_FAILED_PREFIX):
            if message and str(message[0]).startswith(prefix):
                now = float(event.get("log_time", 0.0))
                last = self._failure_logged_at.get(prefix)
                if last is not None and now - last < SETUP_REFUSED_LOG_EVERY_S:
                    return PredicateResult.no
                self._failure_logged_at[prefix] = now
        return PredicateResult.maybe


def without_reconnect_attempts(observer: ILogObserver) -> ILogObserver:
    """``observer`` minus the lines logged per reconnect attempt (2 a second) and per connection.

    :class:`RedisLinkWatch` logs the changes of state instead.
    """
    return FilteringLogObserver(observer, [_NotAReconnectAttempt()])


class RedisLinkWatch(Service):
    """One log line when Redis stops answering, one when it answers again; nothing in between."""

    log = Logger()

    def __init__(
        self,
        redis: Any,
        clock: IReactorTime,
        timeout_s: float,
        every_s: float = LINK_CHECK_EVERY_S,
    ) -> None:
        self._redis = redis
        self._clock = clock
        self._timeout_s = timeout_s
        self._every_s = every_s
        self._loop: task.LoopingCall | None = None
        self.up = True

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(lambda: defer.Deferred.fromCoroutine(self.check()))
        self._loop.clock = self._clock
        self._loop.start(self._every_s, now=False)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        return defer.succeed(None)

    async def check(self) -> None:
        """Ping once; log if the answer changes the state."""
        try:
            await within(self._redis.ping(), self._timeout_s, self._clock)
        except RedisUnavailable as e:
            if self.up:
                self.up = False
                why = (
                    f"no answer within {self._timeout_s:g} s"
                    if isinstance(e.__cause__, defer.TimeoutError)
                    else str(e)
                )
                self.log.warn("Redis unreachable ({why}); waiting for it to come back", why=why)
        except Exception:
            self.log.failure("checking Redis")
        else:
            if not self.up:
                self.up = True
                self.log.info("Redis reachable again")


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
        return f"Redis did not answer within {seconds:g} s"
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
