# -*- test-case-name: tests.test_queue -*-
"""The reliable queue in Redis: enqueue, fetch, acknowledge, and give back.

Tasks wait in one list (LPUSH in, RPOPLPUSH out). A consumer moves a task
atomically into its own processing list, so a task is always in exactly one
list; it is removed only after it has finished. A process keeps a heartbeat
key alive; when it dies, the processing lists of its consumers go back to
the queue (:meth:`TaskQueue.reap`). Every write that creates a status record
or records an outcome sets the record's TTL, so status records never outlive
``STATUS_TTL``; marking a task started keeps the TTL of its enqueue.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Coroutine, Sequence
from functools import partial
from typing import Any, NamedTuple, TypeVar

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from taskserver.coalesce import Coalescer
from taskserver.durability import (
    WRITE_ONLY,
    AdmissionsRefused,
    Durability,
    DurabilityTimeout,
    WaitRefused,
    call_then_wait,
    write_then_wait,
)
from taskserver.ids import process_of
from taskserver.keys import Keys
from taskserver.ratelimit import Decision, RatePolicy
from taskserver.redisclient import within
from taskserver.scripts import Script, load
from taskserver.task import MalformedTask, Task

# The scripts (lua/*.lua; each file says what its KEYS and ARGV are).
ADMIT = load("admit")
FETCH_BATCH = load("fetch_batch")
GIVE_BACK_UNKNOWN = load("give_back_unknown")
GIVE_BACK = load("give_back")
MARK_STARTED = load("mark_started")
COMPLETE = load("complete")
FAIL = load("fail")
PROMOTE = load("promote")
CANCEL = load("cancel")
RECLAIM = load("reclaim")
USER_TASKS = load("user_tasks")
HEARTBEAT = load("heartbeat")

#: What FAIL answers when the entry was no longer in the processing list: a replay of
#: a call whose reply was lost, or a reaper took the entry back. Nothing was written.
GONE = "gone"

STATUS_FIELDS = (
    "status",
    "user_id",
    "attempts",
    "queued_at",
    "started_at",
    "finished_at",
    "duration_ms",
    "error",
    "type",
    "run_at",
    "cancelled_at",
    "result",
    "result_note",
)
#: What GET /api/v1/tasks shows of each record: all but the result (see user_tasks).
LISTED_FIELDS = tuple(name for name in STATUS_FIELDS if name != "result")


#: Admission waits (WAIT, WAITAOF) in flight at once per process: each holds a connection
#: of the wait pool until Redis answers it; later turns queue behind and go out together.
WAITS_IN_FLIGHT = 2
#: Most admissions merged into one call from the turns queued behind the waits.
MOST_PER_WAIT = 1024

#: No tiers, so no counters: what enqueue() admits under.
_UNLIMITED = RatePolicy(Keys(""), ())


class UnencodableTask(ValueError):
    """A task whose text cannot be sent to Redis (a lone surrogate: not UTF-8)."""


class Reclaimed(NamedTuple):
    """What giving a process's in-flight tasks back did."""

    requeued: int
    dead: int


#: One task on its way into ADMIT: the task, its text and user id (encoded), its counters,
#: and its delay in ms (0: due now).
_Admission = tuple[Task, bytes, bytes, Sequence[str], int, str]
#: ADMIT's reply for one task, and whether the turn's wait (disk, replicas) was satisfied.
_Admitted = tuple[Any, bool]

#: One turn's admissions queued behind the waits in flight, and who waits for their replies.
_Behind = tuple[list[_Admission], defer.Deferred[list[_Admitted]]]

#: One success on its way into COMPLETE: the entry, its task, finished_at, duration ms, and
#: the handler's result: (JSON text, "") kept, ("", why) not kept, or None (nothing returned).
_Completion = tuple[str, Task, str, str, tuple[bytes, str] | None]

Key = TypeVar("Key")
Item = TypeVar("Item")


