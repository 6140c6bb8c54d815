"""Redis Sentinel: the settings, the mended protocol, and pools that follow a real primary.

The integration tests run a real deployment (tests/sentinel_deploy.py: a
primary, a replica and three sentinels from the embedded valkey-server).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import txredisapi
from test_waiting import open_waiters, waiting_get
from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, formatEvent, globalLogPublisher

from conftest import eventually, sleep
from harness import Twistd, wait_for
from sentinel_deploy import HOST, MASTER_NAME, Node, SentinelDeployment, command
from taskserver import tap
from taskserver.config import (
    ConfigError,
    RedisAddress,
    SentinelAddress,
    load_settings,
    redis_address_from_json,
    settings_from_json,
    settings_to_json,
)
from taskserver.redisclient import (
    RedisUnavailable,
    connect,
    connect_subscriber,
    within,
    without_reconnect_attempts,
)
from taskserver.sentinel import (
    DISCOVERY_TIMEOUT_S,
    WATCH_EVERY_S,
    EpochSentinel,
    PrimaryEndpoint,
    PrimaryLog,
    PrimaryProtocol,
    SentinelWatch,
    primaries,
)
from taskserver.stats import address_label

ADMIN = str(Path(sys.executable).parent / "taskserver-admin")

# ---------------------------------------------------------------- settings


def test_sentinels_name_the_primary_and_the_redis_options_are_the_data_nodes() -> None:
    settings = load_settings(
        {},
        {
            "REDIS_SENTINELS": "10.0.0.1:26379, sentinel-b:26380,[::1]:5000,sentinel-c",
            "REDIS_SENTINEL_MASTER": "queue-1",
            "REDIS_SENTINEL_PASSWORD": "s3",
            "REDIS_PASSWORD": "d4",
            "REDIS_USERNAME": "app",
            "REDIS_DB": "2",
            "REDIS_TLS": "true",
        },
    )
    address = settings.redis
    assert address is not None
    assert address.sentinels == (
        SentinelAddress("10.0.0.1", 26379),
        SentinelAddress("sentinel-b", 26380),
        SentinelAddress("::1", 5000),
        SentinelAddress("sentinel-c", 26379),
    )
    assert (address.sentinel_master, address.sentinel_password) == ("queue-1", "s3")
    assert (address.username, address.password, address.db, address.tls) == ("app", "d4", 2, True)
    shown = address.display()
    assert shown == (
        "rediss+sentinel://app:***@10.0.0.1:26379,sentinel-b:26380,[::1]:5000,"
        "sentinel-c:26379/queue-1/2"
    )
    assert "s3" not in repr(address) and "d4" not in repr(address)
    assert address_label(address) == (
        "queue-1/2 via sentinels 10.0.0.1:26379,sentinel-b:26380,[::1]:5000,sentinel-c:26379"
    )
    # the master hands settings and the address to its children as JSON
    assert settings_from_json(settings_to_json(settings)) == settings
    assert redis_address_from_json(json.loads(json.dumps(_asdict(address)))) == address


def _asdict(address: RedisAddress) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(address)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        (
            {"REDIS_SENTINELS": "a:1", "REDIS_URL": "redis://b"},
            "REDIS_SENTINELS and REDIS_URL both set",
        ),
        (
            {"REDIS_SENTINELS": "a:1", "REDIS_HOST": "b", "REDIS_PORT": "1"},
            "REDIS_SENTINELS and REDIS_HOST, REDIS_PORT both set",
        ),
        ({"REDIS_SENTINEL_MASTER": "x"}, "REDIS_SENTINEL_MASTER set but REDIS_SENTINELS is not"),
        ({"REDIS_SENTINEL_PASSWORD": "x"}, "REDIS_SENTINEL_PASSWORD set but REDIS_SENTINELS"),
        ({"REDIS_SENTINELS": "a:b"}, "REDIS_SENTINELS (--redis-sentinels): 'a:b' is not host:port"),
        ({"REDIS_SENTINELS": "a:1/x"}, "'a:1/x' is not host:port"),
        ({"REDIS_SENTINELS": "u:p@a:1"}, "'u:p@a:1' is not host:port"),
        (
            {"REDIS_SENTINELS": "a:1", "REDIS_SENTINEL_MASTER": "my master"},
            "REDIS_SENTINEL_MASTER (--redis-sentinel-master): expected a name of letters",
        ),
    ],
)
def test_sentinel_settings_that_cannot_work_stop_with_one_line(
    environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=None) as raised:
        load_settings({}, environ)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_with_sentinels_the_master_starts_no_embedded_redis(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """makeService neither looks for the embedded binary nor locks DATA_DIR with sentinels.

    REDIS_SERVER_BIN names no file, so looking for it would stop start-up; locking
    DATA_DIR would create the folder.
    """
    bound: list[socket.socket] = []
    bind = tap.bind_listener

    def bind_and_keep(interface: str, port: int) -> socket.socket:
        bound.append(bind(interface, port))
        return bound[-1]

    monkeypatch.setattr(tap, "bind_listener", bind_and_keep)
    options = tap.Options()
    options.settings = load_settings(
        {},
        {
            "REDIS_SENTINELS": "127.0.0.1:1",
            "REDIS_SERVER_BIN": str(tmp_path / "no-such-server"),
            "DATA_DIR": str(tmp_path / "data"),
            "PORT": "0",
            "INTERFACE": "127.0.0.1",
        },
    )
    tap.makeService(options)
    try:
        assert not (tmp_path / "data").exists()
    finally:
        for listener in bound:
            listener.close()


# ---------------------------------------------------------------- the mended protocol


class _Factory:
    service_name = "unit-primary"


def _connected_protocol(role: bytes = b"master") -> tuple[PrimaryProtocol, StringTransport]:
    protocol = PrimaryProtocol(charset="utf-8", convertNumbers=False)
    protocol.factory = _Factory()
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 7000))
    protocol.makeConnection(transport)
    assert b"ROLE" in transport.value()
    protocol.dataReceived(b"*3\r\n$%d\r\n%s\r\n:0\r\n*0\r\n" % (len(role), role))
    if role == b"master":
        assert transport.value().endswith(b"PING\r\n")
        protocol.dataReceived(b"+PONG\r\n")
    return protocol, transport


@pytest.mark.parametrize(
    "reply",
    [
        b"-READONLY You can't write against a read only replica.",
        b"-UNBLOCKED force unblock from blocking operation, instance state changed "
        b"(master -> replica?)",
        b"-LOADING Redis is loading the dataset in memory",
        b"-MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
    ],
)
def test_a_reply_from_a_node_that_is_not_the_primary_drops_the_connection_at_once(
    reply: bytes,
) -> None:
    """The caller still gets the error (it retries or answers 503); the slot reconnects and
    asks the sentinels again. txredisapi alone keeps the connection."""
    protocol, transport = _connected_protocol()
    assert protocol.whenConnected().called and not transport.disconnecting
    answer = protocol.execute_command("SET", "k", "v")
    protocol.dataReceived(reply + b"\r\n")
    failure = answer.result
    answer.addErrback(lambda _: None)
    assert isinstance(failure.value, txredisapi.ResponseError)
    assert transport.disconnecting


def test_other_errors_keep_the_connection() -> None:
    protocol, transport = _connected_protocol()
    answer = protocol.execute_command("INCR", "k")
    protocol.dataReceived(b"-ERR value is not an integer or out of range\r\n")
    answer.addErrback(lambda _: None)
    assert not transport.disconnecting


def test_a_node_that_says_it_is_a_replica_is_not_used() -> None:
    protocol, transport = _connected_protocol(role=b"slave")
    assert transport.disconnecting and not protocol.whenConnected().called


def test_a_primary_still_loading_its_data_is_closed_before_it_is_used() -> None:
    """ROLE says ``master`` while the node loads (a replica promoted while loading, a
    restart with a large append-only file), PING says ``LOADING``: the connection closes
    during its set-up, so its slot backs off (a connection dropped after it was usable
    is retried at once: a reconnect per command for as long as the node loads)."""
    protocol = PrimaryProtocol(charset="utf-8", convertNumbers=False)
    protocol.factory = _Factory()
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 7000))
    protocol.makeConnection(transport)
    protocol.dataReceived(b"*3\r\n$6\r\nmaster\r\n:0\r\n*0\r\n")
    assert transport.value().endswith(b"PING\r\n"), "no probe after ROLE"
    protocol.dataReceived(b"-LOADING Valkey is loading the dataset in memory\r\n")
    assert transport.disconnecting and not protocol.whenConnected().called


def test_a_refused_role_closes_the_connection_instead_of_hanging() -> None:
    """txredisapi's SentinelRedisProtocol leaves it open and never ready (an errback nobody has)."""
    protocol = PrimaryProtocol(charset="utf-8", convertNumbers=False)
    protocol.factory = _Factory()
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b"-NOAUTH Authentication required.\r\n")
    assert transport.disconnecting and not protocol.whenConnected().called


