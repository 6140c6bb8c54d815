# -*- test-case-name: tests.test_consumer -*-
"""The consumer of one process: fetch tasks, run the handler, log them, acknowledge them.

A dispatcher keeps up to ``concurrency`` tasks running, all in the
process's one processing list (consumer id ``<process id>#0``), where they
stay until their acknowledgement lands (at most ``concurrency`` more of
those). Tasks of dead processes (suspects) run one at a time. The service
also keeps the process's heartbeat alive, moves due retries into the queue
and reaps the lists of dead processes. The dispatcher survives every Redis
error: it backs off and carries on, because one that died on the first
ConnectionError would stop processing for good while the web side looked
healthy.
"""

from __future__ import annotations

import inspect
import json
import random
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, cast

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from taskserver.backoff import backoff_delay
from taskserver.ids import consumer_ids_of, new_process_id
from taskserver.logthrottle import WarningThrottle
from taskserver.metrics import (
    TASK_DURATION,
    TASK_WAIT,
    TASKS_COMPLETED,
    TASKS_DEAD,
    TASKS_FAILED,
    TASKS_RECLAIMED,
    TASKS_RETRIED,
    Tally,
)
from taskserver.queue import GONE, TaskQueue
from taskserver.redisclient import RedisUnavailable
from taskserver.task import MalformedTask, Task, iso_utc
from taskserver.tasklog import TaskLog

#: Seconds a blocking pop waits before looping (and checking for stop).
POP_WAIT_S = 1
#: Back-off after a Redis error: doubles from the first value up to the second.
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 0.5
#: Longest error text kept in a status record.
ERROR_MAX_CHARS = 1000
#: How often every process moves due retries into the queue.
PROMOTE_EVERY_S = 0.25
#: Longest wait between two attempts of a task.
RETRY_BACKOFF_MAX_S = 300.0
#: RESULT_MAX_BYTES's default: the largest result (its JSON, in bytes) a record keeps.
RESULT_MAX_BYTES = 65536


class TaskTimeout(Exception):
    """The handler ran longer than TASK_TIMEOUT and was cancelled."""


def retry_delay_s(attempts: int, base_s: float, rng: Callable[[], float] = random.random) -> float:
    """Exponential back-off with jitter: base * 2**(attempts-1), capped, times 0.5 to 1.0.

    The jitter spreads retries of tasks that failed together (say, while a
    downstream service was down) so they do not all come back at once.
    """
    ceiling = backoff_delay(max(1, attempts), base_s, RETRY_BACKOFF_MAX_S)
    return ceiling * (0.5 + 0.5 * rng())


Handler = Callable[[dict[str, Any]], Any]


class UnknownTaskType(Exception):
    """A queued task's type has no handler (TASK_HANDLERS changed since it was submitted)."""


def stored_result(value: Any, max_bytes: int) -> tuple[bytes, str] | None:
    """What the status record keeps of a handler's return value (see TaskQueue.complete).

    None for None (no result). Otherwise ``(json, "")``: the value as compact
    JSON, encoded once, here; or ``(b"", why)`` when it is not JSON (a set,
    bytes, NaN, a string with a lone surrogate) or its JSON is over ``max_bytes``.
    """
    if value is None:
        return None
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        encoded = text.encode("utf-8")
    except Exception as e:  # whatever it is, the task succeeded: never fail it for this
        return b"", f"result not stored: not JSON ({_why_not_json(e)})"
    if len(encoded) > max_bytes:
        size = len(encoded)
        return b"", f"result not stored: {size} bytes, over RESULT_MAX_BYTES {max_bytes}"
    return encoded, ""


def _why_not_json(error: Exception) -> str:
    """A few words for the note: the type that is not JSON (``set``), or what went wrong."""
    if isinstance(error, UnicodeEncodeError):
        return "a string holds a lone surrogate"
    if isinstance(error, RecursionError):
        return "nested too deeply"
    message = error_text(error).partition(": ")[2]
    if message.startswith("Object of type "):  # "Object of type set is not JSON serializable"
        return message.removeprefix("Object of type ").partition(" ")[0]
    if message.startswith("Out of range float"):
        return "NaN or Infinity"
    return message[:100]


