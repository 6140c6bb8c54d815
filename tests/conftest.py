"""Shared fixtures: a real Redis-protocol server, Redis clients, an in-process server.

The Redis server is started once per session through the product's own
embedded-Redis mechanism, on a free loopback port. Every test gets its own
key prefix, so tests never see each other's keys.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
import txredisapi
from twisted.internet import defer, reactor, task

from harness import Twistd
from taskserver.cluster.child import ChildService
from taskserver.cluster.embedded import EmbeddedRedis, find_server_binary
from taskserver.cluster.listener import bind_listener
from taskserver.config import RedisAddress, Settings, parse_rate_limits
from taskserver.keys import Keys
from taskserver.tasklog import TaskLogFile

T = TypeVar("T")


async def eventually(
    check: Callable[[], Awaitable[T]], timeout: float = 10.0, interval: float = 0.02
) -> T:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = reactor.seconds() + timeout
    while True:
        result = await check()
        if result:
            return result
        if reactor.seconds() > deadline:
            raise AssertionError(f"condition not met within {timeout} s (last: {result!r})")
        await task.deferLater(reactor, interval)


def sleep(seconds: float) -> defer.Deferred[None]:
    """For pacing a client (test input), never for synchronisation."""
    return task.deferLater(reactor, seconds)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisAddress]:
    """A real valkey/redis server on a free loopback port, for the whole session."""
    data_dir = tmp_path_factory.mktemp("redis-data")
    server = EmbeddedRedis(find_server_binary(None), data_dir, reactor)
    address = pytest_twisted.blockon(defer.Deferred.fromCoroutine(server.start()))
    yield address
    pytest_twisted.blockon(server.stopService())


def connect_raw(address: RedisAddress, poolsize: int = 2) -> Any:
    return txredisapi.lazyConnectionPool(
        host=address.host, port=address.port, poolsize=poolsize, convertNumbers=False
    )


@pytest_twisted.async_yield_fixture
async def redis(redis_server: RedisAddress) -> AsyncIterator[Any]:
    """A plain Redis client for arranging and inspecting state."""
    client = connect_raw(redis_server)
    await client._factory.deferred
    yield client
    await client.disconnect()


@pytest.fixture
def keys() -> Keys:
    return Keys(f"t{uuid.uuid4().hex[:10]}")


@pytest.fixture
def settings(redis_server: RedisAddress, keys: Keys, tmp_path: Path) -> Settings:
    return Settings(
        port=0,
        interface="127.0.0.1",
        log_dir=tmp_path / "logs",
        data_dir=tmp_path / "data",
        redis=redis_server,
        concurrency=2,
        rate_limits=parse_rate_limits("1/1s,20/60s"),
        key_prefix=keys.prefix,
        heartbeat_ttl_s=1.0,
        shutdown_timeout_s=2.0,
    )


class RunningServer:
    """A ChildService on a loopback port, as one cluster child runs it, in this process."""

    def __init__(
        self,
        settings: Settings,
        handler: Callable[[dict[str, Any]], Any],
        kill: Callable[[], None] | None = None,
        typed_handlers: dict[str, Callable[[dict[str, Any]], Any]] | None = None,
    ) -> None:
        self.settings = settings
        self.listener = bind_listener("127.0.0.1", 0)
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.task_log_file = TaskLogFile(settings.log_dir, settings.task_log_max_bytes)
        assert settings.redis is not None
        self.child = ChildService(
            settings,
            settings.redis,
            self.listener.fileno(),
            self.listener.family,
            handler,
            reactor,
            self.task_log_file.write_line,
            kill=kill,
            typed_handlers=typed_handlers,
        )

    def start(self) -> None:
        self.child.startService()

    async def stop(self) -> None:
        """Stop once; later calls do nothing."""
        if not self.child.running:
            return
        await self.child.stopService()
        self.listener.close()
        self.task_log_file.close()

    @property
    def task_log(self) -> Path:
        return self.settings.log_dir / "tasks.log"


@pytest.fixture
def start_server(settings: Settings) -> Iterator[Callable[..., RunningServer]]:
    """Start in-process servers; ``start_server(handler=..., **setting_overrides)``."""
    started: list[RunningServer] = []

    def start(
        handler: Callable[[dict[str, Any]], Any] | None = None,
        kill: Callable[[], None] | None = None,
        typed_handlers: dict[str, Callable[[dict[str, Any]], Any]] | None = None,
        **overrides: Any,
    ) -> RunningServer:
        server = RunningServer(
            replace(settings, **overrides), handler or (lambda task: None), kill, typed_handlers
        )
        server.start()
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        pytest_twisted.blockon(defer.Deferred.fromCoroutine(server.stop()))


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def twistd(tmp_path: Path) -> Iterator[Callable[..., Twistd]]:
    """Start ``twistd -n taskserver`` processes in tmp_path; killed at teardown if still running."""
    running: list[Twistd] = []

    def start(**environ: str) -> Twistd:
        server = Twistd(tmp_path, environ)
        running.append(server)
        return server

    yield start
    for server in running:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(10)