def test_the_primary_log_says_each_change_once_and_ignores_stale_news() -> None:
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        log = PrimaryLog()
        log.found("m", ("10.0.0.1", 6379))
        log.found("m", ("10.0.0.1", 6379))  # another pool, same primary
        seen = log.changes("m")
        log.lost("m", "refused", seen)
        log.lost("m", "refused", seen)  # another pool's attempt
        stale = log.changes("m") - 1  # an attempt that began before the loss
        log.found("m", ("10.0.0.2", 6379))
        log.lost("m", "no sentinel names a healthy primary", stale)
    finally:
        globalLogPublisher.removeObserver(events.append)
    said = [e for e in events if e.get("log_namespace") == "taskserver.sentinel"]
    assert [(e["log_level"].name, e.get("host"), e.get("why")) for e in said] == [
        ("info", "10.0.0.1", None),
        ("warn", None, "refused"),
        ("info", "10.0.0.2", None),
    ]
    assert log.current("m") == ("10.0.0.2", 6379)


# ---------------------------------------------------------------- the watch, with a Clock

NAME = "unit-primary"
A = ("10.0.0.1", 6379)
B = ("10.0.0.2", 6379)


def master_state(address: tuple[str, int], epoch: int, flags: str = "master") -> list[str]:
    """A ``SENTINEL MASTER`` reply, flat, as a sentinel sends it."""
    host, port = address
    return [
        "name", NAME, "ip", host, "port", str(port), "flags", flags,
        "config-epoch", str(epoch), "num-other-sentinels", "2",
    ]  # fmt: skip


