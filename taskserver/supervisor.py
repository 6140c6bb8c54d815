# -*- test-case-name: tests.test_supervisor -*-
"""The master's children: spawn N, relay their output, replace the ones that exit.

Modelled on Twisted's ``twisted.runner.procmon.ProcessMonitor``, plus what
it lacks for a server: extra file descriptors for each child (the shared
socket), a readiness signal, a ``stopService`` that waits until every child
has really exited (SIGTERM, then SIGKILL after a timeout), and rolling
restarts.

Restart policy: a child that exits after it said it was ready is replaced
at once, whatever the cause (crash, SIGKILL, ``/kill``, OOM). A child that
exits before it was ready is crash-looping (a broken deployment): it is
restarted with exponential back-off (:mod:`taskserver.backoff`), logged, so it cannot spin the CPU.
The supervisor itself never stops because children die.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from taskserver.backoff import backoff_delay

#: How long a rolling restart waits for a new child to say it is ready.
READY_TIMEOUT_S = 30.0
#: A stopping child gets its shutdown timeout plus this much before SIGKILL.
KILL_GRACE_S = 5.0
STDOUT, STDERR, RECORDS = 1, 2, 5
MAX_LINE_BYTES = 64 * 1024


class WorkerDied(Exception):
    """A child exited before it said it was ready."""


@dataclass(eq=False)
class Worker:
    """One child process in one slot."""

    slot: int
    generation: int
    seat: int
    process_id: str
    transport: Any = None
    pid: int | None = None
    ready: bool = False
    retiring: bool = False
    became_ready: defer.Deferred[None] = field(default_factory=defer.Deferred)
    ended: defer.Deferred[None] = field(default_factory=defer.Deferred)

    @property
    def name(self) -> str:
        return f"worker-{self.slot}"

    def signal(self, name: str) -> None:
        with contextlib.suppress(error.ProcessExitedAlready, AttributeError):
            self.transport.signalProcess(name)


class _WorkerProtocol(protocol.ProcessProtocol):
    """Feeds a child its configuration and splits what it writes into lines."""

    def __init__(self, supervisor: Supervisor, worker: Worker, config: bytes) -> None:
        self._supervisor = supervisor
        self._worker = worker
        self._config = config
        self._partial: dict[int, bytes] = {}

    def connectionMade(self) -> None:
        transport: Any = self.transport
        self._worker.pid = transport.pid
        transport.write(self._config)  # stdin stays open: its EOF tells the child we are gone

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        *lines, rest = (self._partial.get(childFD, b"") + data).split(b"\n")
        if len(rest) > MAX_LINE_BYTES:
            lines.append(rest)
            rest = b""
        self._partial[childFD] = rest
        for line in lines:
            self._supervisor._line(self._worker, childFD, line.decode("utf-8", "replace"))

    def processEnded(self, reason: Failure) -> None:
        for childFD, rest in self._partial.items():
            if rest:
                self._supervisor._line(self._worker, childFD, rest.decode("utf-8", "replace"))
        self._partial = {}
        self._supervisor._exited(self._worker, reason)


class Supervisor(Service):
    """Keeps ``count`` children running; each gets a slot, a seat and a unique process id.

    Seats (for the balancing scoreboard) alternate between two per slot, so a
    replacement started during a rolling restart never shares one with the
    child it replaces: there are ``2 * count`` seats.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        count: int,
        *,
        argv: list[str],
        env: dict[str, str],
        extra_fds: dict[int, int],
        config_for: Callable[[Worker], bytes],
        on_record: Callable[[Worker, str], None],
        on_exit: Callable[[Worker], None],
        process_id_for: Callable[[int, int], str],
        stop_timeout_s: float,
    ) -> None:
        self._reactor = reactor
        self.count = count
        self._argv = argv
        self._env = env
        self._extra_fds = extra_fds
        self._config_for = config_for
        self._on_record = on_record
        self._on_exit = on_exit
        self._process_id_for = process_id_for
        self._stop_timeout_s = stop_timeout_s
        self.workers: dict[int, Worker] = {}
        self._retiring: set[Worker] = set()
        self._generations: dict[int, int] = {}
        self._failures: dict[int, int] = {}
        self._restarts: dict[int, IDelayedCall] = {}
        self._rolling = False

    # ------------------------------------------------------------ lifecycle

    def startService(self) -> None:
        super().startService()
        for slot in range(self.count):
            self._spawn(slot)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop_all())

    async def _stop_all(self) -> None:
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts = {}
        everyone = list(self.workers.values()) + list(self._retiring)
        await defer.DeferredList(
            [defer.Deferred.fromCoroutine(self._retire(worker)) for worker in everyone]
        )

    @staticmethod
    def seats_for(count: int) -> int:
        """Scoreboard seats for ``count`` slots: two each (see the class docstring)."""
        return 2 * count

    @property
    def seats(self) -> int:
        return self.seats_for(self.count)

    # ------------------------------------------------------------ spawning

    def _spawn(self, slot: int) -> Worker:
        generation = self._generations.get(slot, -1) + 1
        self._generations[slot] = generation
        worker = Worker(
            slot=slot,
            generation=generation,
            seat=slot + self.count * (generation % 2),
            process_id=self._process_id_for(slot, generation),
        )
        worker.became_ready.addErrback(lambda failure: None)  # nobody may be waiting
        self.workers[slot] = worker
        child_fds: dict[int, Any] = {0: "w", STDOUT: "r", STDERR: "r", RECORDS: "r"}
        child_fds.update(self._extra_fds)
        worker.transport = self._reactor.spawnProcess(
            _WorkerProtocol(self, worker, self._config_for(worker)),
            self._argv[0],
            self._argv,
            env=self._env,
            childFDs=child_fds,
        )
        self.log.info("{name} started (pid {pid})", name=worker.name, pid=worker.pid)
        return worker

    def _restart_later(self, slot: int) -> None:
        failures = self._failures.get(slot, 0)
        delay = backoff_delay(failures)
        if delay:
            self.log.warn(
                "worker-{slot} died before it was ready ({n} time(s) in a row); "
                "restarting in {delay:g} s",
                slot=slot,
                n=failures,
                delay=delay,
            )
        self._restarts[slot] = self._reactor.callLater(delay, self._restart_now, slot)

    def _restart_now(self, slot: int) -> None:
        self._restarts.pop(slot, None)
        if self.running:
            self._spawn(slot)

    # ------------------------------------------------------------ events from children

    def _line(self, worker: Worker, fd: int, line: str) -> None:
        if fd == RECORDS:
            if line == "ready":
                self._became_ready(worker)
            else:
                self._on_record(worker, line)
        else:
            self.log.info("[{name} {pid}] {line}", name=worker.name, pid=worker.pid, line=line)

    def _became_ready(self, worker: Worker) -> None:
        self.log.info("{name} (pid {pid}) ready", name=worker.name, pid=worker.pid)
        worker.ready = True
        self._failures[worker.slot] = 0
        worker.became_ready.callback(None)

    def _exited(self, worker: Worker, reason: Failure) -> None:
        how = describe_exit(reason)
        planned = worker.retiring
        self._retiring.discard(worker)
        if not worker.became_ready.called:
            worker.became_ready.errback(WorkerDied(f"{worker.name} {how}"))
        if planned:
            self.log.info(
                "{name} (pid {pid}) stopped: {how}", name=worker.name, pid=worker.pid, how=how
            )
        else:
            self.log.warn(
                "{name} (pid {pid}) died: {how}", name=worker.name, pid=worker.pid, how=how
            )
        self._on_exit(worker)
        worker.ended.callback(None)
        if self.workers.get(worker.slot) is worker:
            del self.workers[worker.slot]
            if self.running and not planned:
                if not worker.ready:
                    self._failures[worker.slot] = self._failures.get(worker.slot, 0) + 1
                self._restart_later(worker.slot)

    # ------------------------------------------------------------ stopping and rolling

    async def _retire(self, worker: Worker) -> None:
        """SIGTERM, then SIGKILL if it has not exited in time; returns when it has."""
        if worker.ended.called:
            return
        worker.retiring = True
        self._retiring.add(worker)
        worker.signal("TERM")
        deadline = self._reactor.callLater(
            self._stop_timeout_s + KILL_GRACE_S, self._kill_slow, worker
        )
        await worker.ended
        if deadline.active():
            deadline.cancel()

    def _kill_slow(self, worker: Worker) -> None:
        self.log.warn(
            "{name} (pid {pid}) did not stop in time; killing it", name=worker.name, pid=worker.pid
        )
        worker.signal("KILL")

    async def rolling_restart(self) -> None:
        """Replace children one at a time: start the new one, wait until ready, retire the old.

        The listening socket stays open throughout, so no connection is refused.
        """
        if self._rolling:
            self.log.info("a rolling restart is already in progress")
            return
        self._rolling = True
        try:
            for slot in range(self.count):
                if not self.running:
                    return
                old = self.workers.get(slot)
                new = self._spawn(slot)
                try:
                    await new.became_ready.addTimeout(READY_TIMEOUT_S, self._reactor)
                except Exception as e:
                    self.log.error(
                        "rolling restart stopped: {name} did not start ({error})",
                        name=new.name,
                        error=e,
                    )
                    if old is not None and not old.ended.called:
                        pending = self._restarts.pop(slot, None)
                        if pending is not None and pending.active():
                            pending.cancel()
                        self.workers[slot] = old
                        await self._retire(new)
                    return
                if old is not None:
                    await self._retire(old)
            self.log.info("rolling restart done")
        finally:
            self._rolling = False


def describe_exit(reason: Failure) -> str:
    """'exited with status 0', 'killed by signal 9', ..."""
    value = reason.value
    signal_number = getattr(value, "signal", None)
    if signal_number is not None:
        return f"killed by signal {signal_number}"
    return f"exited with status {getattr(value, 'exitCode', '?')}"
