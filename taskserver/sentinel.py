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
  connection (txredisapi's leaves it open and never ready); so does a node
  still loading its data (ROLE ``master``, PING ``LOADING``), before the
  connection is used, so that its slot backs off instead of reconnecting
  at once after every command;
- a short discovery timeout, a capped back-off and retrying forever (a
  failed AUTH would stop txredisapi's reconnecting for good);
- one log line per change of primary per process, whatever the number of
  pools: when the primary is lost, and with the new primary's address;
- discovery that asks every sentinel and believes the highest config-epoch
  (txredisapi's takes the first that answers, which can be a lagging one);
- a :class:`SentinelWatch` per process that moves the pools off a node the
  sentinels have left even while it still answers as a primary.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import txredisapi
from twisted.application.service import Service
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
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
#: How often the :class:`SentinelWatch` of a process asks every sentinel for the primary.
WATCH_EVERY_S = 1.0

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
        one that refuses either; then PING, which a node still loading its data answers
        ``LOADING`` (ROLE already says ``master`` then): closed too; then txredisapi's own
        set-up (AUTH, SELECT).

        A connection closed here never became usable, so its slot's back-off grows
        (to RECONNECT_MAX_DELAY_S); one closed on a ``LOADING`` reply to a command
        reconnects at once (txredisapi's Sentinel pools retry immediately after a
        usable connection), once per command sent, for as long as the node loads.
        """
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
        d: defer.Deferred[Any] = self.ping()
        d.addCallbacks(self._serving, self._refused)
        return d

    def _serving(self, _pong: Any) -> Any:
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
            _log.warn(
                "a Redis node refused the connection's set-up (AUTH, ROLE or PING): {e}", e=text
            )

    def replyReceived(self, reply: Any) -> None:
        super().replyReceived(reply)
        if isinstance(reply, txredisapi.ResponseError) and str(reply).startswith(
            NOT_THE_PRIMARY_REPLIES
        ):
            primaries.lost(self.factory.service_name, f"a node answered {str(reply)[:60]!r}")
            self.transport.loseConnection()


class PrimaryFactory(txredisapi.SentinelConnectionFactory):
    """txredisapi's Sentinel pool, with our protocol, followed by its process's watch.

    Closing it stops the watch (and closes its sentinel links) when it was the
    watch's last pool.
    """

    protocol = PrimaryProtocol
    #: The watch that follows this pool, and the pool's endpoint (set by :func:`primary_pool`).
    followed: tuple[SentinelWatch, PrimaryEndpoint] | None = None

    def disconnect(self) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = super().disconnect()
        followed, self.followed = self.followed, None
        if followed is not None:
            watch, endpoint = followed
            d.addBoth(lambda result: watch.unfollow(endpoint).addBoth(lambda _: result))
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

    @property
    def address(self) -> tuple[str, int] | None:
        """The primary this pool last connected to (None before its first discovery)."""
        return self._address

    def drop_connections(self) -> None:
        """Close the pool's connections: each slot discovers the primary again at once."""
        for conn in list(self._factory.pool):
            conn.transport.loseConnection()

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
            self.drop_connections()  # the others are on the old primary
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


@dataclass(frozen=True)
class SentinelAnswer:
    """What one sentinel says of a primary (``SENTINEL MASTER <name>``)."""

    address: tuple[str, int]
    #: The sentinels' configuration version: each failover raises it by one.
    config_epoch: int
    #: A primary in this sentinel's eyes, up (not s_down/o_down), with enough peers.
    healthy: bool


def choose_primary(answers: Sequence[SentinelAnswer]) -> SentinelAnswer | None:
    """The answer to believe: the highest config-epoch wins, whatever the order of arrival.

    A sentinel that lags behind a failover names the old primary with an older
    epoch. Among the answers of the highest epoch the healthy ones count, the
    address most of them name first (ties: the earlier sentinel in the
    configured order); if none of them is healthy, no primary is known now
    (an older epoch's healthy answer is the stale news to ignore).
    """
    if not answers:
        return None
    newest = max(answer.config_epoch for answer in answers)
    current = [a for a in answers if a.config_epoch == newest and a.healthy]
    if not current:
        return None
    votes = Counter(answer.address for answer in current)
    most = max(votes.values())
    return next(answer for answer in current if votes[answer.address] == most)


class EpochSentinel(txredisapi.Sentinel):
    """txredisapi's Sentinel whose discovery asks every sentinel and believes the newest epoch.

    txredisapi's ``discover_master`` takes the first sentinel that answers, so
    during a failover a lagging one can name the primary just left. This asks
    each connected sentinel (all of them while none is connected, so that the
    first discovery waits for the links instead of failing) ``SENTINEL MASTER``,
    waits for all of them or ``discovery_timeout``, whichever comes first (a
    silent sentinel is skipped), and picks with :func:`choose_primary`.
    """

    def __init__(self, sentinels: list[Any], clock: IReactorTime, timeout_s: float) -> None:
        super().__init__([], min_other_sentinels=0)
        self.sentinels = sentinels
        self.discovery_timeout = timeout_s
        self._clock = clock
        self._asking: set[defer.Deferred[Any]] = set()

    def discover_master(self, service_name: str) -> defer.Deferred[tuple[str, int]]:
        return defer.Deferred.fromCoroutine(self._discover(service_name))

    async def _discover(self, service_name: str) -> tuple[str, int]:
        chosen = choose_primary(await self.answers(service_name))
        if chosen is None:
            raise txredisapi.MasterNotFoundError(f"No master found for {service_name}")
        return chosen.address

    async def answers(self, service_name: str) -> list[SentinelAnswer]:
        """Every answer that came within the timeout, in the sentinels' configured order."""
        asked = [s for s in self.sentinels if _connected(s)] or list(self.sentinels)
        calls = [self._ask(sentinel, service_name) for sentinel in asked]
        results = await defer.DeferredList(calls, consumeErrors=True)
        for sentinel in asked:
            if not _connected(sentinel):
                _forget_cancelled_waits(sentinel)
        return [answer for ok, answer in results if ok and answer is not None]

    def _ask(self, sentinel: Any, service_name: str) -> defer.Deferred[SentinelAnswer | None]:
        d: defer.Deferred[Any] = sentinel.execute_command("SENTINEL", "MASTER", service_name)
        d.addCallback(self._parse)
        d.addTimeout(self.discovery_timeout, self._clock)
        self._asking.add(d)
        d.addBoth(self._answered, d)
        return d

    def _answered(self, result: Any, asked: defer.Deferred[Any]) -> Any:
        self._asking.discard(asked)
        return result

    def _parse(self, flat: Any) -> SentinelAnswer | None:
        if not isinstance(flat, list):
            return None
        state: dict[str, Any] = dict(zip(flat[::2], flat[1::2], strict=False))
        flags = set(str(state.get("flags", "")).split(","))
        state.update(
            is_master="master" in flags, is_sdown="s_down" in flags, is_odown="o_down" in flags
        )
        return SentinelAnswer(
            (str(state["ip"]), int(state["port"])),
            int(state.get("config-epoch", 0)),
            bool(self.check_master_state(state)),
        )

    def disconnect(self) -> defer.Deferred[Any]:
        """Cancel every question still out, then close the links to the sentinels."""
        for asked in list(self._asking):
            asked.cancel()
        closed: defer.Deferred[Any] = super().disconnect()
        return closed


def _connected(sentinel: Any) -> bool:
    return bool(sentinel._factory.size)


def _forget_cancelled_waits(sentinel: Any) -> None:
    """A question to a sentinel that is not connected waits for its connection in
    txredisapi's queue, which keeps cancelled waiters until the next connection:
    drop them, or an hour-long sentinel outage would keep thousands."""
    queue = sentinel._factory.connectionQueue
    queue.peekers = [d for d in queue.peekers if not d.called]


class SentinelWatch(Service):
    """Follows the sentinels for one process: moves its pools off a primary they have left.

    A pool rediscovers only when a connection closes or a node answers
    READONLY. A node the sentinels have left while it was cut off from them
    still answers ROLE as a primary and takes writes (a failover run lost
    10,277 of 31,317 accepted tasks written there for about 10 s). Every
    ``every_s`` this asks every sentinel for the primary
    (:meth:`EpochSentinel.answers`), believes the highest config-epoch, and
    closes the connections of each followed pool that is connected elsewhere;
    their slots discover the new primary at once.

    It polls rather than subscribing to ``+switch-master``: a subscription
    needs its own connection per sentinel, misses what happened while it was
    down (so a poll is needed anyway), and hears nothing when the sentinels
    are reconfigured by hand (``SENTINEL REMOVE``/``MONITOR``); one small
    command per sentinel per second per process costs nothing and bounds the
    delay. The pools of the process share its sentinel links for discovery.
    It runs while it follows a pool: :func:`primary_pool` starts it, and the
    last pool's ``disconnect()`` stops it (questions cancelled, links closed).
    """

    def __init__(
        self,
        sentinels: EpochSentinel,
        service_name: str,
        clock: IReactorTime,
        every_s: float = WATCH_EVERY_S,
    ) -> None:
        self.sentinels = sentinels
        self._service_name = service_name
        self._clock = clock
        self._every_s = every_s
        self._endpoints: list[PrimaryEndpoint] = []
        self._loop: task.LoopingCall | None = None
        self._checking: defer.Deferred[None] | None = None
        #: The address last announced as the one to move to (one log line per change).
        self._announced: tuple[str, int] | None = None

    def follow(self, endpoint: PrimaryEndpoint) -> None:
        self._endpoints.append(endpoint)

    def unfollow(self, endpoint: PrimaryEndpoint) -> defer.Deferred[None]:
        """Forget a closed pool; stop (for real) after the last one."""
        if endpoint in self._endpoints:
            self._endpoints.remove(endpoint)
        if self._endpoints or not self.running:
            return defer.succeed(None)
        return self.stopService()

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self._clock
        self._loop.start(self._every_s, now=False)

    def _tick(self) -> defer.Deferred[None]:
        self._checking = defer.Deferred.fromCoroutine(self.check())
        self._checking.addErrback(self._check_failed)
        return self._checking

    def _check_failed(self, failure: Failure) -> None:
        if not failure.check(defer.CancelledError):  # cancelled: stopService
            _log.failure("watching the sentinels", failure)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        checking, self._checking = self._checking, None
        if checking is not None and not checking.called:
            checking.cancel()
        d: defer.Deferred[Any] = self.sentinels.disconnect()
        d.addBoth(lambda _: None)
        return d

    async def check(self) -> None:
        """Ask once; drop the connections of every pool that is not on the chosen primary.

        Only on the word of most of the configured sentinels: a minority that answered
        alone (the others timed out, or their links were down this second) can be the
        side of a partition that still names the old primary, and moving the pools to
        it would lose every write they make there.
        """
        answers = await self.sentinels.answers(self._service_name)
        if len(answers) <= len(self.sentinels.sentinels) // 2:
            return
        chosen = choose_primary(answers)
        if chosen is None:
            return  # no primary named now: the pools' own discovery waits for one
        behind = [e for e in self._endpoints if e.address not in (None, chosen.address)]
        if not behind:
            return
        if chosen.address != self._announced:
            self._announced = chosen.address
            host, port = chosen.address
            _log.warn(
                "the sentinels name {host}:{port} (config-epoch {epoch}) the primary of "
                "{name!r}, {count} pool(s) are elsewhere: reconnecting them",
                host=host,
                port=port,
                epoch=chosen.config_epoch,
                name=self._service_name,
                count=len(behind),
            )
        for endpoint in behind:
            endpoint.drop_connections()


#: The running watch of each sentinel deployment this process talks to.
_watches: dict[tuple[Any, ...], SentinelWatch] = {}


def watch_for(
    address: RedisAddress,
    connect_timeout_s: float,
    reply_timeout_s: float | None,
    clock: IReactorTime,
) -> SentinelWatch:
    """This process's watch of ``address``'s sentinels, started if it was not running."""
    key = (address.sentinels, address.sentinel_master, address.sentinel_password, address.tls)
    watch = _watches.get(key)
    if watch is None or not watch.running:  # a stopped one had no pool left
        links = [
            sentinel_connection(address, s.host, s.port, connect_timeout_s, reply_timeout_s)
            for s in address.sentinels
        ]
        watch = SentinelWatch(
            EpochSentinel(links, clock, DISCOVERY_TIMEOUT_S), address.sentinel_master, clock
        )
        _watches[key] = watch
        watch.startService()
    return watch


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
    clock: IReactorTime | None = None,
) -> tuple[Any, list[Any]]:
    """A lazy pool on the primary of ``address.sentinel_master``, followed by the
    process's :class:`SentinelWatch` (started with the first pool).

    Returns the handler and every txredisapi factory it made (the pool's and
    the sentinels'), whose back-off the caller sets in one place.
    """
    watch = watch_for(address, connect_timeout_s, reply_timeout_s, clock or reactor)
    factory = PrimaryFactory(
        sentinel_manager=watch.sentinels,
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
    endpoint = PrimaryEndpoint(factory, address.tls, connect_timeout_s)
    factory.followed = (watch, endpoint)
    watch.follow(endpoint)
    factory.startConnecting(endpoint)
    return factory.handler, [factory, *(s._factory for s in watch.sentinels.sentinels)]