class FakeSentinel:
    """A sentinel link: answers ``SENTINEL MASTER`` with ``state`` (None: never answers)."""

    def __init__(self, state: list[str] | None, connected: bool = True) -> None:
        self.state = state
        self._factory = _FakeLinkFactory(connected)
        self.asked: list[defer.Deferred[Any]] = []
        self.closed = False

    def execute_command(self, *args: str) -> defer.Deferred[Any]:
        assert args == ("SENTINEL", "MASTER", NAME)
        d: defer.Deferred[Any] = defer.Deferred()
        self.asked.append(d)
        if self.state is not None:
            d.callback(self.state)
        return d

    def disconnect(self) -> defer.Deferred[None]:
        self.closed = True
        return defer.succeed(None)


class _FakeLinkFactory:
    def __init__(self, connected: bool) -> None:
        self.size = 1 if connected else 0
        self.connectionQueue = _FakeQueue()


class _FakeQueue:
    peekers: list[defer.Deferred[Any]] = []


class _PoolFactory:
    """What PrimaryEndpoint reads of its pool: the name and the connections."""

    service_name = NAME

    def __init__(self) -> None:
        self.pool: list[PrimaryProtocol] = []


def pool_on(address: tuple[str, int] | None) -> tuple[PrimaryEndpoint, StringTransport]:
    """A real PrimaryEndpoint whose pool has one connection, to ``address``."""
    factory = _PoolFactory()
    protocol, transport = _connected_protocol()
    factory.pool.append(protocol)
    endpoint = PrimaryEndpoint(factory, tls=False, connect_timeout_s=1.0)  # type: ignore[arg-type]
    if address is not None:
        endpoint._primary_named(address)
    return endpoint, transport


def discovered(sentinels: list[FakeSentinel], clock: Clock) -> defer.Deferred[Any]:
    return EpochSentinel(list(sentinels), clock, DISCOVERY_TIMEOUT_S).discover_master(NAME)


def test_discovery_believes_the_highest_epoch_not_the_first_answer() -> None:
    """A lagging sentinel answers first with the primary just left (txredisapi takes it)."""
    lagging, current = FakeSentinel(master_state(A, 1)), FakeSentinel(None)
    answer = discovered([lagging, current], Clock())
    assert not answer.called, "waits for every connected sentinel"
    current.asked[0].callback(master_state(B, 2))
    assert answer.result == B


def test_discovery_skips_a_sentinel_that_does_not_answer_in_time() -> None:
    clock = Clock()
    silent, answering = FakeSentinel(None), FakeSentinel(master_state(A, 3))
    answer = discovered([silent, answering], clock)
    clock.advance(DISCOVERY_TIMEOUT_S - 0.01)
    assert not answer.called
    clock.advance(0.01)
    assert answer.result == A
    assert silent.asked[0].called, "the silent question is cancelled, not left waiting"


def test_discovery_asks_only_the_connected_sentinels_while_one_is_connected() -> None:
    """A sentinel that is down would make every discovery wait the whole timeout."""
    down, up = FakeSentinel(None, connected=False), FakeSentinel(master_state(A, 1))
    assert discovered([down, up], Clock()).result == A and down.asked == []
    # none connected (a process starting): ask all, each waits for its link
    clock = Clock()
    starting = FakeSentinel(None, connected=False)
    answer = discovered([starting], clock)
    assert len(starting.asked) == 1
    starting.asked[0].callback(master_state(B, 1))
    assert answer.result == B


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        # a sentinel of the newest epoch sees the new primary down: no stale fallback
        ([master_state(A, 1), master_state(B, 2, "master,s_down")], None),
        ([master_state(A, 1, "master,o_down"), master_state(B, 1)], B),
        ([master_state(A, 0), master_state(B, 0), master_state(B, 0)], B),  # most of them
        ([master_state(A, 0), master_state(B, 0)], A),  # a tie: the configured order
        ([], None),
    ],
)
def test_which_answer_names_the_primary(
    states: list[list[str]], expected: tuple[str, int] | None
) -> None:
    answer = discovered([FakeSentinel(state) for state in states], Clock())
    if expected is None:
        assert isinstance(answer.result.value, txredisapi.MasterNotFoundError)
        answer.addErrback(lambda _: None)
    else:
        assert answer.result == expected


def watching(sentinels: list[FakeSentinel], clock: Clock) -> SentinelWatch:
    watch = SentinelWatch(EpochSentinel(list(sentinels), clock, DISCOVERY_TIMEOUT_S), NAME, clock)
    watch.startService()
    return watch


