"""The embedded Redis: binary lookup, data-folder lock, persistence, and surviving its restart."""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from fake_process import FakeProcess, FakeProcessReactor
from twisted.application.internet import ClientService
from twisted.internet import defer, reactor, task
from twisted.logger import LogEvent, LogLevel, capturedLogs, formatEvent

from conftest import RunningServer, connect_raw, eventually
from taskserver.backoff import MAX_BACKOFF_S, backoff_delay
from taskserver.cluster.embedded import (
    EMBEDDED_ADDRESS_FILE,
    KILL_WAIT_S,
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    EmbeddedRedis,
    StoppedWhileStarting,
    bundled_binary,
    find_server_binary,
    free_loopback_port,
    lock_data_dir,
    read_embedded_address,
    write_embedded_address,
)
from taskserver.config import ConfigError, RedisAddress
from taskserver.redisclient import (
    AUTH_FAILED_PREFIX,
    RECONNECT_INITIAL_DELAY_S,
    RECONNECT_LOG_FORMAT,
    RECONNECT_MAX_DELAY_S,
    SETUP_REFUSED_LOG_EVERY_S,
    RedisLinkWatch,
    RedisUnavailable,
    connect,
    within,
    without_reconnect_attempts,
)


def test_explicit_binary_must_exist() -> None:
    with pytest.raises(ConfigError, match="REDIS_SERVER_BIN: '/nope/redis-server' is not"):
        find_server_binary("/nope/redis-server")


def test_bundled_binary_is_found_without_one_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    assert find_server_binary(None).endswith("valkey-server")


def test_one_server_per_data_folder(tmp_path: Path) -> None:
    held = lock_data_dir(tmp_path)
    try:
        with pytest.raises(ConfigError, match="is in use by another taskserver"):
            lock_data_dir(tmp_path)
    finally:
        held.close()
    lock_data_dir(tmp_path).close()


async def start_redis(data_dir: Path, port: int | None = None) -> EmbeddedRedis:
    server = EmbeddedRedis(find_server_binary(None), data_dir, reactor)
    await server.start(port)
    return server


@pytest_twisted.ensureDeferred
async def test_data_survives_a_restart(tmp_path: Path) -> None:
    server = await start_redis(tmp_path)
    assert server.address is not None
    client = connect_raw(server.address)
    await client.lpush("kept", "task")
    await client.disconnect()
    await server.stopService()

    again = await start_redis(tmp_path)
    assert again.address is not None
    client = connect_raw(again.address)
    try:
        assert await client.lrange("kept", 0, -1) == ["task"]
        policy = await client.execute_command("CONFIG", "GET", "maxmemory-policy")
        assert policy == ["maxmemory-policy", "noeviction"]
    finally:
        await client.disconnect()
        await again.stopService()


