# -*- test-case-name: tests.test_sentinel -*-
"""Pools that follow the primary that Redis Sentinel names (REDIS_SENTINELS).

txredisapi's ``Sentinel`` does the discovery and its
``SentinelConnectionFactory`` the pool; this mends what they lack:

- TLS and a connect timeout for the data nodes (txredisapi's own endpoint has
  no TLS and passes its back-off cap as the connect timeout), and TLS
  verified per sentinel host;
- a reply that says the node is no longer the primary (``READONLY``,
  ``UNBLOCKED`` on a blocking pop, ``LOADING``, ``MASTERDOWN``) closes that
  connection at once, so its slot asks the sentinels again on reconnecting
  (txredisapi only rediscovers when a connection is lost): the error still
  reaches its caller, which retries or answers 503;
- a ROLE check that cannot hang: a refused AUTH or ROLE closes the
  connection (txredisapi's leaves it open and never ready);
- a short discovery timeout, a capped back-off and retrying forever (a
  failed AUTH would stop txredisapi's reconnecting for good);
- one log line per change of primary per process, whatever the number of
  pools: when the primary is lost, and with the new primary's address.
"""

from __future__ import annotations

from typing import Any

import txredisapi
from twisted.internet import defer, reactor
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from taskserver.config import RedisAddress

#: Replies after which the connection's node is not (or not yet) a primary to write to.
NOT_THE_PRIMARY_REPLIES = ("READONLY", "UNBLOCKED", "LOADING", "MASTERDOWN")
#: Seconds a discovery waits for a sentinel to name a healthy primary.
#: Short: during a failover the sentinels name none for a second or two, and
#: each try after this one goes out after the (capped) reconnect back-off.
DISCOVERY_TIMEOUT_S = 0.5

_log = Logger(namespace="taskserver.sentinel")


class PrimaryLog:
    """What this process last knew of each primary; logs only the changes.

    Several pools (and their slots) discover at the same time: a discovery
    that started before the newest change and fails after it says nothing
    about the primary now, so :meth:`lost` takes the change count seen when
    the attempt began and ignores stale news.
    """

    def __init__(self) -> None:
        self._known: dict[str, tuple[str, int] | None] = {}
        self._changes: dict[str, int] = {}

    def changes(self, name: str) -> int:
        return self._changes.get(name, 0)

    def current(self, name: str) -> tuple[str, int] | None:
        return self._known.get(name)

    def found(self, name: str, address: tuple[str, int]) -> None:
        if self._known.get(name) == address:
            return
        self._known[name] = address
        self._changes[name] = self.changes(name) + 1
        host, port = address
        _log.info(
            "Redis primary of {name!r} is {host}:{port} (as the sentinels say)",
            name=name,
            host=host,
            port=port,
        )

    def lost(self, name: str, why: str, seen_changes: int | None = None) -> None:
        if self._known.get(name) is None:
            return
        if seen_changes is not None and seen_changes != self.changes(name):
            return
        self._known[name] = None
        self._changes[name] = self.changes(name) + 1
        _log.warn(
            "Redis primary of {name!r} lost ({why}); asking the sentinels until one is named",
            name=name,
            why=why,
        )


#: One per process: every pool of a child reports here.
primaries = PrimaryLog()


class PrimaryProtocol(txredisapi.SentinelRedisProtocol):
    """A connection to the primary that hangs up as soon as the node says it is not one."""

    def connectionMade(self) -> Any:
        """ROLE first (after AUTH): a node that is not the primary is closed, and so is
        one that refuses either; then txredisapi's own set-up (AUTH, SELECT)."""
        d: defer.Deferred[Any] = defer.succeed(None)
        if self.password is not None:
            d.addCallback(lambda _: self.auth(self.password, self.username))
        d.addCallback(lambda _: self.role())
        d.addCallbacks(self._check_role, self._refused)
        return d

    def _check_role(self, role: Any) -> Any:
        if not role or role[0] != "master":
            self.transport.loseConnection()
            return None
        peer = self.transport.getPeer()
        primaries.found(self.factory.service_name, (peer.host, peer.port))
        return txredisapi.RedisProtocol.connectionMade(self)

    #: The last refusal logged (each is retried every half second: log the changes only).
    last_refusal = ""

    def _refused(self, failure: Failure) -> None:
        self.transport.loseConnection()
        text = failure.getErrorMessage()
        if text != PrimaryProtocol.last_refusal:
            PrimaryProtocol.last_refusal = text
            _log.warn("a Redis node refused the connection's set-up (AUTH or ROLE): {e}", e=text)

    def replyReceived(self, reply: Any) -> None:
        super().replyReceived(reply)
        if isinstance(reply, txredisapi.ResponseError) and str(reply).startswith(
            NOT_THE_PRIMARY_REPLIES
        ):
            primaries.lost(self.factory.service_name, f"a node answered {str(reply)[:60]!r}")
            self.transport.loseConnection()