def test_the_watch_does_nothing_while_the_sentinels_name_the_pools_primary() -> None:
    clock = Clock()
    sentinels = [FakeSentinel(master_state(A, 4)) for _ in range(3)]
    watch = watching(sentinels, clock)
    endpoint, transport = pool_on(A)
    watch.follow(endpoint)
    clock.pump([WATCH_EVERY_S] * 5)
    assert [len(s.asked) for s in sentinels] == [5, 5, 5]
    assert not transport.disconnecting


def test_the_watch_drops_a_pool_the_sentinels_have_left_within_one_interval() -> None:
    """The pool's node still says it is the primary: only the sentinels know better."""
    events: list[LogEvent] = []
    clock = Clock()
    sentinels = [FakeSentinel(master_state(A, 4)) for _ in range(3)]
    watch = watching(sentinels, clock)
    endpoint, transport = pool_on(A)
    unconnected, _ = pool_on(None)  # never discovered: nothing to move
    watch.follow(endpoint)
    watch.follow(unconnected)
    clock.advance(WATCH_EVERY_S)
    for sentinel in sentinels[:2]:
        sentinel.state = master_state(B, 5)
    sentinels[2].state = None  # a lagging sentinel that times out is skipped
    globalLogPublisher.addObserver(events.append)
    try:
        clock.advance(WATCH_EVERY_S)
        assert not transport.disconnecting, "waits for the silent sentinel's timeout"
        clock.advance(DISCOVERY_TIMEOUT_S)
        assert transport.disconnecting
        clock.pump([WATCH_EVERY_S, DISCOVERY_TIMEOUT_S] * 2)  # still behind: dropped, not said
    finally:
        globalLogPublisher.removeObserver(events.append)
    said = [e for e in events if e.get("log_namespace") == "taskserver.sentinel"]
    assert [(e.get("host"), e.get("epoch"), e.get("count")) for e in said] == [("10.0.0.2", 5, 1)]


def test_the_watch_moves_nothing_on_the_word_of_a_minority() -> None:
    """One sentinel of three answers (cut off with the old primary, the others silent):
    its word does not move a pool that is on the primary the majority named."""
    clock = Clock()
    sentinels = [FakeSentinel(master_state(B, 5)) for _ in range(3)]
    watch = watching(sentinels, clock)
    endpoint, transport = pool_on(B)
    watch.follow(endpoint)
    sentinels[0].state = master_state(A, 6)
    for sentinel in sentinels[1:]:
        sentinel.state = None  # they time out
    clock.pump([WATCH_EVERY_S, DISCOVERY_TIMEOUT_S] * 3)
    assert not transport.disconnecting
    sentinels[1].state = master_state(A, 6)  # two of three: a majority
    clock.pump([WATCH_EVERY_S, DISCOVERY_TIMEOUT_S])
    assert transport.disconnecting


def test_the_watch_stops_for_real_with_the_last_pool() -> None:
    """Its question in flight is cancelled, it asks no more, its sentinel links close."""
    clock = Clock()
    silent = FakeSentinel(None)
    watch = watching([silent], clock)
    first, _ = pool_on(A)
    second, _ = pool_on(A)
    watch.follow(first)
    watch.follow(second)
    clock.advance(WATCH_EVERY_S)
    assert len(silent.asked) == 1 and not silent.asked[0].called
    assert watch.unfollow(first).called and watch.running
    stopped = watch.unfollow(second)
    assert stopped.called and not watch.running
    assert silent.asked[0].called and silent.closed
    clock.advance(WATCH_EVERY_S * 3)
    assert len(silent.asked) == 1 and clock.getDelayedCalls() == []


# ---------------------------------------------------------------- a real deployment


def sentinel_address(deployment: SentinelDeployment, **extra: Any) -> RedisAddress:
    return RedisAddress(
        host="",
        port=0,
        password=deployment.password,
        sentinels=tuple(SentinelAddress(h, p) for h, p in deployment.sentinel_addresses()),
        sentinel_password=deployment.sentinel_password,
        **extra,
    )


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[SentinelDeployment]:
    running = SentinelDeployment(tmp_path / "sentinel")
    running.start()
    yield running
    running.stop()


