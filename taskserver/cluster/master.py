# -*- test-case-name: tests.test_cluster -*-
"""The master: owns the listening socket, the embedded Redis, the task log and the children.

It serves no HTTP itself. Start-up: the embedded Redis (if no Redis is
configured) becomes ready, then the children are spawned, each handed the
listening socket and the balancing scoreboard. When a child dies, the
master gives its in-flight tasks back to the queue at once. Stop (SIGTERM,
SIGINT): children drain and exit, then Redis stops, then the master exits
0 — or, if it had to SIGKILL a child or the embedded Redis, dies of the
signal that asked it to stop (status 1 without one). SIGHUP: a rolling
restart of the children.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import sys
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any, cast

from twisted.application.service import Service
from twisted.internet import defer, error, task
from twisted.logger import (
    ILogObserver,
    LogEvent,
    Logger,
    globalLogPublisher,
    textFileLogObserver,
)
from twisted.python.logfile import LogFile

from taskserver.cluster.balance import Scoreboard
from taskserver.cluster.embedded import EmbeddedRedis, write_embedded_address
from taskserver.cluster.listener import describe
from taskserver.cluster.protocol import (
    LISTENER_FD,
    RESUME,
    SCOREBOARD_FD,
    TASK,
    pause_record,
    worker_process_id,
)
from taskserver.cluster.supervisor import Supervisor, Worker
from taskserver.coalesce import TurnBuffer
from taskserver.config import RedisAddress, Settings, settings_to_json
from taskserver.durability import check_at_start, embedded_appendfsync
from taskserver.ids import consumer_ids_of
from taskserver.keys import Keys
from taskserver.metrics import TASKS_DEAD, TASKS_RECLAIMED, MetricsFlusher, Tally
from taskserver.queue import TaskQueue
from taskserver.redisclient import RedisUnavailable, connect, without_reconnect_attempts
from taskserver.tasklog import TaskLogFile, TaskLogWriter

SERVER_LOG_NAME = "twistd.log"
SERVER_LOG_MAX_BYTES = 10_000_000
SERVER_LOG_ROTATED_FILES = 5
#: How long the master keeps trying to give a dead child's tasks back (then the reaper will).
RECLAIM_RETRY_FOR_S = 30.0


def unless_the_disk_refuses(observer: ILogObserver) -> ILogObserver:
    """``observer``, dropping the events its file cannot take (twistd.log on a full disk).

    twistd.log shares LOG_DIR with tasks.log. Without this, every event
    logged while the disk is full would come back as a traceback from the
    log publisher; twistd's own log (stdout with ``-n``) still has them.
    """

    def observe(event: LogEvent) -> None:
        with contextlib.suppress(OSError):
            observer(event)

    return cast(ILogObserver, observe)


class Master(Service):
    """The cluster: embedded Redis, children, and the single writer of tasks.log."""

    log = Logger()

    def __init__(
        self,
        settings: Settings,
        listener: socket.socket,
        reactor: Any,
        redis_binary: str | None = None,
        data_lock: IO[bytes] | None = None,
        tally: Tally | None = None,
    ) -> None:
        """``tally`` counts the master's own events: restarts, reclaims."""
        self._settings = settings
        self._listener = listener
        self._reactor = reactor
        self._embedded = (
            EmbeddedRedis(
                redis_binary,
                settings.data_dir,
                reactor,
                # Ours only: children and taskserver-admin get it, a squatter on the port does not.
                password=secrets.token_urlsafe(24),
                on_down=self._redis_down,
                on_back=self._redis_back,
                appendfsync=embedded_appendfsync(settings),
            )
            if redis_binary
            else None
        )
        self._data_lock = data_lock
        self._address_file: Path | None = None
        self._token = secrets.token_hex(3)
        #: Keys the dashboard's CSRF token without ADMIN_TOKEN: every child agrees on it.
        self._dashboard_secret = secrets.token_hex(32)
        self._log_observer: ILogObserver | None = None
        self._log_file: LogFile | None = None
        self._task_log: TaskLogWriter | None = None
        #: Why the children were told to stop fetching (the task log is full), if they were.
        self._fetch_paused: str | None = None
        #: The task-log lines that arrive in one turn, written together.
        self._task_lines: TurnBuffer[str] = TurnBuffer(self._write_task_lines, reactor)
        #: The master's own pool, open only while it gives a dead child's tasks back.
        self._pool: Any = None
        self._queue: TaskQueue | None = None
        self._reclaiming = 0
        self._redis_up = True
        self._scoreboard: Scoreboard | None = None
        self.redis: RedisAddress | None = None
        self.supervisor: Supervisor | None = None
        #: The signal (SIGTERM, SIGINT) that asked us to stop, if one did.
        self._stop_signal: int | None = None
        #: The master's own counts (restarts, reclaims), flushed on its pool.
        self.tally = tally if tally is not None else Tally()
        self._metrics = MetricsFlusher(
            self.tally,
            self._metrics_connection,
            Keys(settings.key_prefix),
            reactor,
            settings.redis_timeout_s,
            flushed=self._metrics_flushed,
        )

    # ------------------------------------------------------------ start

    def startService(self) -> None:
        super().startService()
        # Now, not once Redis is ready: SIGHUP's default action would kill the master.
        signal.signal(signal.SIGHUP, self._on_sighup)
        # After the reactor's own handlers are installed ("during startup").
        self._reactor.callWhenRunning(self._take_stop_signals)
        self._start_server_log()
        self._task_log = TaskLogWriter(
            TaskLogFile(self._settings.log_dir, self._settings.task_log_max_bytes),
            self._reactor,
            on_change=self._task_log_changed,
            tally=self.tally,
        )
        defer.Deferred.fromCoroutine(self._start()).addErrback(self._start_failed)

    def _start_server_log(self) -> None:
        """twistd's own log also goes to LOG_DIR/twistd.log."""
        self._settings.log_dir.mkdir(parents=True, exist_ok=True)
        self._log_file = LogFile(
            SERVER_LOG_NAME,
            str(self._settings.log_dir),
            rotateLength=SERVER_LOG_MAX_BYTES,
            maxRotatedFiles=SERVER_LOG_ROTATED_FILES,
        )
        self._log_observer = without_reconnect_attempts(
            unless_the_disk_refuses(textFileLogObserver(cast(IO[str], self._log_file)))
        )
        globalLogPublisher.addObserver(self._log_observer)

    async def _start(self) -> None:
        settings = self._settings
        self.redis = await self._redis_address()
        await check_at_start(settings, self.redis, self._reactor)  # DURABILITY it can keep
        if not self.running:
            return  # stopped while the embedded Redis started: start nothing more
        self._scoreboard = Scoreboard.create(Supervisor.seats_for(settings.workers))
        self.supervisor = Supervisor(
            self._reactor,
            settings.workers,
            argv=[sys.executable, "-m", "taskserver.cluster.child"],
            env=self._child_environment(),
            extra_fds={LISTENER_FD: self._listener.fileno(), SCOREBOARD_FD: self._scoreboard.fd},
            config_for=self._config_for,
            on_record=self._record,
            on_exit=self._child_exited,
            process_id_for=self._process_id_for,
            stop_timeout_s=settings.shutdown_timeout_s,
            tally=self.tally,
        )
        self.supervisor.startService()
        self._metrics.startService()
        self.log.info(
            "taskserver listening on {url} (master pid {pid}, {n} workers, "
            "up to {c} tasks at a time each)",
            url=describe(self._listener),
            pid=os.getpid(),
            n=settings.workers,
            c=settings.concurrency,
        )

    async def _redis_address(self) -> RedisAddress:
        if self._embedded is None:
            assert self._settings.redis is not None
            self.log.info("Redis: {url}", url=self._settings.redis.display())
            return self._settings.redis
        address = await self._embedded.start()
        self._address_file = write_embedded_address(self._settings.data_dir, address)
        self.log.info(
            "Redis: embedded {binary} (pid {pid}) at {host}:{port}, data in {data_dir}",
            binary=self._embedded.binary,
            pid=self._embedded.pid,
            host=address.host,
            port=address.port,
            data_dir=self._settings.data_dir.resolve(),
        )
        return address

    def _queue_for_reclaims(self) -> TaskQueue:
        """The master's own queue client, connected on demand.

        No standing pool: while Redis is down it would try to reconnect
        (and log it) twice a second for nothing; the master needs Redis only
        when a child has died.
        """
        if self._queue is not None:
            return self._queue
        assert self.redis is not None
        settings = self._settings
        self._pool = connect(self.redis, 1, settings.redis_timeout_s)
        self._queue = TaskQueue(
            self._pool,
            Keys(settings.key_prefix),
            settings.status_ttl_s,
            settings.redis_timeout_s,
            self._reactor,
            settings.max_attempts,
            settings.dead_letter_max,
        )
        return self._queue

    def _metrics_connection(self) -> Any:
        """The pool for counts to flush: opened for them if Redis is believed up."""
        if self._pool is None and self.running and self._redis_up and self.redis is not None:
            self._queue_for_reclaims()
        return self._pool

    def _metrics_flushed(self) -> None:
        """The counts are in Redis: no pool kept open for nothing (a reclaim or the
        task log's outage still needs it)."""
        if not self._reclaiming and not self._holding_pool():
            self._close_pool()

    def _close_pool(self) -> defer.Deferred[None]:
        pool, self._pool, self._queue = self._pool, None, None
        if pool is None:
            return defer.succeed(None)
        disconnected: defer.Deferred[None] = pool.disconnect()
        return disconnected.addErrback(
            lambda failure: self.log.failure("closing the Redis pool", failure)
        )

    def _redis_down(self) -> None:
        """The embedded Redis died: no connecting until it is back, instead of retrying blindly."""
        self._redis_up = False
        self._close_pool()

    def _redis_back(self) -> None:
        if self.running:
            self._redis_up = True
            if self._holding_pool():
                self._queue_for_reclaims()

    def _start_failed(self, failure: Any) -> None:
        if not self.running:
            return  # asked to stop while starting: that stop is under way
        self.log.critical("taskserver could not start: {error}", error=failure.value)
        self._reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
        with contextlib.suppress(error.ReactorNotRunning):
            self._reactor.stop()

    # ------------------------------------------------------------ children

    @staticmethod
    def _child_environment() -> dict[str, str]:
        """Our environment (with .env loaded), and our import path: children import what we do."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        return env

    def _process_id_for(self, slot: int, generation: int) -> str:
        return worker_process_id(self._token, slot, generation)

    def _config_for(self, worker: Worker) -> bytes:
        assert self.redis is not None and self.supervisor is not None
        config = {
            "settings": settings_to_json(self._settings),
            "redis": asdict(self.redis),
            "process_id": worker.process_id,
            "seat": worker.seat,
            "seats": self.supervisor.seats,
            "address_family": int(self._listener.family),
            "master_pid": os.getpid(),
            "restarts": self.supervisor.restart_counts.get(worker.slot, 0),
            "dashboard_secret": self._dashboard_secret,
            "fetch_paused": self._fetch_paused,
        }
        return json.dumps(config).encode("utf-8") + b"\n"

    def _record(self, worker: Worker, kind: str, body: str) -> None:
        if kind == TASK:
            self._task_lines.add(body)
        else:
            self.log.warn(
                "{name} sent an unknown record: {kind!r} {body!r}",
                name=worker.name,
                kind=kind[:50],
                body=body[:200],
            )

    def _write_task_lines(self, lines: list[str]) -> None:
        if self._task_log is not None:
            self._task_log.write_lines(lines)

    def _task_log_changed(self) -> None:
        """The task log became unwritable, pressing, or writable again: tell whom it concerns.

        The children stop fetching while it presses, and start again once
        its lines are out. While it is unwritable the master's pool stays
        open, so its write-error count reaches the metrics every second.
        """
        writer = self._task_log
        if writer is None:
            return
        paused = (
            f"the task log cannot be written ({writer.unwritable}); tasks wait in the queue "
            "until its lines are out"
            if writer.pressing
            else None
        )
        if (paused is None) != (self._fetch_paused is None):
            self._fetch_paused = paused
            self._tell_children(RESUME if paused is None else pause_record(paused))
        if writer.unwritable is not None:
            if self._redis_up and self.redis is not None and self.running:
                self._queue_for_reclaims()
        elif self._pool is not None:
            defer.Deferred.fromCoroutine(self._release_pool())

    async def _release_pool(self) -> None:
        """The last counts of a task-log outage; then the pool closes, unless a reclaim needs it."""
        await self._metrics.flush()
        if not self._reclaiming and not self._holding_pool():
            self._close_pool()

    def _holding_pool(self) -> bool:
        """Does the task log's outage keep the pool open (for its metrics)?"""
        return self._task_log is not None and self._task_log.unwritable is not None

    def _tell_children(self, record: str) -> None:
        """Send a record to every live child on its fd 0 (one it has already exited from: lost)."""
        if self.supervisor is None:
            return
        data = f"{record}\n".encode()
        for worker in self.supervisor.live:
            with contextlib.suppress(AttributeError, KeyError, OSError):
                worker.transport.write(data)

    def _child_exited(self, worker: Worker) -> None:
        if self._scoreboard is not None:
            self._scoreboard.clear(worker.seat)
        if not worker.retiring:
            defer.Deferred.fromCoroutine(self._reclaim(worker))

    async def _reclaim(self, worker: Worker) -> None:
        """Give a dead child's in-flight tasks back to the queue now, not after its heartbeat.

        The consumers stay registered: a blocking pop the dead child sent may
        still land in its list, and the reaper looks again once the heartbeat
        has expired.
        """
        self._reclaiming += 1
        try:
            await self._give_back(worker)
            if self._pool is not None:
                await self._metrics.flush()  # else its loop opens a pool once Redis is up
        finally:
            self._reclaiming -= 1
            if not self._reclaiming and not self._holding_pool():
                self._close_pool()

    async def _give_back(self, worker: Worker) -> None:
        consumer_ids = consumer_ids_of(worker.process_id)
        deadline = self._reactor.seconds() + RECLAIM_RETRY_FOR_S
        while True:
            try:
                if not self._redis_up:
                    raise RedisUnavailable("the embedded Redis is restarting")
                got = await self._queue_for_reclaims().reclaim(
                    worker.process_id, consumer_ids, forget=False, force=True
                )
            except Exception as e:
                if self._reactor.seconds() > deadline or not self.running:
                    self.log.warn(
                        "could not give back {name}'s tasks ({error}); the reaper will",
                        name=worker.name,
                        error=e,
                    )
                    return
                await task.deferLater(self._reactor, 0.5)
                if not self.running:  # stopping: no new pool to a Redis about to stop
                    self.log.warn(
                        "could not give back {name}'s tasks before the stop; the reaper will",
                        name=worker.name,
                    )
                    return
                continue
            self.tally.count(TASKS_RECLAIMED, got.requeued)
            self.tally.count(TASKS_DEAD, got.dead)
            if got.requeued:
                self.log.info(
                    "gave {n} in-flight task(s) of {name} back to the queue",
                    n=got.requeued,
                    name=worker.name,
                )
            if got.dead:
                self.log.warn(
                    "{n} task(s) {name} was running used up their attempts by crashing it: "
                    "dead-lettered",
                    n=got.dead,
                    name=worker.name,
                )
            return

    def _on_sighup(self, signum: int, frame: Any) -> None:
        self._reactor.callFromThread(self._rolling_restart)

    def _rolling_restart(self) -> None:
        if not self.running:
            return
        if self.supervisor is None:
            self.log.info("SIGHUP before the workers started: nothing to restart")
            return
        self.log.info("SIGHUP: rolling restart of the workers")
        defer.Deferred.fromCoroutine(self.supervisor.rolling_restart())

    # ------------------------------------------------------------ stop

    def _take_stop_signals(self) -> None:
        """SIGTERM and SIGINT stop the reactor through us, not through Twisted's handlers.

        Twisted's handlers record the signal and twistd re-raises it once the
        reactor has stopped, so even a clean stop would exit with status -15.
        Ours stop the reactor the same way without recording it: a stop that
        completes cleanly exits 0, and one that fails re-raises the signal.
        """
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, self._on_stop_signal)

    def _on_stop_signal(self, number: int, frame: Any) -> None:
        self._stop_signal = number
        self._reactor.callFromThread(self._stop_reactor, number)

    def _stop_reactor(self, number: int) -> None:
        self.log.info("{name}: stopping", name=signal.Signals(number).name)
        with contextlib.suppress(error.ReactorNotRunning):
            self._reactor.stop()

    def _exit_uncleanly(self) -> None:
        """After an unclean stop: die of the signal that asked for it, as twistd would; else 1."""
        if self._stop_signal is None:
            os._exit(1)
        signal.signal(self._stop_signal, signal.SIG_DFL)
        os.kill(os.getpid(), self._stop_signal)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        try:
            clean = await self._stop_everything()
        except BaseException:
            self._reactor.addSystemEventTrigger("after", "shutdown", self._exit_uncleanly)
            raise
        if not clean:
            self._reactor.addSystemEventTrigger("after", "shutdown", self._exit_uncleanly)

    async def _flush_metrics(self) -> None:
        """The last flush of the master's counts: on its pool, opened for it if need be."""
        if not self._metrics.running:
            return
        if self._metrics.has_unsent() and self._redis_up and self.redis is not None:
            self._queue_for_reclaims()
        await self._metrics.stopService()

    async def _task_log_written(self) -> None:
        """The children are gone: give lines a full disk holds back up to SHUTDOWN_TIMEOUT."""
        writer = self._task_log
        if writer is None:
            return
        self._task_lines.flush()
        if not writer.backlog:
            return
        self.log.warn(
            "waiting up to {s:g} s for {n} task-log line(s) the disk has not taken yet",
            s=self._settings.shutdown_timeout_s,
            n=writer.backlog,
        )
        with contextlib.suppress(defer.TimeoutError):
            await writer.drained().addTimeout(self._settings.shutdown_timeout_s, self._reactor)

    def _what_was_killed(self) -> list[str]:
        """What a stop had to SIGKILL: work maybe not given back, an AOF maybe not synced."""
        killed = list(self.supervisor.killed) if self.supervisor is not None else []
        if self._embedded is not None and self._embedded.killed:
            killed.append("the embedded Redis (its last writes may be lost)")
        return killed

    async def _stop_everything(self) -> bool:
        """Stop in order; False if something had to be killed (logged in one line)."""
        try:
            if self.supervisor is not None:
                await self.supervisor.stopService()
            await self._task_log_written()
            await self._flush_metrics()
            await self._close_pool()
        finally:
            # Redis stops last, after every child has given its tasks back.
            if self._embedded is not None:
                await self._embedded.stopService()
            if self._address_file is not None:
                self._address_file.unlink(missing_ok=True)
        self._listener.close()
        if self._scoreboard is not None:
            self._scoreboard.close()
        self._task_lines.flush()
        if self._task_log is not None:
            self._task_log.close()
            self._task_log = None
        killed = self._what_was_killed()
        if killed:
            self.log.error(
                "taskserver stopped uncleanly: {killed} had to be killed", killed=", ".join(killed)
            )
        else:
            self.log.info("taskserver stopped")
        if self._log_observer is not None:
            globalLogPublisher.removeObserver(self._log_observer)
        if self._log_file is not None:
            self._log_file.close()
        if self._data_lock is not None:
            self._data_lock.close()
        return not killed