class PrimaryFactory(txredisapi.SentinelConnectionFactory):
    """txredisapi's Sentinel pool, with our protocol; closing it closes its sentinel links."""

    protocol = PrimaryProtocol

    def disconnect(self) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = super().disconnect()
        d.addBoth(lambda result: self.sentinel_manager.disconnect().addBoth(lambda _: result))
        return d


@implementer(IStreamClientEndpoint)
class PrimaryEndpoint:
    """Asks the sentinels for the primary before each connection attempt, then connects
    with a timeout (and TLS, verified against the primary's address, when asked)."""

    def __init__(self, factory: PrimaryFactory, tls: bool, connect_timeout_s: float) -> None:
        self._factory = factory
        self._tls = tls
        self._connect_timeout_s = connect_timeout_s
        self._address: tuple[str, int] | None = None

    def connect(self, protocol_factory: Any) -> defer.Deferred[Any]:
        name = self._factory.service_name
        seen = primaries.changes(name)
        d: defer.Deferred[Any] = self._factory.sentinel_manager.discover_master(name)
        d.addCallback(self._primary_named)
        d.addCallback(self._connect, protocol_factory)
        d.addErrback(self._failed, seen)
        return d

    def _primary_named(self, address: tuple[str, int]) -> tuple[str, int]:
        if self._address is not None and self._address != address:
            # the other connections of this pool are on the old primary
            for conn in list(self._factory.pool):
                conn.transport.loseConnection()
        self._address = address
        return address

    def _connect(self, address: tuple[str, int], protocol_factory: Any) -> defer.Deferred[Any]:
        host, port = address
        endpoint: Any = HostnameEndpoint(reactor, host, port, timeout=self._connect_timeout_s)
        if self._tls:
            endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
        d: defer.Deferred[Any] = endpoint.connect(protocol_factory)
        return d

    def _failed(self, failure: Failure, seen_changes: int) -> Failure:
        primaries.lost(self._factory.service_name, _reason(failure), seen_changes)
        return failure


def _reason(failure: Failure) -> str:
    if failure.check(txredisapi.MasterNotFoundError):
        return "no sentinel names a healthy primary"
    return f"cannot connect to it: {failure.getErrorMessage()}"


def sentinel_manager(
    address: RedisAddress, connect_timeout_s: float, reply_timeout_s: float | None
) -> Any:
    """txredisapi's Sentinel, with one connection per sentinel (TLS verified per host)."""
    manager = txredisapi.Sentinel([], min_other_sentinels=0)
    manager.discovery_timeout = DISCOVERY_TIMEOUT_S
    manager.sentinels = [
        sentinel_connection(address, s.host, s.port, connect_timeout_s, reply_timeout_s)
        for s in address.sentinels
    ]
    return manager


def sentinel_connection(
    address: RedisAddress,
    host: str,
    port: int,
    connect_timeout_s: float,
    reply_timeout_s: float | None,
) -> Any:
    return txredisapi.lazyConnection(
        host,
        port,
        password=address.sentinel_password,
        ssl_context_factory=optionsForClientTLS(host) if address.tls else False,
        connectTimeout=connect_timeout_s,
        replyTimeout=reply_timeout_s,
        charset="utf-8",
    )


def primary_pool(
    address: RedisAddress,
    poolsize: int,
    connect_timeout_s: float,
    reply_timeout_s: float | None,
) -> tuple[Any, list[Any]]:
    """A lazy pool on the primary of ``address.sentinel_master``.

    Returns the handler and every txredisapi factory it made (the pool's and
    the sentinels'), whose back-off the caller sets in one place.
    """
    manager = sentinel_manager(address, connect_timeout_s, reply_timeout_s)
    factory = PrimaryFactory(
        sentinel_manager=manager,
        service_name=address.sentinel_master,
        is_master=True,
        uuid=None,
        dbid=address.db or None,
        poolsize=poolsize,
        isLazy=True,
        charset="utf-8",
        password=address.password,
        username=address.username,
        replyTimeout=reply_timeout_s,
        convertNumbers=False,
    )
    factory.startConnecting(PrimaryEndpoint(factory, address.tls, connect_timeout_s))
    return factory.handler, [factory, *(s._factory for s in manager.sentinels)]