@pytest_twisted.ensureDeferred
async def test_a_demoted_primary_drops_the_pools_at_once_and_they_follow_the_new_one(
    deployment: SentinelDeployment,
) -> None:
    """UNBLOCKED on a blocking pop and READONLY on a write, from a primary turned replica
    under a live connection: both connections close at once, retry (the sentinels still
    name the old node, whose ROLE turns them away), and move once the sentinels name the
    new primary. Without the mend they would stay on the replica for good."""
    address = sentinel_address(deployment)
    api = connect(address, 1, 1.0)
    blocking = connect(address, 1, 1.0)
    try:
        assert await api.set("k", "before") == "OK"
        old = deployment.primary()
        (new,) = deployment.replicas()
        assert old is not None
        popping = blocking.brpoplpush("queue", "processing", 30)

        async def blocked() -> bool:
            info = deployment.data_command(old, "INFO", "clients")
            return "blocked_clients:1" in info

        await eventually(blocked)
        # the replica becomes a primary of its own and the old primary its replica,
        # behind the sentinels' back: no connection is killed by a sentinel here
        deployment.data_command(new, "REPLICAOF", "NO", "ONE")
        deployment.data_command(old, "REPLICAOF", HOST, new.port)
        with pytest.raises(txredisapi.ResponseError, match="UNBLOCKED"):
            await popping
        with pytest.raises(txredisapi.ResponseError, match="READONLY"):
            await api.set("k", "on a replica")

        async def closed() -> bool:
            return bool(api._factory.size == 0 and blocking._factory.size == 0)

        await eventually(closed, timeout=2)
        # the operator points the sentinels at the new primary
        for sentinel in deployment.sentinels:
            command(sentinel.port, "SENTINEL", "REMOVE", MASTER_NAME)
            command(sentinel.port, "SENTINEL", "MONITOR", MASTER_NAME, HOST, new.port, 2)

        async def written() -> bool:
            try:
                return bool(await api.set("k", "after") == "OK")
            except txredisapi.RedisError:
                return False

        await eventually(written, timeout=10)
        assert deployment.data_command(new, "GET", "k") == "after"
        deployment.data_command(new, "LPUSH", "queue", "task")
        assert await blocking.brpoplpush("queue", "processing", 5) == "task"
        assert primaries.current(MASTER_NAME) == (HOST, new.port)
    finally:
        await api.disconnect()
        await blocking.disconnect()


@pytest.mark.serial  # a move bounded in seconds
@pytest_twisted.ensureDeferred
async def test_pools_leave_a_primary_the_sentinels_have_left_though_it_still_says_it_is_one(
    deployment: SentinelDeployment,
) -> None:
    """The hole of a failover run: the sentinels named another node while the old primary,
    never told, still answered ROLE as a primary and took writes (no READONLY, no closed
    connection). The watch moves the pools within its interval plus a bound; without it
    they would write to the old node until something closed their connections."""
    address = sentinel_address(deployment)
    api = connect(address, 2, 1.0)
    blocking = connect(address, 1, 1.0)
    events: list[LogEvent] = []
    try:
        assert await api.set("k", "before") == "OK"
        old = deployment.primary()
        assert old is not None
        new = deployment.start_standalone()
        popping = blocking.brpoplpush("queue", "processing", 30)
        globalLogPublisher.addObserver(events.append)
        deployment.monitor(new)
        moved_at = time.monotonic()
        errors: list[str] = []
        n = 0

        async def written_to_the_new_node() -> bool:
            nonlocal n
            n += 1
            try:
                await api.set("k", f"write {n}")
            except txredisapi.RedisError as e:  # a dropped connection's command
                errors.append(str(e))
            return bool(deployment.data_command(new, "GET", "k"))

        await eventually(written_to_the_new_node, timeout=WATCH_EVERY_S + 2.0)
        took = time.monotonic() - moved_at
        globalLogPublisher.removeObserver(events.append)
        print(f"pools on the new primary {took:.2f} s after the sentinels named it ({n} writes)")
        said = [formatEvent(e) for e in events if "reconnecting them" in e.get("log_format", "")]
        print(*said, sep="\n")
        assert len(said) == 1, "one line for the process, not one per pool"
        assert deployment.data_command(old, "ROLE")[0] == "master", (
            "the old node never stepped down"
        )
        assert not [e for e in errors if "READONLY" in e], errors
        # the blocking pool moved too: its pop on the old node was cut (the consumer
        # pops again), and the next one waits on the new node
        with pytest.raises(txredisapi.ConnectionError):
            await popping
        deployment.data_command(new, "LPUSH", "queue", "task")
        assert await blocking.brpoplpush("queue", "processing", 5) == "task"
        assert primaries.current(MASTER_NAME) == (HOST, new.port)
    finally:
        globalLogPublisher.removeObserver(events.append)
        await api.disconnect()
        await blocking.disconnect()


@pytest_twisted.ensureDeferred
async def test_the_finished_subscription_is_made_on_the_primary_the_sentinels_name(
    deployment: SentinelDeployment,
) -> None:
    """The waiters' subscriber is built like every pool: it asks the sentinels, passes the
    ROLE check (the subscriber's protocol is the Sentinel one, with Pub/Sub mixed in), and
    hears a PUBLISH made on the primary."""
    heard: list[str] = []
    subscriber = connect_subscriber(sentinel_address(deployment), 1.0)
    subscriber.on_message = lambda channel, text: heard.append(text)
    try:
        connection = await subscriber.getConnection(peek=True)
        assert isinstance(connection, PrimaryProtocol)
        await connection.execute_command("SUBSCRIBE", "finished", apply_timeout=False)
        primary = deployment.primary()
        assert primary is not None
        assert connection.transport.getPeer().port == primary.port
        deployment.data_command(primary, "PUBLISH", "finished", "a b")

        async def got() -> bool:
            return heard == ["a b"]

        await eventually(got, timeout=5)
    finally:
        await subscriber.disconnect()