@pytest_twisted.ensureDeferred
async def test_server_recovers_when_redis_comes_back(
    start_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    """Redis stops and restarts on the same port: 503 meanwhile, then back to work by itself.

    The deadlines are generous (a loaded machine); how soon a child
    reconnects is the reconnect delay, checked above.
    """
    redis = await start_redis(tmp_path / "redis")
    address = redis.address
    assert address is not None
    server = start_server(redis=address, shutdown_timeout_s=0.5)

    async def post(user: str) -> Any:
        return await treq.post(
            server.url + "/api/v1/task",
            json={"user_id": user},
            headers={"Content-Type": "application/json"},
        )

    assert (await post("before")).code == 202
    await redis.stopService()
    assert (await post("during")).code == 503
    assert (await treq.get(server.url + "/readyz")).code == 503

    redis = await start_redis(tmp_path / "redis", port=address.port)
    try:

        async def accepted() -> Any:
            response = await post(f"after-{reactor.seconds()}")
            return response if response.code == 202 else None

        response = await eventually(accepted, timeout=30.0)

        watcher = connect_raw(redis.address)  # type: ignore[arg-type]

        async def every_consumer_waiting() -> bool:
            clients = await watcher.execute_command("CLIENT", "LIST")
            return str(clients).count("cmd=brpoplpush") == 1  # the dispatcher of the process

        await eventually(every_consumer_waiting, timeout=30.0)
        await watcher.disconnect()
        task_id = (await response.json())["task_id"]

        async def completed() -> bool:
            answer = await treq.get(f"{server.url}/api/v1/task/{task_id}")
            return (await answer.json()).get("status") == "completed"

        await eventually(completed, timeout=30.0)
    finally:
        await server.stop()
        await redis.stopService()


# ------------------------------------------------------------ supervision, on a fake reactor


class Events:
    def __init__(self) -> None:
        self.happened: list[str] = []


def fake_redis(
    tmp_path: Path, reactor: FakeProcessReactor, events: Events
) -> tuple[EmbeddedRedis, RedisAddress]:
    """An EmbeddedRedis on a fake process reactor, started on port 7777 and ready."""
    redis = EmbeddedRedis(
        "valkey-server",
        tmp_path,
        reactor,
        on_down=lambda: events.happened.append("down"),
        on_back=lambda: events.happened.append("back"),
    )
    started = defer.Deferred.fromCoroutine(redis.start(port=7777))
    server_ready(reactor.process(0))
    address = started.result
    return redis, address


def server_ready(process: FakeProcess) -> None:
    process.say(1, b"1:M * Ready to accept connections tcp\n")


def port_of(reactor: FakeProcessReactor, n: int) -> str:
    args = reactor.spawned[n][1]
    return args[args.index("--port") + 1]


def test_a_killed_server_is_restarted_at_once_on_its_port(tmp_path: Path) -> None:
    reactor, events = FakeProcessReactor(), Events()
    redis, address = fake_redis(tmp_path, reactor, events)
    with capturedLogs() as logged:
        reactor.process(0).exit(signal=9)
        assert len(reactor.spawned) == 2, "restarted at once, without waiting"
        assert port_of(reactor, 1) == "7777" and redis.address == address
        server_ready(reactor.process(1))
    assert events.happened == ["down", "back"]
    lines = [formatEvent(event) for event in logged if event["log_namespace"].endswith("Redis")]
    assert lines == [
        "embedded Redis (pid 1000) died: killed by signal 9; restarting it on port 7777",
        "embedded Redis is back (pid 1001) at 127.0.0.1:7777",
    ]


def test_a_taken_port_is_retried_with_the_childrens_back_off(tmp_path: Path) -> None:
    reactor, events = FakeProcessReactor(), Events()
    redis, _ = fake_redis(tmp_path, reactor, events)
    reactor.process(0).exit(signal=9)
    with capturedLogs() as logged:
        for failure in range(1, 5):
            spawned = len(reactor.spawned)
            process = reactor.process(spawned - 1)
            process.say(1, b"1:M # Warning: Could not create server TCP listening socket "
                           b"127.0.0.1:7777: bind: Address already in use\n")  # fmt: skip
            process.exit(code=1)
            reactor.advance(backoff_delay(failure) - 0.01)
            assert len(reactor.spawned) == spawned, "not before the back-off has passed"
            reactor.advance(0.01)
            assert len(reactor.spawned) == spawned + 1
            assert port_of(reactor, spawned) == "7777"
    messages = [formatEvent(event) for event in logged if event["log_level"] == LogLevel.error]
    assert len(messages) == 4, "one line per attempt, not per reconnect"
    assert messages[0] == (
        "embedded Redis could not restart: port 7777 is in use by another process; "
        f"trying again in {backoff_delay(1):g} s (1 failure(s) in a row)"
    )
    server_ready(reactor.process(len(reactor.spawned) - 1))
    assert events.happened == ["down", "back"] and redis.failures == 0


def test_stopping_during_the_back_off_starts_nothing_more(tmp_path: Path) -> None:
    reactor, events = FakeProcessReactor(), Events()
    redis, _ = fake_redis(tmp_path, reactor, events)
    reactor.process(0).exit(signal=9)
    reactor.process(1).exit(code=1)
    stopped = redis.stopService()
    assert stopped.called
    reactor.advance(MAX_BACKOFF_S * 2)
    assert len(reactor.spawned) == 2 and events.happened == ["down"]


def test_a_server_we_stop_is_not_restarted(tmp_path: Path) -> None:
    reactor, events = FakeProcessReactor(), Events()
    redis, _ = fake_redis(tmp_path, reactor, events)
    stopped = redis.stopService()
    assert reactor.process(0).signals == ["TERM"]
    reactor.process(0).exit(0)
    assert stopped.called
    reactor.advance(60)
    assert len(reactor.spawned) == 1 and events.happened == []


def test_the_address_file_is_written_and_read_in_one_place(tmp_path: Path) -> None:
    assert read_embedded_address(tmp_path) is None
    write_embedded_address(tmp_path, RedisAddress(host="127.0.0.1", port=7777))
    assert read_embedded_address(tmp_path) == RedisAddress(host="127.0.0.1", port=7777)


def test_the_bundled_binary_is_found_in_valkeylites_installed_files() -> None:
    path = bundled_binary()
    assert path.name == "valkey-server" and os.access(path, os.X_OK)


def test_reconnect_attempts_are_not_logged_but_other_lines_are() -> None:
    seen: list[LogEvent] = []
    observer = without_reconnect_attempts(seen.append)
    retry = {
        "log_namespace": "twisted.application._client_service.ClientService",
        "log_format": "Scheduling retry {attempt} to connect {endpoint} in {delay} seconds.",
        "log_level": LogLevel.info,
    }
    dead = {"log_namespace": "log_legacy", "message": ("Discarding dead connection.",)}
    kept = {"log_namespace": "taskserver.x", "log_format": "Redis reachable again"}
    for event in (retry, dead, kept):
        observer(event)
    assert seen == [kept]


def test_client_service_still_logs_its_retries_where_the_filter_looks() -> None:
    """Breaks if Twisted renames the retry line or its logger: the filter would let it through."""
    source = inspect.getsource(sys.modules[ClientService.__module__])
    source += inspect.getsource(sys.modules["twisted.application._client_service"])
    assert f'"{RECONNECT_LOG_FORMAT} {{attempt}}' in source
    assert ClientService._log.namespace.endswith(".ClientService")


def test_txredisapi_honours_our_reconnect_delays() -> None:
    """The one private attribute of txredisapi we set: breaks if it stops meaning anything."""
    handler = connect(RedisAddress(host="127.0.0.1", port=free_loopback_port()), 1, 1.0)
    try:
        factory = handler._factory
        assert factory.initialDelay == RECONNECT_INITIAL_DELAY_S
        assert all(factory.retryDelay(n) <= RECONNECT_MAX_DELAY_S * 1.6 for n in range(1, 50))
    finally:
        handler.disconnect()
    assert RECONNECT_MAX_DELAY_S < 2.0, "children reconnect within 2 s of a restart"


def test_txredisapi_still_gives_up_through_the_factory_after_a_failed_auth() -> None:
    """What connect() overrides for pools with a password: breaks if txredisapi moves it."""
    import txredisapi

    source = inspect.getsource(txredisapi.RedisProtocol.connectionMade)
    assert "self.factory.stopTrying()" in source and "could not auth" in source
    address = RedisAddress(host="127.0.0.1", port=free_loopback_port(), password="p")
    handler = connect(address, 1, 1.0)
    try:
        assert handler._factory.stopTrying().called
        assert not handler._factory.stopped, "still trying"
    finally:
        handler.disconnect()


@pytest_twisted.ensureDeferred
async def test_link_watch_logs_changes_of_state_only() -> None:
    clock = task.Clock()

    class Redis:
        answering = True

        def ping(self) -> defer.Deferred[str]:
            return defer.succeed("PONG") if self.answering else defer.Deferred()

    redis = Redis()
    watch = RedisLinkWatch(redis, clock, timeout_s=1.0, every_s=0.5)
    with capturedLogs() as logged:
        watch.startService()
        clock.advance(0.5)
        redis.answering = False
        for _ in range(10):
            clock.advance(0.5)
        assert not watch.up
        redis.answering = True
        for _ in range(10):
            clock.advance(0.5)
        await watch.stopService()
    lines = [formatEvent(event) for event in logged]
    assert lines == [
        "Redis unreachable (no answer within 1 s); waiting for it to come back",
        "Redis reachable again",
    ]


def test_a_restart_that_hangs_is_stopped_and_tried_again(tmp_path: Path) -> None:
    reactor, events = FakeProcessReactor(), Events()
    fake_redis(tmp_path, reactor, events)
    reactor.process(0).exit(signal=9)
    reactor.advance(START_TIMEOUT_S)
    assert reactor.process(1).signals == ["TERM"], "the hung server is stopped"
    reactor.process(1).exit(0)
    reactor.advance(backoff_delay(1))
    assert len(reactor.spawned) == 3 and port_of(reactor, 2) == "7777"
    server_ready(reactor.process(2))
    assert events.happened == ["down", "back"]


# ------------------------------------------------ stopping races, slow loads, failed forks, kills


def test_a_stop_while_a_hung_restart_is_being_stopped_waits_for_it(tmp_path: Path) -> None:
    reactor, events = FakeProcessReactor(), Events()
    redis, _ = fake_redis(tmp_path, reactor, events)
    reactor.process(0).exit(signal=9)
    reactor.advance(START_TIMEOUT_S)
    assert reactor.process(1).signals == ["TERM"], "the hung restart is being stopped"
    stopped = redis.stopService()
    assert not stopped.called, "a valkey-server still runs: the DATA_DIR lock must stay held"
    reactor.advance(STOP_TIMEOUT_S)
    assert reactor.process(1).signals == ["TERM", "KILL"]
    assert not stopped.called, "not even after SIGKILL, until it has exited"
    reactor.process(1).exit(signal=9)
    assert stopped.called and redis.killed
    reactor.advance(MAX_BACKOFF_S * 2)
    assert len(reactor.spawned) == 2


def test_a_stop_waits_a_bounded_time_after_sigkill(tmp_path: Path) -> None:
    reactor, events = FakeProcessReactor(), Events()
    redis, _ = fake_redis(tmp_path, reactor, events)
    stopped = redis.stopService()
    assert not redis.killed
    reactor.advance(STOP_TIMEOUT_S)
    assert reactor.process(0).signals == ["TERM", "KILL"] and redis.killed
    reactor.advance(KILL_WAIT_S - 0.01)
    assert not stopped.called
    reactor.advance(0.01)
    assert stopped.called, "a process that ignores SIGKILL does not hang the master forever"


def test_a_clean_stop_is_not_reported_as_a_kill(tmp_path: Path) -> None:
    reactor, events = FakeProcessReactor(), Events()
    redis, _ = fake_redis(tmp_path, reactor, events)
    stopped = redis.stopService()
    reactor.process(0).exit(0)
    assert stopped.called and not redis.killed


def test_a_restart_ready_as_the_stop_begins_is_not_announced(tmp_path: Path) -> None:
    reactor, events = FakeProcessReactor(), Events()
    redis, _ = fake_redis(tmp_path, reactor, events)
    reactor.process(0).exit(signal=9)
    stopped = redis.stopService()
    assert reactor.process(1).signals == ["TERM"]
    server_ready(reactor.process(1))  # it was ready just before the TERM reached it
    reactor.process(1).exit(0)
    assert stopped.called
    assert events.happened == ["down"], "no on_back after stopService: no pool to leak"


def test_a_stop_during_the_first_start_fails_the_start(tmp_path: Path) -> None:
    reactor = FakeProcessReactor()
    redis = EmbeddedRedis("valkey-server", tmp_path, reactor)
    started = defer.Deferred.fromCoroutine(redis.start())
    stopped = redis.stopService()
    assert reactor.process(0).signals == ["TERM"]
    server_ready(reactor.process(0))
    failure = started.result
    started.addErrback(lambda _: None)
    assert isinstance(failure.value, StoppedWhileStarting)
    assert not stopped.called
    reactor.process(0).exit(0)
    assert stopped.called


def test_a_restart_that_keeps_writing_or_is_loading_is_not_killed(tmp_path: Path) -> None:
    """A large AOF takes minutes to replay: silence is the deadline, and loading suspends it."""
    reactor, events = FakeProcessReactor(), Events()
    fake_redis(tmp_path, reactor, events)
    reactor.process(0).exit(signal=9)
    restarted = reactor.process(1)
    for _ in range(5):
        reactor.advance(START_TIMEOUT_S - 1)
        restarted.say(1, b"1:M * Server initialized\n")
    assert restarted.signals == [], "it kept writing"
    restarted.say(1, b"1:M * Reading RDB base file on AOF loading...\n")
    reactor.advance(START_TIMEOUT_S * 20)
    assert restarted.signals == [], "it is loading its data"
    server_ready(restarted)
    assert events.happened == ["down", "back"]


def test_a_failed_fork_is_a_failed_restart_attempt(tmp_path: Path) -> None:
    class FlakyFork(FakeProcessReactor):
        failing = False

        def spawnProcess(self, *args: Any, **kwargs: Any) -> FakeProcess:
            if self.failing:
                raise OSError(12, "Cannot allocate memory")
            return super().spawnProcess(*args, **kwargs)

    reactor, events = FlakyFork(), Events()
    redis, _ = fake_redis(tmp_path, reactor, events)  # type: ignore[arg-type]
    reactor.failing = True
    with capturedLogs() as logged:
        reactor.process(0).exit(signal=9)
        reactor.failing = False
        reactor.advance(backoff_delay(1))
    assert len(reactor.spawned) == 2, "tried again after the back-off"
    messages = [formatEvent(event) for event in logged if event["log_level"] == LogLevel.error]
    assert messages == [
        "embedded Redis could not restart: [Errno 12] Cannot allocate memory; "
        f"trying again in {backoff_delay(1):g} s (1 failure(s) in a row)"
    ]
    server_ready(reactor.process(1))
    assert events.happened == ["down", "back"] and redis.failures == 0


def test_only_a_start_that_succeeds_relays_the_servers_output(tmp_path: Path) -> None:
    reactor, events = FakeProcessReactor(), Events()
    fake_redis(tmp_path, reactor, events)
    reactor.process(0).exit(signal=9)
    with capturedLogs() as logged:
        failing = reactor.process(1)
        for line in (b"1:M * Valkey is starting\n", b"1:M * Configuration loaded\n"):
            failing.say(1, line)
        failing.say(
            1, b"1:M # Could not create server TCP listening socket: Address already in use\n"
        )
        failing.exit(code=1)
        reactor.advance(backoff_delay(1))
        succeeding = reactor.process(2)
        succeeding.say(1, b"1:M * Valkey is starting\n")
        server_ready(succeeding)
        succeeding.say(1, b"1:M * Background AOF rewrite started\n")
    relayed = [
        formatEvent(event) for event in logged if event["log_namespace"].endswith("_ServerProcess")
    ]
    assert relayed == [
        "[redis] 1:M * Valkey is starting",
        "[redis] 1:M * Ready to accept connections tcp",
        "[redis] 1:M * Background AOF rewrite started",
    ]
    others = [e for e in logged if not e["log_namespace"].endswith("_ServerProcess")]
    assert len(others) == 2, "the failed attempt is one line, the return another"


def test_the_password_goes_to_the_server_on_stdin_not_on_its_command_line(tmp_path: Path) -> None:
    reactor = FakeProcessReactor()
    redis = EmbeddedRedis("valkey-server", tmp_path, reactor, password="s3cret")
    started = defer.Deferred.fromCoroutine(redis.start(port=7777))
    process, args, _ = reactor.spawned[0]
    assert process.stdin == b"requirepass s3cret\n" and process.stdin_closed
    assert "-" in args and not any("s3cret" in arg for arg in args)
    server_ready(process)
    assert started.result == RedisAddress(host="127.0.0.1", port=7777, password="s3cret")
    process.exit(signal=9)
    assert reactor.process(1).stdin == b"requirepass s3cret\n", "kept across restarts"


@pytest_twisted.ensureDeferred
async def test_a_client_without_the_password_is_refused(tmp_path: Path) -> None:
    server = EmbeddedRedis(find_server_binary(None), tmp_path, reactor, password="pw-" + "x" * 20)
    address = await server.start()
    stranger = connect_raw(address)
    ours = connect(address, 1, 5.0)
    try:
        with pytest.raises(Exception, match=r"(?i)auth"):
            await stranger.ping()
        assert await ours.ping() == "PONG"
    finally:
        await stranger.disconnect()
        await ours.disconnect()
        await server.stopService()


def test_the_address_file_keeps_the_password_from_other_users(tmp_path: Path) -> None:
    address = RedisAddress(host="127.0.0.1", port=7777, password="s3cret")
    (tmp_path / EMBEDDED_ADDRESS_FILE).write_text("{}")
    (tmp_path / EMBEDDED_ADDRESS_FILE).chmod(0o644)
    path = write_embedded_address(tmp_path, address)
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_embedded_address(tmp_path) == address


def test_failed_auth_lines_are_written_once_a_minute() -> None:
    seen: list[LogEvent] = []
    observer = without_reconnect_attempts(seen.append)
    for at in (0.0, 1.0, SETUP_REFUSED_LOG_EVERY_S - 0.5, SETUP_REFUSED_LOG_EVERY_S + 0.5):
        observer(
            {
                "log_namespace": "log_legacy",
                "message": (f"{AUTH_FAILED_PREFIX}: Not received Redis response in 1.0 seconds",),
                "log_time": at,
            }
        )
    assert [event["log_time"] for event in seen] == [0.0, SETUP_REFUSED_LOG_EVERY_S + 0.5]


@pytest_twisted.ensureDeferred
async def test_a_client_that_met_a_squatter_reconnects_to_the_real_server(tmp_path: Path) -> None:
    """txredisapi gives up for good after a failed AUTH; our pools keep trying."""
    from twisted.internet import protocol

    met: list[int] = []

    class HangUp(protocol.Protocol):
        def connectionMade(self) -> None:
            met.append(1)
            self.transport.loseConnection()  # type: ignore[union-attr]

    port = free_loopback_port()
    squatter = reactor.listenTCP(port, protocol.Factory.forProtocol(HangUp), interface="127.0.0.1")
    password = "pw-" + "y" * 20
    client = connect(RedisAddress(host="127.0.0.1", port=port, password=password), 1, 1.0)

    async def met_the_squatter_twice() -> bool:  # its AUTH failed, and it tried again
        return len(met) >= 2

    await eventually(met_the_squatter_twice, timeout=20.0)
    await squatter.stopListening()
    server = EmbeddedRedis(find_server_binary(None), tmp_path, reactor, password=password)
    await server.start(port=port)
    try:

        async def answers() -> bool:
            try:
                return await within(client.ping(), 1.0, reactor) == "PONG"
            except RedisUnavailable:
                return False

        await eventually(answers, timeout=20.0)
    finally:
        await client.disconnect()
        await server.stopService()