class Batch(NamedTuple):
    """What one fetch got: ``[(raw, attempts), ...]`` and how to run it."""

    tasks: list[tuple[str, int]]
    #: A suspect: run it and nothing else until it ends.
    alone: bool = False
    #: Suspects wait for an idle consumer: start nothing, ask again once idle.
    wait: bool = False
    #: Tasks it took but did not start: cancelled while they waited (dropped).
    cancelled: int = 0


def _encodable(text: str) -> bytes:
    """``text`` as UTF-8, a lone surrogate (a handler's error about a surrogateescape file
    name, say) as its escape ``\\udcff``: an outcome must always reach Redis. The one
    encode the text needs anyway (txredisapi sends bytes as they are)."""
    return text.encode("utf-8", "backslashreplace")


class TaskQueue:
    """Queue operations. Non-blocking calls have a deadline (RedisUnavailable)."""

    def __init__(
        self,
        redis: Any,
        keys: Keys,
        status_ttl_s: int,
        timeout_s: float,
        clock: IReactorTime,
        max_attempts: int = 3,
        dead_letter_max: int = 10_000,
        before_outcomes: Callable[[], None] = lambda: None,
        durability: Durability = WRITE_ONLY,
        refuse_admissions: Callable[[], AdmissionsRefused | None] = lambda: None,
        wait_redis: Any = None,
        wait_refused: Callable[[str], None] = lambda why: None,
        user_tasks_max: int = 0,
    ) -> None:
        """``durability``: what an admission waits for before it counts (see
        :mod:`taskserver.durability`); acknowledgements and outcomes never wait.
        ``wait_redis``: the pool the admissions that wait are sent on (default
        ``redis``), with :data:`WAITS_IN_FLIGHT` connections: a wait holds its
        connection until Redis answers it (up to the timeout), and on the
        request pool it would starve heartbeats, outcomes and status reads.
        ``refuse_admissions()``: an error to raise instead of admitting (the
        replicas WAIT_REPLICAS asks for are missing, Redis refused the wait), or
        None. ``wait_refused(why)``: Redis answered a wait with an error.

        ``user_tasks_max``: how many of a user's latest task ids ADMIT keeps in
        the user's list (:meth:`user_tasks`); 0 keeps none and costs nothing.

        ``before_outcomes`` runs right before outcomes (COMPLETE, FAIL) are sent.

        A child flushes its task-log lines there: its consumer writes a task's
        line before its outcome, but the two leave through buffers that are
        flushed at the end of a reactor turn, and an outcome batch scheduled in
        an earlier turn can be sent in the very turn a line is added. Flushed
        here, a line is on its way to the master before the outcome that
        removes its task can reach Redis, so a crash never leaves a completed
        task without its line.
        """
        self._before_outcomes = before_outcomes
        self._durability = durability
        self._wait = durability.wait_command(max(1, int(timeout_s * 1000)))
        self._refuse_admissions = refuse_admissions
        self._wait_refused = wait_refused
        self._redis = redis
        self.keys = keys
        self._status_ttl_ms = status_ttl_s * 1000
        self._timeout_s = timeout_s
        self._clock = clock
        self.max_attempts = max_attempts
        self._dead_letter_max = dead_letter_max
        self.user_tasks_max = user_tasks_max
        self._admissions: dict[tuple[int, ...], Coalescer[_Admission, _Admitted]] = {}
        self._wait_redis = redis if wait_redis is None else wait_redis
        self._waits = defer.DeferredSemaphore(WAITS_IN_FLIGHT)
        #: Turns' admissions waiting for a free wait, by tier arguments, oldest first.
        self._behind: dict[tuple[int, ...], list[_Behind]] = {}
        self._completions: dict[str, Coalescer[_Completion, Any]] = {}

    def _coalescer(
        self,
        batches: dict[Key, Coalescer[Item, Any]],
        key: Key,
        send: Callable[[list[Item]], Coroutine[Any, Any, list[Any]]],
    ) -> Coalescer[Item, Any]:
        """The Coalescer for ``key`` in ``batches``, made on first use."""
        if key not in batches:
            batches[key] = Coalescer(send, self._clock)
        return batches[key]

    async def _eval(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return await within(script(self._redis, keys, args), self._timeout_s, self._clock)

    async def admit(
        self, task: Task, policy: RatePolicy, delay_ms: int = 0, run_at: str = ""
    ) -> Decision:
        """Check and charge ``task.user_id``'s tiers and, if allowed, enqueue the task.

        With ``delay_ms`` the task goes to the delayed set instead, due that long
        after admission by the Redis clock, and its record says "scheduled" with
        ``run_at`` (required with a delay: the due time the caller answered, as is).

        One script (ADMIT) runs the rate limit, the push and the status record,
        so "counted" and "enqueued" cannot disagree. Admissions made in the
        same reactor turn under the same tiers share one call, and one wait
        for the disk or the replicas (DurabilityTimeout if it fell short: the
        task exists, its durability is unknown).
        """
        self.check_admissions()
        if delay_ms and not run_at:
            raise ValueError("a delayed admission needs its run_at")
        try:
            # Encoded here, not when the batch is sent, so one bad task fails alone. The
            # bytes go to Redis as they are: txredisapi encodes nothing a second time.
            text = task.to_json().encode("utf-8")
            user_id = task.user_id.encode("utf-8")
            counters = policy.counters(task.user_id)
        except UnicodeEncodeError as e:
            raise UnencodableTask(f"task {task.id} is not valid UTF-8: {e.reason}") from None
        batch = self._coalescer(
            self._admissions, policy.arguments, partial(self._admit_many, policy.arguments)
        )
        reply, durable = await batch.submit((task, text, user_id, counters, delay_ms, run_at))
        decision = policy.decide(reply)
        if decision.allowed and not durable:
            raise DurabilityTimeout(
                f"task {task.id} was written, but not confirmed in "
                f"{self._durability.describe()} within {self._timeout_s:g} s"
            )
        return decision

    async def admit_all(
        self, tasks: Sequence[tuple[Task, int, str]], policy: RatePolicy
    ) -> tuple[list[Decision], bool]:
        """:meth:`admit` for many ``(task, delay_ms, run_at)`` at once: one ADMIT call for all.

        Each task is checked and charged for its own user, as a single
        admission would be, and they all leave in the same call (with
        whatever else this turn admits). Returns a decision per task, in
        order, and whether the wait (disk, replicas) was satisfied for them:
        False means the admitted tasks exist but their durability is unknown.
        """
        self.check_admissions()
        admissions: list[_Admission] = []
        for task, delay_ms, run_at in tasks:
            if delay_ms and not run_at:
                raise ValueError("a delayed admission needs its run_at")
            try:
                text = task.to_json().encode("utf-8")
                user_id = task.user_id.encode("utf-8")
            except UnicodeEncodeError as e:
                raise UnencodableTask(f"task {task.id} is not valid UTF-8: {e.reason}") from None
            admissions.append(
                (task, text, user_id, policy.counters(task.user_id), delay_ms, run_at)
            )
        batch = self._coalescer(
            self._admissions, policy.arguments, partial(self._admit_many, policy.arguments)
        )
        replies = await batch.submit_all(admissions)
        # Most replies of a batch are alike (a first task of a new user): decided once.
        decided: dict[tuple[Any, ...], Decision] = {}
        decisions = []
        durable = True
        for reply, satisfied in replies:
            key = tuple(reply)
            decision = decided.get(key)
            if decision is None:
                decision = decided[key] = policy.decide(reply)
            decisions.append(decision)
            if decision.allowed and not satisfied:
                durable = False
        return decisions, durable

    def check_admissions(self) -> None:
        """Raise what ``refuse_admissions()`` says (nothing is written then), or return.

        Also called by the web layer before it claims an Idempotency-Key, so a
        refused POST leaves no claim behind.
        """
        refused = self._refuse_admissions()
        if refused is not None:
            raise refused

    def _admit_arguments(
        self, tier_arguments: tuple[int, ...], tasks: list[_Admission]
    ) -> tuple[list[str], list[Any]]:
        """ADMIT's KEYS and ARGV for these admissions.

        Three arguments per task in the common call (no task typed or delayed),
        six otherwise: each argument costs encoding time on the request path.
        """
        keys = [self.keys.pending, self.keys.delayed]
        extended = any(task.type is not None or delay_ms for task, _, _, _, delay_ms, _ in tasks)
        listed = self.user_tasks_max > 0
        args: list[Any] = [
            *tier_arguments,
            self._status_ttl_ms,
            6 if extended else 3,
            self.user_tasks_max,
            len(self.keys.status_prefix.encode("utf-8")),  # Lua counts bytes
        ]
        for task, text, user_id, counters, delay_ms, run_at in tasks:
            keys += [*counters, self.keys.status(task.id)]
            if listed:
                keys.append(self.keys.user_tasks(task.user_id))
            args += [text, user_id, task.queued_at]
            if extended:
                args += [task.type or "", delay_ms, run_at]
        return keys, args

    async def _admit_many(
        self, tier_arguments: tuple[int, ...], tasks: list[_Admission]
    ) -> list[_Admitted]:
        """One turn's admissions: one call, then (if one is needed) behind the waits."""
        if self._wait is None:
            keys, args = self._admit_arguments(tier_arguments, tasks)
            return [(reply, True) for reply in await self._eval(ADMIT, keys, args)]
        answer: defer.Deferred[list[_Admitted]] = defer.Deferred()
        self._behind.setdefault(tier_arguments, []).append((tasks, answer))
        await self._waits.acquire()
        try:
            await self._send_behind(tier_arguments)
        finally:
            self._waits.release()
        return await answer

    async def _send_behind(self, tier_arguments: tuple[int, ...]) -> None:
        """Send, as one call and one wait, the admissions queued under these tiers.

        Each queued turn takes a wait; one that finds its admissions already
        sent with an earlier turn's gives it back at once.
        """
        queued = self._behind.get(tier_arguments, [])
        group: list[_Behind] = []
        while queued and (
            not group or sum(len(t) for t, _ in group) + len(queued[0][0]) <= MOST_PER_WAIT
        ):
            group.append(queued.pop(0))
        if not queued:
            self._behind.pop(tier_arguments, None)
        if not group:
            return
        tasks = [admission for admitted, _ in group for admission in admitted]
        try:
            replies = await self._call_and_wait(tier_arguments, tasks)
        except Exception:
            failure = Failure()
            for _, answer in group:
                answer.errback(failure)
            return
        start = 0
        for admitted, answer in group:
            answer.callback(replies[start : start + len(admitted)])
            start += len(admitted)

    async def _call_and_wait(
        self, tier_arguments: tuple[int, ...], tasks: list[_Admission]
    ) -> list[_Admitted]:
        assert self._wait is not None
        keys, args = self._admit_arguments(tier_arguments, tasks)
        # The script's deadline, then the wait's own (it answers at its timeout in Redis).
        try:
            replies, waited = await within(
                defer.ensureDeferred(
                    call_then_wait(self._wait_redis, ADMIT, keys, args, self._wait)
                ),
                2 * self._timeout_s,
                self._clock,
            )
        except WaitRefused as e:
            self._wait_refused(str(e))  # later POSTs are refused before they write
            raise
        durable = self._durability.satisfied(waited)
        return [(reply, durable) for reply in replies]

    async def confirm_durable(self, task_id: str) -> None:
        """Return once what was written before now is as durable as a 202 promises.

        For a replay of an admission whose own wait fell short (503
        durability_timeout): a write and the same wait, on the wait pool, as
        one of the waits in flight. DurabilityTimeout if it falls short again;
        returns at once when admissions wait for nothing.
        """
        if self._wait is None:
            return
        await self._waits.acquire()
        try:
            waited = await within(
                defer.ensureDeferred(
                    write_then_wait(self._wait_redis, self.keys.durability_probe, self._wait)
                ),
                2 * self._timeout_s,
                self._clock,
            )
        except WaitRefused as e:
            self._wait_refused(str(e))
            raise
        finally:
            self._waits.release()
        if not self._durability.satisfied(waited):
            raise DurabilityTimeout(
                f"task {task_id} exists, but was not confirmed in "
                f"{self._durability.describe()} within {self._timeout_s:g} s"
            )

    async def enqueue(self, task: Task) -> None:
        """Push the task and write its "queued" status, with no rate limit."""
        await self.admit(task, _UNLIMITED)

    async def status(self, task_id: str) -> dict[str, str] | None:
        """The status record, or None when unknown or expired."""
        values = await within(
            self._redis.hmget(self.keys.status(task_id), list(STATUS_FIELDS)),
            self._timeout_s,
            self._clock,
        )
        record = {
            name: value
            for name, value in zip(STATUS_FIELDS, values, strict=True)
            if value is not None
        }
        return record or None

    async def user_tasks(self, user_id: str, limit: int) -> list[tuple[str, dict[str, str]]]:
        """The user's latest ``limit`` tasks, newest first: (task id, status record
        without its ``result``).

        One call reads the list and the records; tasks whose records expired are
        left out, so fewer than ``limit`` may come back. Results stay out so that
        one call never carries ``limit`` times RESULT_MAX_BYTES while Redis waits on it.
        """
        rows = await self._eval(
            USER_TASKS,
            [self.keys.user_tasks(user_id)],
            [self.keys.status_prefix, limit, *LISTED_FIELDS],
        )
        return [
            (
                str(task_id),
                {
                    name: value
                    for name, value in zip(LISTED_FIELDS, values, strict=True)
                    if value is not None
                },
            )
            for task_id, *values in rows
        ]

    async def ping(self) -> None:
        await within(self._redis.ping(), self._timeout_s, self._clock)

    @staticmethod
    async def fetch(blocking_redis: Any, pending: str, processing: str, wait_s: int) -> str | None:
        """Move the oldest task into ``processing``; None if none came within ``wait_s``.

        Runs on the blocking pool: BRPOPLPUSH holds its connection while it waits.
        """
        raw = await blocking_redis.brpoplpush(pending, processing, wait_s)
        return raw or None

    async def fetch_batch(
        self, consumer_id: str, most: int, started_at: str, idle: bool = True
    ) -> Batch:
        """Take up to ``most`` waiting tasks, marked started (see FETCH_BATCH).

        ``idle``: the consumer runs nothing now, so it may take a suspect.
        """
        mode, *flat = await self._eval(
            FETCH_BATCH,
            [self.keys.pending, self.keys.processing(consumer_id), self.keys.suspects],
            [most, started_at, self._status_ttl_ms, self.keys.status_prefix, "1" if idle else "0"],
        )
        tasks = [(str(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2)]
        mode, _, cancelled = str(mode).partition(":")
        return Batch(tasks, mode == "alone", mode == "wait", int(cancelled or 0))

    async def give_back_unknown(self, consumer_id: str, held: Sequence[str]) -> int:
        """Return to the queue what is in our list but not in ``held`` (lost fetches)."""
        moved = await self._eval(
            GIVE_BACK_UNKNOWN,
            [self.keys.processing(consumer_id), self.keys.pending],
            list(held),
        )
        return int(moved)

    async def mark_started(self, task: Task, started_at: str) -> int:
        """Status "processing"; returns the attempt number (1 on the first run).

        0 if its record says cancelled: it did not start, drop its entry.
        """
        attempts = await self._eval(
            MARK_STARTED,
            [self.keys.status(task.id)],
            [started_at, self._status_ttl_ms, task.user_id, task.queued_at],
        )
        return int(attempts)

    async def complete(
        self,
        consumer_id: str,
        raw: str,
        task: Task,
        finished_at: str,
        duration_ms: float,
        result: tuple[bytes, str] | None = None,
    ) -> bool:
        """Acknowledge and record success: the entry leaves the processing list.

        ``result``: what the handler returned, for the record: ``(json, "")`` to keep,
        ``(b"", why)`` for one not kept (too large, not JSON), None for nothing returned.

        True if the success is recorded, by this call or by an earlier try of it
        whose reply was lost (so it is counted once). False (and records nothing)
        if the entry was no longer there otherwise: a reaper took it back (then the
        task runs again and records its own outcome). The completions of one
        consumer in the same reactor turn share one call.
        """
        batch = self._coalescer(
            self._completions, consumer_id, partial(self._complete_many, consumer_id)
        )
        done = (raw, task, finished_at, f"{duration_ms:.3f}", result)
        return int(await batch.submit(done)) > 0

    async def _complete_many(self, consumer_id: str, done: list[_Completion]) -> list[Any]:
        """COMPLETE's call: five arguments per task, then three per task with a result."""
        keys = [self.keys.processing(consumer_id)]
        args: list[Any] = [self._status_ttl_ms]
        results: list[Any] = []
        for number, (raw, task, finished_at, duration_ms, result) in enumerate(done, 1):
            keys.append(self.keys.status(task.id))
            args += [raw, finished_at, duration_ms, _encodable(task.user_id), task.queued_at]
            if result is not None:
                results += [number, result[0], result[1]]
        args += results
        args.append(self.keys.finished)  # last, after the results
        self._before_outcomes()
        return list(await self._eval(COMPLETE, keys, args))

    async def fail(
        self,
        consumer_id: str,
        raw: str,
        task: Task,
        attempts: int,
        error: str,
        retry_in_s: float,
        finished_at: str,
        duration_ms: float,
    ) -> str:
        """Acknowledge a failed attempt and record it; returns its failure_outcome().

        A replay (an earlier try landed, its reply was lost) writes nothing and
        returns that try's outcome, so a task is never retried or dead-lettered
        twice and its failure is still counted. Returns :data:`GONE` (and writes
        nothing) if the entry had left the processing list otherwise (a reaper).
        """
        outcome = self.failure_outcome(attempts)
        self._before_outcomes()
        answer = await self._eval(
            FAIL,
            [
                self.keys.status(task.id),
                self.keys.processing(consumer_id),
                self.keys.delayed,
                self.keys.dead,
                self.keys.finished,
            ],
            [
                raw,
                attempts,
                outcome,
                max(0, int(retry_in_s * 1000)),
                _encodable(error),
                finished_at,
                self._status_ttl_ms,
                self._dead_letter_max,
                f"{duration_ms:.3f}",
                _encodable(task.user_id),
                task.queued_at,
            ],
        )
        return str(answer)

    def failure_outcome(self, attempts: int) -> str:
        """What a failed ``attempts``-th attempt becomes: "retrying", or "dead" at the last.

        Known before the outcome is recorded, so the task-log line can be written first.
        """
        return "retrying" if attempts < self.max_attempts else "dead"

    async def cancel(self, task_id: str, cancelled_at: str) -> tuple[str | None, bool]:
        """Cancel a queued or scheduled task (see CANCEL): (its status now, cancelled now?).

        The status is None for an unknown task; anything but "cancelled" means it
        was not cancellable.
        """
        state, changed = await self._eval(
            CANCEL,
            [self.keys.status(task_id), self.keys.delayed, self.keys.finished],
            [task_id, cancelled_at, self._status_ttl_ms],
        )
        return (str(state) if state else None), bool(changed)

    async def promote(self, limit: int = 1000) -> int:
        """Move retries that are due into the queue; returns how many."""
        return int(
            await self._eval(
                PROMOTE, [self.keys.delayed, self.keys.pending], [limit, self.keys.status_prefix]
            )
        )

    async def give_back(self, consumer_id: str, raw: str, delay_s: float) -> str:
        """Move one entry from the processing list to the delayed set (see GIVE_BACK).

        For an outcome that could not be recorded: the task runs again after
        ``delay_s``, or, once its runs used up MAX_ATTEMPTS, goes to the dead
        letters. Returns "retrying", "dead", "cancelled" (a cancelled task's
        entry is only removed), or :data:`GONE` if the entry was no longer there.
        """
        try:
            status = self.keys.status(Task.from_json(raw).id)
        except MalformedTask:
            status = self.keys.status("-")  # no record to update
        answer = await self._eval(
            GIVE_BACK,
            [
                self.keys.processing(consumer_id),
                self.keys.delayed,
                self.keys.dead,
                status,
                self.keys.finished,
            ],
            [raw, max(0, int(delay_s * 1000)), self.max_attempts, self._dead_letter_max],
        )
        return str(answer)

    async def drop(self, consumer_id: str, raw: str) -> None:
        """Remove an entry that is not a task (never written by us) from a processing list."""
        await within(
            self._redis.lrem(self.keys.processing(consumer_id), 1, raw),
            self._timeout_s,
            self._clock,
        )

    async def heartbeat(self, process_id: str, consumer_ids: Sequence[str], ttl_s: float) -> None:
        """Say this process is alive, and (re)register its consumers."""
        await self._eval(
            HEARTBEAT,
            [self.keys.heartbeat(process_id), self.keys.consumers],
            [max(1, int(ttl_s * 1000)), *consumer_ids],
        )

    async def forget_heartbeat(self, process_id: str) -> None:
        await within(
            self._redis.delete(self.keys.heartbeat(process_id)), self._timeout_s, self._clock
        )

    async def reclaim(
        self,
        process_id: str,
        consumer_ids: Sequence[str],
        forget: bool,
        force: bool = False,
        died: bool = True,
    ) -> Reclaimed:
        """Give a process's in-flight tasks back to the queue.

        Returns how many were requeued and dead-lettered; requeued is -1 if
        the process's heartbeat still exists
        (unless ``force``: the caller knows the process is dead). ``forget``
        also unregisters the consumers; leave them registered when a blocking
        pop of the dead process might still land, so the reaper looks again.
        ``died``: the process died (not a graceful stop), so a task that has
        used up its attempts is a poison pill and goes to the dead letters.
        """
        requeued, dead = await self._eval(
            RECLAIM,
            [
                self.keys.pending,
                self.keys.consumers,
                self.keys.heartbeat(process_id),
                self.keys.dead,
                self.keys.suspects,
                *(self.keys.processing(c) for c in consumer_ids),
            ],
            [
                self.keys.status_prefix,
                "1" if forget else "0",
                "1" if force else "0",
                "1" if died else "0",
                self.max_attempts,
                self._dead_letter_max,
                *consumer_ids,
                self.keys.finished,
            ],
        )
        return Reclaimed(int(requeued), int(dead))

    async def reap(self, own_process_id: str) -> Reclaimed:
        """Reclaim the tasks of every registered process whose heartbeat expired."""
        members = await within(
            self._redis.smembers(self.keys.consumers), self._timeout_s, self._clock
        )
        by_process: dict[str, list[str]] = defaultdict(list)
        for consumer_id in members:
            by_process[process_of(consumer_id)].append(consumer_id)
        total = Reclaimed(0, 0)
        for process_id, consumer_ids in sorted(by_process.items()):
            if process_id != own_process_id:
                got = await self.reclaim(process_id, sorted(consumer_ids), forget=True)
                total = Reclaimed(total.requeued + max(0, got.requeued), total.dead + got.dead)
        return total