def error_text(error: BaseException) -> str:
    """``Type: message`` for the status record, at most ERROR_MAX_CHARS.

    Even an exception whose ``str()`` raises gives a text: a task must never
    be stranded because its error could not be described.
    """
    try:
        message = str(error)
    except Exception:
        message = "(its message could not be read)"
    return f"{type(error).__name__}: {message}"[:ERROR_MAX_CHARS]


def queued_seconds(queued_at: str) -> float | None:
    """A task's ``queued_at`` (ISO-8601 UTC) in seconds since the epoch; None if unreadable."""
    try:
        return datetime.fromisoformat(queued_at).timestamp()
    except ValueError:
        return None


def backoff_s(failures: int) -> float:
    """The pause after ``failures`` Redis errors in a row (the master's formula, shorter bounds)."""
    return backoff_delay(max(1, failures), BACKOFF_FIRST_S, BACKOFF_MAX_S)


class ConsumerService(Service):
    """Up to ``concurrency`` tasks in flight, the heartbeat and the reaper of one process."""

    log = Logger()

    def __init__(
        self,
        *,
        queue: TaskQueue,
        blocking_redis: Any,
        handler: Handler,
        task_log: TaskLog,
        typed_handlers: Mapping[str, Handler] | None = None,
        result_max_bytes: int = RESULT_MAX_BYTES,
        concurrency: int,
        heartbeat_ttl_s: float,
        shutdown_timeout_s: float,
        clock: IReactorTime,
        process_id: str | None = None,
        task_timeout_s: float = 30.0,
        retry_backoff_s: float = 1.0,
        tally: Tally | None = None,
    ) -> None:
        """``tally`` counts outcomes, run and wait times, and what the reaper gives back.

        ``handler`` runs the tasks without a type; ``typed_handlers`` (TASK_HANDLERS)
        the others, by type. A task whose type has none fails (UnknownTaskType), and
        goes the way of failures: retried, then dead, visibly. ``result_max_bytes``:
        see :func:`stored_result`.
        """
        self._tally = tally if tally is not None else Tally()
        self._queue = queue
        self._blocking = blocking_redis
        self._handler = handler
        self._typed_handlers = dict(typed_handlers or {})
        self._result_max_bytes = result_max_bytes
        self._task_log = task_log
        self._heartbeat_ttl_s = heartbeat_ttl_s
        self._shutdown_timeout_s = shutdown_timeout_s
        self._task_timeout_s = task_timeout_s
        self._retry_backoff_s = retry_backoff_s
        self._clock = clock
        self.process_id = process_id or new_process_id()
        self.consumer_ids = consumer_ids_of(self.process_id)
        self._concurrency = concurrency
        self._stopping = False
        #: Fetch nothing (the task log is full); running tasks finish, timers carry on.
        self._paused = False
        #: Tasks this process fetched but did not run: cancelled while they waited.
        self.cancelled_dropped = 0
        #: Consumers whose processing list must be compared with what we hold before their
        #: next fetch: an outage may have lost a reply (see _give_back_lost_fetch).
        self._recheck: set[str] = set()
        self._dispatcher: defer.Deferred[None] | None = None
        self._running: dict[defer.Deferred[None], str] = {}
        #: Finished tasks whose acknowledgement is on its way (their entries are still held).
        self._acking: dict[defer.Deferred[None], str] = {}
        self._slot_freed: defer.Deferred[None] | None = None
        self._wake: IDelayedCall | None = None
        self._timers: list[tuple[task.LoopingCall, defer.Deferred[Any]]] = []
        self._timer_warnings = WarningThrottle(self.log, clock)  # an outage fails every timer

    @property
    def in_flight(self) -> int:
        """Tasks running now."""
        return len(self._running)

    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self) -> None:
        """Start no task until :meth:`resume`; the tasks wait in the queue.

        What is under way still lands: a batch fetch (its tasks are marked
        started with it) or a blocking pop (at most one task, within POP_WAIT_S);
        a fetch under way that finds nothing does not block in a pop.
        """
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self._wake_dispatcher()

    # ------------------------------------------------------------ lifecycle

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        for function, interval in (
            (self._beat, self._heartbeat_ttl_s / 3),
            (self._reap, self._heartbeat_ttl_s / 2),
            (self._promote, PROMOTE_EVERY_S),
        ):
            timer = task.LoopingCall(function)
            timer.clock = self._clock
            self._timers.append((timer, timer.start(interval, now=True)))
        self._dispatcher = defer.Deferred.fromCoroutine(self._run(self.consumer_ids[0]))

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        """Stop fetching, let running tasks finish (bounded), give back the rest."""
        self._stopping = True
        self._wake_dispatcher()
        deadline = self._clock.callLater(self._shutdown_timeout_s + POP_WAIT_S, self._cancel_loops)
        # The dispatcher first: its last fetch may still start tasks.
        results = await defer.DeferredList([d for d in [self._dispatcher] if d], consumeErrors=True)
        results += await defer.DeferredList(list(self._running), consumeErrors=True)
        results += await defer.DeferredList(list(self._acking), consumeErrors=True)
        if deadline.active():
            deadline.cancel()
        forced = any(not ok for ok, _ in results)
        for timer, stopped in self._timers:
            if timer.running:
                timer.stop()
            await stopped
        self._timers = []
        if self._wake is not None and self._wake.active():
            self._wake.cancel()
        try:
            await self._queue.forget_heartbeat(self.process_id)
            got = await self._queue.reclaim(
                self.process_id, self.consumer_ids, forget=not forced, force=True, died=False
            )
        except Exception as e:
            self.log.warn(
                "could not give back in-flight tasks ({error}); another process will after "
                "the heartbeat expires",
                error=e,
            )
            return
        if got.requeued:
            self.log.info("gave {n} unfinished task(s) back to the queue", n=got.requeued)

    def _cancel_loops(self) -> None:
        for running in [self._dispatcher, *self._running, *self._acking]:
            if running is not None:
                running.cancel()

    # ------------------------------------------------------------ timers

    async def _beat(self) -> None:
        try:
            await self._queue.heartbeat(self.process_id, self.consumer_ids, self._heartbeat_ttl_s)
        except Exception as e:
            self._timer_warnings.warn(f"heartbeat failed: {e}")

    async def _promote(self) -> None:
        try:
            await self._queue.promote()
        except Exception as e:
            self.log.debug("promoting retries failed: {error}", error=e)

    async def _reap(self) -> None:
        try:
            got = await self._queue.reap(self.process_id)
        except Exception as e:
            self._timer_warnings.warn(f"reaper failed: {e}")
            return
        self._tally.count(TASKS_RECLAIMED, got.requeued)
        self._tally.count(TASKS_DEAD, got.dead)
        if got.requeued or got.dead:
            self.log.info(
                "dead consumers' tasks: {requeued} back to the queue, {dead} dead-lettered",
                requeued=got.requeued,
                dead=got.dead,
            )

    # ------------------------------------------------------------ the loop

    async def _run(self, consumer_id: str) -> None:
        """The dispatcher: keep up to ``concurrency`` tasks in flight.

        While tasks wait, it takes as many as it has room for in one round trip
        (fetched and marked started together); only when the queue is empty
        does it block in BRPOPLPUSH, a second at a time. Suspects (tasks whose
        process died running them) run alone: while one waits, a busy
        dispatcher lets its tasks finish first, and while one runs, it starts
        nothing else. So a task that kills its process is caught alone, and
        the tasks that happened to run beside it are not blamed.
        """
        processing = self._queue.keys.processing(consumer_id)
        failures = 0
        alone = drain = False
        while not self._stopping:
            # Finished tasks awaiting their acknowledgement do not hold a slot, but
            # they are still in the processing list: at most `concurrency` of them.
            room = min(
                self._concurrency - len(self._running),
                2 * self._concurrency - len(self._running) - len(self._acking),
            )
            if room <= 0 or self._paused or (not self._idle and (alone or drain)):
                self._slot_freed = defer.Deferred()
                await self._slot_freed
                continue
            try:
                if failures or consumer_id in self._recheck:
                    self._recheck.discard(consumer_id)  # a failure below sets failures
                    await self._give_back_lost_fetch(consumer_id)
                started_at = iso_utc(self._clock.seconds())
                batch = await self._queue.fetch_batch(
                    consumer_id, room, started_at, idle=self._idle
                )
                alone, drain = batch.alone, batch.wait
                self.cancelled_dropped += batch.cancelled
                fetched: list[tuple[str, int | None]] = list(batch.tasks)
                if not fetched and not drain and not self._paused:
                    raw = await self._queue.fetch(
                        self._blocking, self._queue.keys.pending, processing, POP_WAIT_S
                    )
                    fetched = [(raw, None)] if raw is not None else []
            except defer.CancelledError:
                raise
            except Exception as e:
                failures += 1
                if failures == 1:
                    self.log.warn(
                        "consumer {consumer} cannot fetch: {error}", consumer=consumer_id, error=e
                    )
                await task.deferLater(self._clock, backoff_s(failures))
                continue
            if failures:
                failures = 0
                self.log.info("consumer {consumer} is fetching again", consumer=consumer_id)
            for raw, attempts in fetched:
                self._start(consumer_id, raw, attempts)

    @property
    def _idle(self) -> bool:
        """No task is running or waiting for its acknowledgement."""
        return not self._running and not self._acking

    def _start(self, consumer_id: str, raw: str, attempts: int | None) -> None:
        running = defer.Deferred.fromCoroutine(self._guarded(consumer_id, raw, attempts))
        self._running[running] = raw
        running.addBoth(self._finished, running)

    def _finished(self, result: Any, running: defer.Deferred[None]) -> Any:
        del self._running[running]
        self._wake_dispatcher()
        return result

    def _wake_dispatcher(self) -> None:
        """Let the dispatcher fetch, at the end of this turn: all slots freed in it at once."""
        if self._wake is None or not self._wake.active():
            self._wake = self._clock.callLater(0, self._wake_now)

    def _wake_now(self) -> None:
        waiting, self._slot_freed = self._slot_freed, None
        if waiting is not None and not waiting.called:
            waiting.callback(None)

    async def _guarded(self, consumer_id: str, raw: str, attempts: int | None) -> None:
        try:
            await self._process(consumer_id, raw, attempts)
        except defer.CancelledError:
            raise
        except Exception:
            self.log.failure("consumer {consumer} failed on a task", consumer=consumer_id)
            await self._give_back(consumer_id, raw)

    async def _give_back(self, consumer_id: str, raw: str) -> None:
        """An entry whose outcome could not be recorded (an error other than Redis being
        away, which retrying would not cure) runs again later, not never: our heartbeat
        lives, so no reaper would take it back."""
        try:
            outcome = await self._until_done(
                lambda: self._queue.give_back(consumer_id, raw, self._retry_backoff_s)
            )
        except defer.CancelledError:
            raise
        except Exception:
            self.log.failure(
                "could not give a task back; it stays in {consumer}'s list until this "
                "process stops",
                consumer=consumer_id,
            )
            return
        if outcome == "retrying":
            self.log.warn(
                "gave a task back to run again in {delay:g} s", delay=self._retry_backoff_s
            )
        elif outcome == "dead":
            self._tally.count(TASKS_DEAD)
            self.log.warn("a task whose outcome could never be recorded is dead-lettered")

    async def _give_back_lost_fetch(self, consumer_id: str) -> None:
        """After a failed fetch or a Redis outage, return what is in our list without our
        knowing.

        If the connection drops while a fetch completes, Redis may have moved
        tasks into our processing list and the reply is lost. And after a
        failover without WAIT_REPLICAS, the new primary may lack an
        acknowledgement the old one answered: the task's entry is back in our
        list, its record says processing. We are alive and keep our heartbeat,
        so no reaper would ever take them back: we do (the task runs again, at
        least once), keeping the entries of the tasks we are running.
        """
        held = [*self._running.values(), *self._acking.values()]
        moved = await self._queue.give_back_unknown(consumer_id, held)
        if moved:
            self.log.info(
                "consumer {consumer}: {n} task(s) of a fetch whose answer was lost are back "
                "in the queue",
                consumer=consumer_id,
                n=moved,
            )

    async def _process(self, consumer_id: str, raw: str, attempts: int | None) -> None:
        """Run one task; ``attempts`` is None when it still has to be marked started."""
        try:
            task_ = Task.from_json(raw)
        except MalformedTask as e:
            self.log.error(
                "dropping a queue entry that is not a task ({error}): {raw!r}",
                error=e,
                raw=raw[:200],
            )
            await self._until_done(lambda: self._queue.drop(consumer_id, raw))
            return
        started = self._clock.seconds()
        if attempts is None:
            # Asked until it answers: only the answer says whether a cancel came first.
            attempts = await self._until_done(
                lambda: self._queue.mark_started(task_, iso_utc(started))
            )
            if attempts == 0:  # cancelled while it waited: acknowledged, not run
                await self._until_done(lambda: self._queue.drop(consumer_id, raw))
                self.cancelled_dropped += 1
                return
        # The run is timed from here: start steps retried through an outage are no run time
        # (``started`` stays the stamp they all carry, so a retry is known as a replay).
        running_since = self._clock.seconds()
        if attempts == 1:
            queued = queued_seconds(task_.due_at)  # a delay is not a wait
            if queued is not None:
                self._tally.observe(TASK_WAIT, started - queued)
        argument = task_.handler_argument(attempts)
        error = ""
        returned: Any = None
        try:
            returned = await self._call_handler(self._handler_of(task_), argument)
        except UnknownTaskType as e:
            error = error_text(e)
            self.log.warn("task {task_id}: {error}", task_id=task_.id, error=e)
        except TaskTimeout as e:
            error = f"TaskTimeout: {e}"
            self.log.warn("task {task_id} timed out (attempt {n})", task_id=task_.id, n=attempts)
        except defer.CancelledError:
            raise
        except Exception as e:
            error = error_text(e)
            self.log.failure("task {task_id} failed (attempt {n})", task_id=task_.id, n=attempts)
        finished = self._clock.seconds()
        self._tally.observe(TASK_DURATION, finished - running_since)
        duration_ms = (finished - running_since) * 1000
        result = None if error else stored_result(returned, self._result_max_bytes)
        # The line first, then the outcome that removes the entry: a crash between
        # them runs the task again (its line may appear twice), never loses its line.
        self._task_log.record(
            finished=finished,
            user_id=task_.user_id,
            task_id=task_.id,
            status=self._queue.failure_outcome(attempts) if error else "completed",
            duration_ms=duration_ms,
            task_type=task_.type,
        )
        if error:
            delay = retry_delay_s(attempts, self._retry_backoff_s)
            outcome = await self._until_done(
                lambda: self._queue.fail(
                    consumer_id, raw, task_, attempts, error, delay, iso_utc(finished), duration_ms
                )
            )
            self._count_failure(outcome)
            if outcome == GONE:
                self._log_gone(task_)
        else:
            self._acknowledge(consumer_id, raw, task_, iso_utc(finished), duration_ms, result)

    def _count_failure(self, outcome: str) -> None:
        """A failed attempt; what it became, once recorded (GONE: another run records it)."""
        self._tally.count(TASKS_FAILED)
        if outcome == "retrying":
            self._tally.count(TASKS_RETRIED)
        elif outcome == "dead":
            self._tally.count(TASKS_DEAD)

    def _acknowledge(
        self,
        consumer_id: str,
        raw: str,
        task_: Task,
        finished_at: str,
        duration_ms: float,
        result: tuple[bytes, str] | None,
    ) -> None:
        """Record the success and remove the entry, without holding the task's slot.

        The slot is free as soon as the handler is done, so the dispatcher's
        next fetch leaves in the same turn as this acknowledgement: one round
        trip per batch of tasks instead of two.
        """
        acking = defer.Deferred.fromCoroutine(
            self._record_success(consumer_id, raw, task_, finished_at, duration_ms, result)
        )
        self._acking[acking] = raw
        acking.addBoth(self._acked, acking)

    async def _record_success(
        self,
        consumer_id: str,
        raw: str,
        task_: Task,
        finished_at: str,
        duration_ms: float,
        result: tuple[bytes, str] | None,
    ) -> None:
        try:
            removed = await self._until_done(
                lambda: self._queue.complete(
                    consumer_id, raw, task_, finished_at, duration_ms, result
                )
            )
        except defer.CancelledError:
            raise
        except Exception:
            self.log.failure("could not acknowledge finished task {task_id}", task_id=task_.id)
            await self._give_back(consumer_id, raw)
            return
        if removed:
            self._tally.count(TASKS_COMPLETED)
        else:
            self._log_gone(task_)

    def _acked(self, result: Any, acking: defer.Deferred[None]) -> None:
        del self._acking[acking]
        if isinstance(result, Failure) and not result.check(defer.CancelledError):
            self.log.failure("could not acknowledge a finished task", result)
        self._wake_dispatcher()  # one waiting for room, or to be idle

    def _log_gone(self, task_: Task) -> None:
        """The outcome found no entry to remove, so it recorded nothing (and that is right)."""
        self.log.info(
            "task {task_id}: its entry had already left the processing list (a reaper gave "
            "it back to run again, or its record expired); nothing recorded",
            task_id=task_.id,
        )

    def _handler_of(self, task_: Task) -> Handler:
        """TASK_HANDLER for an untyped task, else its type's; UnknownTaskType if none."""
        if task_.type is None:
            return self._handler
        handler = self._typed_handlers.get(task_.type)
        if handler is None:
            known = ", ".join(sorted(self._typed_handlers)) or "none"
            raise UnknownTaskType(
                f"no handler for task type {task_.type[:64]!r} (TASK_HANDLERS has: {known})"
            )
        return handler

    async def _call_handler(self, handler: Handler, argument: dict[str, Any]) -> Any:
        """Run the handler; cancel it (TaskTimeout) if it outlives TASK_TIMEOUT."""
        result = handler(argument)
        if not (isinstance(result, defer.Deferred) or inspect.isawaitable(result)):
            return result
        running: defer.Deferred[Any] = defer.ensureDeferred(cast(Any, result))
        running.addTimeout(self._task_timeout_s, self._clock)
        try:
            return await running
        except defer.TimeoutError:
            raise TaskTimeout(f"ran longer than {self._task_timeout_s:g} s") from None

    async def _until_done(self, operation: Callable[[], Any]) -> Any:
        """Retry a Redis write through an outage; stop() cancels it after its deadline."""
        failures = 0
        while True:
            try:
                return await operation()
            except RedisUnavailable as e:
                failures += 1
                if failures == 1:
                    self.log.warn("Redis write failed, retrying: {error}", error=e)
                    # Redis was away: an acknowledgement it answered may not have reached
                    # the replica that is its primary now, nor a fetch's reply us.
                    self._recheck.update(self.consumer_ids)
                await task.deferLater(self._clock, backoff_s(failures))
