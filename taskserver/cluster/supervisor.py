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
from taskserver.cluster.protocol import (
    CONFIG_FD,
    READY,
    RECORDS_FD,
    STDERR_FD,
    STDOUT_FD,
    parse_record,
)
from taskserver.metrics import WORKER_RESTARTS, Tally

#: How long a rolling restart waits for a new child to say it is ready.
READY_TIMEOUT_S = 30.0
#: A stopping child gets its shutdown timeout plus this much before SIGKILL.
KILL_GRACE_S = 5.0
MAX_LINE_BYTES = 64 * 1024


class WorkerDied(Exception):
    """A child exited before it said it was ready."""


class NotReadyInTime(Exception):
    """A child did not say it was ready within the deadline."""


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
    ended: defer.Deferred[None] = field(default_factory=defer.Deferred)
    #: Why it will never be ready (it exited first), once that is known.
    died_before_ready: WorkerDied | None = None
    _ready_waiters: list[defer.Deferred[None]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"worker-{self.slot}"

    def wait_ready(self) -> defer.Deferred[None]:
        """A Deferred of this waiter's own: fires when the child is ready, fails if it died first.

        Each waiter gets its own, so no waiter can handle a failure for another.
        """
        if self.ready:
            return defer.succeed(None)
        if self.died_before_ready is not None:
            return defer.fail(self.died_before_ready)
        waiter: defer.Deferred[None] = defer.Deferred(self._ready_waiters.remove)
        self._ready_waiters.append(waiter)
        return waiter

    def mark_ready(self) -> None:
        self.ready = True
        waiters, self._ready_waiters = self._ready_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def mark_died(self, how: str) -> None:
        if self.ready:
            return
        self.died_before_ready = WorkerDied(f"{self.name} {how} before it was ready")
        waiters, self._ready_waiters = self._ready_waiters, []
        for waiter in waiters:
            waiter.errback(self.died_before_ready)

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
        on_record: Callable[[Worker, str, str], None],
        on_exit: Callable[[Worker], None],
        process_id_for: Callable[[int, int], str],
        stop_timeout_s: float,
        tally: Tally | None = None,
    ) -> None:
        """``tally`` counts the restarts (``worker_restarts``)."""
        self._reactor = reactor
        self._tally = tally if tally is not None else Tally()
        self.count = count
        self._argv = argv
        self._env = env
        self._extra_fds = extra_fds
        self._config_for = config_for
        self._on_record = on_record
        self._on_exit = on_exit
        self._process_id_for = process_id_for
        self._stop_timeout_s = stop_timeout_s
        #: The child serving each slot (during a roll: the new one).
        self.workers: dict[int, Worker] = {}
        #: Every child process that has not exited yet, whatever its state: what a stop waits for.
        self._live: set[Worker] = set()
        self._generations: dict[int, int] = {}
        self._failures: dict[int, int] = {}
        self._restarts: dict[int, IDelayedCall] = {}
        #: How often each slot's child has been replaced after it exited unplanned.
        self.restart_counts: dict[int, int] = {}
        self._rolling = False
        #: The children that a stop had to SIGKILL ("worker-0 (pid 12)"): an unclean stop.
        self.killed: list[str] = []

    # ------------------------------------------------------------ lifecycle

    def startService(self) -> None:
        super().startService()
        for slot in range(self.count):
            self._spawn_or_retry(slot)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop_all())

    async def _stop_all(self) -> None:
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts = {}
        # Every live child: also an old one that a rolling restart is about to replace.
        await defer.DeferredList(
            [defer.Deferred.fromCoroutine(self._retire(worker)) for worker in list(self._live)]
        )

    @property
    def live(self) -> list[Worker]:
        """Every child not exited yet, also one a rolling restart is about to retire."""
        return list(self._live)

    @staticmethod
    def seats_for(count: int) -> int:
        """Scoreboard seats for ``count`` slots: two each (see the class docstring)."""
        return 2 * count

    @property
    def seats(self) -> int:
        return self.seats_for(self.count)

    # ------------------------------------------------------------ spawning

    def _spawn(self, slot: int) -> Worker:
        """Start a child for ``slot``; OSError if the fork fails (then nothing is registered).

        A pending restart of the slot is cancelled: one slot, one new child.
        """
        self._cancel_restart(slot)
        generation = self._generations.get(slot, -1) + 1
        worker = Worker(
            slot=slot,
            generation=generation,
            seat=slot + self.count * (generation % 2),
            process_id=self._process_id_for(slot, generation),
        )
        child_fds: dict[int, Any] = {
            CONFIG_FD: "w",
            STDOUT_FD: "r",
            STDERR_FD: "r",
            RECORDS_FD: "r",
        }
        child_fds.update(self._extra_fds)
        worker.transport = self._reactor.spawnProcess(
            _WorkerProtocol(self, worker, self._config_for(worker)),
            self._argv[0],
            self._argv,
            env=self._env,
            childFDs=child_fds,
        )
        # Counted and registered only now: a fork that failed leaves nothing for a stop
        # to wait for, and uses up no generation (the seat alternates with the generation,
        # so the next child of a roll still gets the seat its old child does not hold).
        self._generations[slot] = generation
        if not worker.ended.called:
            self.workers[slot] = worker
            self._live.add(worker)
        self.log.info("{name} started (pid {pid})", name=worker.name, pid=worker.pid)
        return worker

    def _spawn_or_retry(self, slot: int) -> None:
        """Start a child for ``slot``; a failed fork (EAGAIN, ENOMEM) counts as a failure."""
        try:
            self._spawn(slot)
        except OSError as e:
            self._failures[slot] = self._failures.get(slot, 0) + 1
            self.log.error("worker-{slot} could not be started: {error}", slot=slot, error=e)
            self._restart_later(slot)

    def _cancel_restart(self, slot: int) -> None:
        pending = self._restarts.pop(slot, None)
        if pending is not None and pending.active():
            pending.cancel()

    def _restart_later(self, slot: int) -> None:
        self._cancel_restart(slot)
        failures = self._failures.get(slot, 0)
        delay = backoff_delay(failures)
        if delay:
            self.log.warn(
                "worker-{slot} failed before it was ready ({n} time(s) in a row); "
                "restarting in {delay:g} s",
                slot=slot,
                n=failures,
                delay=delay,
            )
        self._restarts[slot] = self._reactor.callLater(delay, self._restart_now, slot)

    def _restart_now(self, slot: int) -> None:
        self._restarts.pop(slot, None)
        if self.running:
            self._spawn_or_retry(slot)

    # ------------------------------------------------------------ events from children

    def _line(self, worker: Worker, fd: int, line: str) -> None:
        if fd == RECORDS_FD:
            kind, body = parse_record(line)
            if kind == READY:
                self._became_ready(worker)
            else:
                self._on_record(worker, kind, body)
        else:
            self.log.info("[{name} {pid}] {line}", name=worker.name, pid=worker.pid, line=line)

    def _became_ready(self, worker: Worker) -> None:
        self.log.info("{name} (pid {pid}) ready", name=worker.name, pid=worker.pid)
        self._failures[worker.slot] = 0
        worker.mark_ready()

    def _exited(self, worker: Worker, reason: Failure) -> None:
        how = describe_exit(reason)
        planned = worker.retiring
        self._live.discard(worker)
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
                self.restart_counts[worker.slot] = self.restart_counts.get(worker.slot, 0) + 1
                self._tally.count(WORKER_RESTARTS)
                self._restart_later(worker.slot)
        # Last, so that a waiter (a rolling restart) sees the slot as it now is.
        worker.mark_died(how)

    # ------------------------------------------------------------ stopping and rolling

    async def _retire(self, worker: Worker) -> None:
        """SIGTERM, then SIGKILL if it has not exited in time; returns when it has.

        Once per child: a second caller (a stop while a roll retires it) only waits.
        """
        if worker.ended.called:
            return
        if worker.retiring:
            await worker.ended
            return
        worker.retiring = True
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
        if not self.running:  # a stop's kill; one during a roll does not make the stop unclean
            self.killed.append(f"{worker.name} (pid {worker.pid})")
        worker.signal("KILL")

    async def _ready_in_time(self, worker: Worker) -> None:
        """Wait until ``worker`` is ready; WorkerDied, or NotReadyInTime after READY_TIMEOUT_S."""
        try:
            await worker.wait_ready().addTimeout(READY_TIMEOUT_S, self._reactor)
        except defer.TimeoutError:
            raise NotReadyInTime(
                f"{worker.name} was not ready within {READY_TIMEOUT_S:g} s"
            ) from None

    async def _keep_old(self, slot: int, old: Worker | None, new: Worker, why: Exception) -> None:
        """A roll that failed: the old child (if alive) keeps its slot; the new one goes."""
        if old is None or old.ended.called:
            self.log.error("rolling restart stopped: {why}", why=why)
            return  # the slot's ordinary restart policy takes over
        self.log.error(
            "rolling restart stopped: {why}; the old {name} (pid {pid}) keeps serving",
            why=why,
            name=old.name,
            pid=old.pid,
        )
        self._cancel_restart(slot)
        self.workers[slot] = old
        self._failures[slot] = 0  # the old one was ready: its next death restarts at once
        await self._retire(new)

    async def rolling_restart(self) -> None:
        """Replace children one at a time: start the new one, wait until ready, retire the old.

        The listening socket stays open throughout, so no connection is refused.
        A new child that dies or is not ready within READY_TIMEOUT_S stops the
        roll (a broken build): the old child keeps serving, the rest are not touched.
        A stop during the roll ends it after whatever it awaits: the stop
        retires every live child, old and new, and a failure it caused is
        not a broken build.
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
                try:
                    new = self._spawn(slot)
                except OSError as e:
                    self.log.error(
                        "rolling restart stopped: {name} could not be started: {error}",
                        name=f"worker-{slot}",
                        error=e,
                    )
                    if old is None:
                        self._failures[slot] = self._failures.get(slot, 0) + 1
                        self._restart_later(slot)
                    return
                try:
                    await self._ready_in_time(new)
                except (WorkerDied, NotReadyInTime) as e:
                    if not self.running:
                        return
                    await self._keep_old(slot, old, new, e)
                    return
                if not self.running:
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