@pytest.mark.serial  # paced in real seconds, its timers and lines counted
@pytest_twisted.ensureDeferred
async def test_a_sentinel_dead_at_start_up_leaks_nothing_and_floods_no_log(
    deployment: SentinelDeployment,
) -> None:
    """One of three sentinels (the first named) is down before the pool starts: the pool
    works through the other two, and over several watch intervals the dead one's link
    keeps no waiting question (txredisapi keeps cancelled ones until a connection comes),
    no question stays out, the reactor's timers do not pile up, and its reconnect attempts
    (every 0.5 s) write nothing to a log filtered as the processes' logs are."""
    dead = deployment.sentinels[0]
    dead.kill()
    lines: list[str] = []
    observer = without_reconnect_attempts(lambda event: lines.append(formatEvent(event)))
    globalLogPublisher.addObserver(observer)
    api = connect(sentinel_address(deployment), 2, 1.0)
    try:
        assert await within(api.set("k", "through two sentinels"), 5.0, reactor) == "OK"
        watch, _endpoint = api._factory.followed
        link = next(s for s in watch.sentinels.sentinels if s._factory.size == 0)
        timers = len(reactor.getDelayedCalls())
        for n in range(4):
            await task.deferLater(reactor, WATCH_EVERY_S, lambda: None)  # watch ticks
            assert await within(api.set("k", f"write {n}"), 1.0, reactor) == "OK"
        assert link._factory.connectionQueue.peekers == [], "questions kept for a dead sentinel"
        assert len(watch.sentinels._asking) <= 2, "questions still out"
        assert len(reactor.getDelayedCalls()) <= timers + 10, "timers piling up"
    finally:
        globalLogPublisher.removeObserver(observer)
        await api.disconnect()
    print(f"{len(lines)} line(s) logged with a dead sentinel:", *lines, sep="\n")
    assert len(lines) <= 3, lines


#: Seconds a loading node takes in the LOADING tests, and the window they count connections in.
LOAD_S = 8.0
LOADING_WINDOW_S = 2.0


async def commands_while_loading(
    pool: Any, deployment: SentinelDeployment, node: Node
) -> tuple[int, list[str]]:
    """SETs at a client's pace for LOADING_WINDOW_S: the connections ``node`` accepted
    meanwhile, and what the SETs met (each must be RedisUnavailable: a 503)."""
    before = deployment.connections_received(node)
    met: list[str] = []
    started = reactor.seconds()
    while reactor.seconds() - started < LOADING_WINDOW_S:
        with pytest.raises(RedisUnavailable) as refused:
            await within(pool.set("k", "while loading"), 0.1, reactor)
        met.append(str(refused.value))
        await sleep(0.02)
    made = deployment.connections_received(node) - before - 1  # the reading's own
    assert "loading:1" in deployment.data_command(node, "INFO", "persistence"), "loaded too soon"
    return made, met


async def written(pool: Any) -> bool:
    try:
        return bool(await within(pool.set("k", "loaded"), 1.0, reactor) == "OK")
    except RedisUnavailable:
        return False


@pytest_twisted.ensureDeferred
async def test_a_loading_primary_named_by_the_sentinels_is_retried_with_back_off(
    deployment: SentinelDeployment,
) -> None:
    """A primary still loading (ROLE ``master``, commands ``LOADING``): its connections are
    closed during their set-up and retried with the capped back-off (before the mend: one
    reconnect per command, at once); meanwhile commands are RedisUnavailable (POST answers
    503), and the pool works once the node has loaded."""
    node = deployment.start_standalone()
    deployment.restart_loading(node, keys=4000, load_s=LOAD_S)
    deployment.monitor(node)
    deployment.wait_for_sentinel_links(node)
    pool = connect(sentinel_address(deployment), 1, 1.0)
    try:
        made, met = await commands_while_loading(pool, deployment, node)
        print(f"{made} connections to the loading node in {LOADING_WINDOW_S:g} s, {len(met)} SETs")
        # 0, 0.27, then every 0.5 s: 5 seen; without the mend, 14 (for 27 SETs: one per LOADING)
        assert made <= 7, f"{made} connections in {LOADING_WINDOW_S} s ({len(met)} commands)"
        await eventually(lambda: written(pool), timeout=LOAD_S + 5)
        assert deployment.data_command(node, "GET", "k") == "loaded"
    finally:
        await pool.disconnect()


@pytest_twisted.ensureDeferred
async def test_a_loading_redis_answers_loading_on_the_same_connection(tmp_path: Path) -> None:
    """Without Sentinel (the embedded Redis restarted with a large append-only file): the
    connection stays (AUTH and SELECT work while loading), every command is RedisUnavailable
    at once with the reason (a 503; a consumer's pop backs off), no reconnect at all, and a
    blocking pop on the same pool works once the data is loaded."""
    nodes = SentinelDeployment(tmp_path)
    try:
        node = nodes.start_standalone()
        nodes.restart_loading(node, keys=4000, load_s=LOAD_S)
        pool = connect(RedisAddress(host=HOST, port=node.port, db=1), 1, 1.0)
        try:
            await pool._factory.deferred  # connected (AUTH, SELECT passed): count from here
            made, met = await commands_while_loading(pool, nodes, node)
            print(f"{made} connection(s) in {LOADING_WINDOW_S:g} s, {len(met)} SETs: {met[-1]}")
            assert made == 0, made
            assert all("LOADING" in text for text in met), met
            await eventually(lambda: written(pool), timeout=LOAD_S + 5)
            nodes.data_command(node, "LPUSH", "queue", "task")  # db 0: the pool's is 1
            await within(pool.lpush("queue", "task"), 1.0, reactor)
            assert await within(pool.brpoplpush("queue", "processing", 5), 6.0, reactor) == "task"
        finally:
            await pool.disconnect()
    finally:
        nodes.stop()


# ---------------------------------------------------------------- twistd through sentinels


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[SentinelDeployment]:
    """A deployment whose data nodes and sentinels each have a password."""
    running = SentinelDeployment(
        tmp_path / "sentinel", password="data-secret", sentinel_password="sentinel-secret"
    )
    running.start()
    yield running
    running.stop()


def sentinel_environment(deployment: SentinelDeployment) -> dict[str, str]:
    return {
        "REDIS_SENTINELS": deployment.sentinels_setting(),
        "REDIS_PASSWORD": deployment.password or "",
        "REDIS_SENTINEL_PASSWORD": deployment.sentinel_password or "",
    }


class Poster:
    """POSTs one task after another from a thread; records (sent at, status, seconds taken)."""

    def __init__(self, server: Twistd) -> None:
        self.server = server
        self.answers: list[tuple[float, int, float]] = []
        self.accepted: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            sent = time.monotonic()
            try:
                code, document = self.server.request("POST", "/api/v1/task", {"user_id": f"u{n}"})
            except OSError:
                code, document = 0, {}
            self.answers.append((sent, code, time.monotonic() - sent))
            if code == 202:
                self.accepted.append(document["task_id"])
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.mark.serial  # a failover under load, bounded in time
def test_a_cluster_through_sentinels_survives_a_sigkill_of_the_primary_without_a_restart(
    guarded: SentinelDeployment, twistd: Callable[..., Twistd], tmp_path: Path
) -> None:
    environ = sentinel_environment(guarded)
    server = twistd(WORKERS="2", RATE_LIMITS="", **environ)
    server.wait_until_ready(2)
    assert "Redis: rediss" not in server.output and "redis+sentinel://:***@" in server.output
    first = server.post_task("before-the-failover")
    assert first
    wait_for(lambda: server.status_of(first) == "completed", what="a task completed")

    # taskserver-admin finds the primary through the sentinels too
    admin_env = {k: v for k, v in os.environ.items() if not k.startswith("REDIS_")}

    def completed_by_admin() -> int:
        report = subprocess.run(
            [ADMIN, "stats", "--json"],
            cwd=tmp_path,
            env={**admin_env, **environ},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert report.returncode == 0, report.stderr
        return int(json.loads(report.stdout)["totals"]["completed"])

    # The children add their counts to Redis once a second: the total comes a moment later.
    wait_for(lambda: completed_by_admin() >= 1, what="taskserver-admin counting the task")

    poster = Poster(server)
    wait_for(lambda: len(poster.accepted) >= 5, what="load accepted")
    killed_at = time.monotonic()
    old = guarded.kill_primary()
    failover_s = guarded.wait_for_failover(old)
    new = guarded.primary()
    assert new is not None
    wait_for(
        lambda: any(sent > killed_at and code == 202 for sent, code, _ in poster.answers),
        timeout=failover_s + 10,
        what="a 202 after the failover",
    )
    poster.stop()
    after = [
        (sent - killed_at, code, took) for sent, code, took in poster.answers if sent > killed_at
    ]
    first_202 = next(at for at, code, _ in after if code == 202)
    refused = [(at, code, took) for at, code, _took in after if code != 202 for took in [_took]]
    window = max((at + took for at, _, took in refused), default=0.0)
    print(
        f"failover (sentinels) {failover_s:.2f} s; first 202 {first_202:.2f} s after the kill; "
        f"{len(refused)} refused answers, last one done {window:.2f} s after the kill; "
        f"slowest refusal {max((t for _, _, t in refused), default=0):.2f} s"
    )
    assert first_202 <= failover_s + 2.0
    assert {code for _, code, _ in refused} <= {503}, "refused with a 503, never a hang or 500"
    assert all(took < 2.5 for _, _, took in refused), "503s come fast (REDIS_TIMEOUT is 1 s)"

    # consumers resume on the new primary: tasks accepted after the failover complete
    last = server.post_task("after-the-failover")
    assert last
    wait_for(lambda: server.status_of(last) == "completed", timeout=20, what="consumers resumed")
    late = [task_id for task_id in poster.accepted[-5:]]
    wait_for(
        lambda: all(server.status_of(task_id) == "completed" for task_id in late),
        timeout=20,
        what="the load's last tasks completed",
    )
    # /readyz and taskserver-admin follow the new primary too (admin: a process started now)
    assert server.request("GET", "/readyz")[0] == 200
    wait_for(lambda: completed_by_admin() >= 6, what="taskserver-admin counting after the failover")
    output = server.output
    assert f"Redis primary of 'mymaster' is {HOST}:{new.port}" in output
    lost = output.count("Redis primary of 'mymaster' lost")
    found_new = output.count(f"Redis primary of 'mymaster' is {HOST}:{new.port}")
    assert 1 <= lost <= 3 and 1 <= found_new <= 3, "one line per change per process (master, 2)"
    assert server.stop(signal.SIGTERM) == 0


#: The handler's time in test_a_waiting_get_...: the task finishes well after the failover.
WAITED_TASK_S = 8.0


@pytest.mark.serial  # a failover, bounded in time
def test_a_waiting_get_answers_when_its_task_completes_after_a_failover(
    deployment: SentinelDeployment, twistd: Callable[..., Twistd]
) -> None:
    """A ``?wait=30`` GET open while the primary is SIGKILLed: the waiters' subscription
    (on the dead primary) is lost, the child subscribes again on the new primary, and the
    task, finished there after the failover, wakes the GET through the new primary's
    Pub/Sub long before its 30 s are up. A subscriber that did not reconnect (tried by
    hand: its slots told not to) left the GET to its deadline: answered at 30.00 s."""
    server = twistd(
        WORKERS="2",
        RATE_LIMITS="",
        TASK_HANDLER="sample_handlers:slow",
        SLOW_HANDLER_S=str(WAITED_TASK_S),
        **sentinel_environment(deployment),
    )
    server.wait_until_ready(2)
    task_id = server.post_task("waits-across-a-failover")
    assert task_id
    wait_for(lambda: server.status_of(task_id) == "processing", what="the task running")
    (replica,) = deployment.replicas()
    record_key = f"taskserver:{{q}}:task:{task_id}"
    wait_for(
        lambda: deployment.data_command(replica, "HGET", record_key, "status") == "processing",
        what="the replica has the running task's record",
    )
    waiting, answer = waiting_get(server, task_id)
    wait_for(lambda: open_waiters(server) == 1, what="the GET waiting")
    killed_at = time.monotonic()
    old = deployment.kill_primary()
    failover_s = deployment.wait_for_failover(old)
    waiting.join(40)
    ((took, code, record),) = answer
    answered_after_kill = time.monotonic() - killed_at
    print(
        f"failover {failover_s:.2f} s; the ?wait= GET answered {code} {record.get('status')} "
        f"after {took:.2f} s (the task takes {WAITED_TASK_S:g} s)"
    )
    assert code == 200 and record["status"] == "completed", (code, record)
    assert took < 20, f"answered at {took:.2f} s: by its deadline, not by the news"
    assert answered_after_kill > failover_s, "the task finished before the failover"


RECLAIMED = re.compile(r"gave (\d+) in-flight task\(s\) of worker-\d+ back to the queue")


@pytest.mark.serial  # a failover, bounded in time
def test_the_master_gives_dead_children_s_tasks_back_on_the_new_primary(
    deployment: SentinelDeployment, twistd: Callable[..., Twistd]
) -> None:
    """After a failover, both children SIGKILLed with tasks in flight: the master (which
    connects only to give tasks back) finds the new primary through the sentinels, moves
    their tasks back there as suspects, and the replacement children take them again
    (suspects run alone: one at a time, the others wait on the new primary)."""
    server = twistd(
        WORKERS="2",
        RATE_LIMITS="",
        TASK_HANDLER="sample_handlers:slow",
        SLOW_HANDLER_S="30",
        **sentinel_environment(deployment),
    )
    children = server.wait_until_ready(2)
    task_ids = [server.post_task(f"held-{n}") for n in range(10)]
    assert all(task_ids)
    (replica,) = deployment.replicas()

    def running_on_the_replica() -> bool:
        return all(
            deployment.data_command(replica, "HGET", f"taskserver:{{q}}:task:{t}", "status")
            == "processing"
            for t in task_ids
        )

    wait_for(running_on_the_replica, what="every task running, its record on the replica")
    old = deployment.kill_primary()
    deployment.wait_for_failover(old)
    new = deployment.primary()
    assert new is not None
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    wait_for(
        lambda: sum(int(n) for n in RECLAIMED.findall(server.output)) >= len(task_ids),
        timeout=30,
        what="the master giving every in-flight task back",
    )

    def on_the_new_primary() -> tuple[Counter[str | None], int]:
        statuses = Counter(
            deployment.data_command(new, "HGET", f"taskserver:{{q}}:task:{t}", "status")
            for t in task_ids
        )
        return statuses, int(deployment.data_command(new, "LLEN", "taskserver:{q}:suspects"))

    # given back, a task is queued again (as a suspect); suspects run alone, so the
    # replacements take them one at a time (processing: only they are alive to run it)
    def taken_again() -> bool:
        statuses, suspects = on_the_new_primary()
        return statuses["processing"] >= 1 and statuses["processing"] + suspects == len(task_ids)

    wait_for(taken_again, timeout=30, what="the tasks given back, and taken again, there")
    statuses, suspects = on_the_new_primary()
    print(f"on the new primary after the give-back: {dict(statuses)}, {suspects} suspects")
    assert set(statuses) <= {"queued", "processing"}, statuses
