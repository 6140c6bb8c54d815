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

from twisted.internet.interfaces import IReactorTime

from taskserver.coalesce import Coalescer
from taskserver.keys import Keys
from taskserver.ratelimit import LIMIT_LUA, Decision, RatePolicy
from taskserver.redisclient import within
from taskserver.task import Task

# For each task: the rate limit (ratelimit.LIMIT_LUA), then, if it admits
# the task, its status record and the push. Atomic, so a fast consumer can
# never finish a task before its "queued" record lands. Several tasks per
# call (see coalesce.py): one script invocation and one LPUSH for all.
# KEYS: pending, then per task: counter_1..counter_n, status.
# ARGV: as read_tiers(), status ttl ms, then per task: json, user_id, queued_at.
# Returns one rate-limit reply per task.
ADMIT = (
    LIMIT_LUA
    + """
local tiers = read_tiers()
local n = #tiers
local ttl = ARGV[2 * n + 2]
local replies, pushed = {}, {}
local k = 2
for a = 2 * n + 3, #ARGV, 3 do
  local allowed, reply = charge(k, tiers)
  if allowed == 1 then
    local status = KEYS[k + n]
    redis.call('HSET', status, 'status', 'queued', 'user_id', ARGV[a + 1],
               'queued_at', ARGV[a + 2], 'attempts', '0')
    redis.call('PEXPIRE', status, ttl)
    pushed[#pushed + 1] = ARGV[a]
  end
  replies[#replies + 1] = reply
  k = k + n + 1
end
if #pushed > 0 then redis.call('LPUSH', KEYS[1], unpack(pushed)) end
return replies
"""
)

# A Lua function: mark_started(status key, started_at, ttl ms, user_id,
# queued_at) records "processing" and returns the attempt number. One HSET
# that keeps the TTL of the enqueue; the whole record, with a TTL, only if
# it expired while the task waited.
MARK_STARTED_LUA = """
local function mark_started(status, started_at, ttl, user_id, queued_at)
  local before = redis.call('HGET', status, 'attempts')
  if before then
    local attempts = (tonumber(before) or 0) + 1
    redis.call('HSET', status, 'status', 'processing', 'started_at', started_at,
               'attempts', attempts)
    return attempts
  end
  redis.call('HSET', status, 'status', 'processing', 'started_at', started_at,
             'attempts', 1, 'user_id', user_id, 'queued_at', queued_at)
  redis.call('PEXPIRE', status, ttl)
  return 1
end
"""

# KEYS: pending, processing, suspects.
# ARGV: most, started_at, ttl ms, status key prefix, idle ('1': the consumer
# runs nothing now).
# Moves up to `most` waiting tasks into the processing list (oldest first) and
# marks each started; returns {mode, raw_1, attempts_1, raw_2, attempts_2, ...}.
# While suspects (tasks whose process died running them) wait, they go first,
# one at a time, to an idle consumer only: mode 'alone' (run it and nothing
# else until it ends), or 'wait' and nothing for a busy consumer (let your
# tasks finish, then ask again). Otherwise mode 'tasks'.
# One round trip for a whole batch: what keeps consumers up with a busy web side.
FETCH_BATCH = (
    MARK_STARTED_LUA
    + """
local source, most, mode = KEYS[1], tonumber(ARGV[1]), 'tasks'
if redis.call('LLEN', KEYS[3]) > 0 then
  if ARGV[5] ~= '1' then return {'wait'} end
  source, most, mode = KEYS[3], 1, 'alone'
end
local out = {mode}
for _ = 1, most do
  local raw = redis.call('RPOPLPUSH', source, KEYS[2])
  if not raw then break end
  local attempts = 1
  local ok, task = pcall(cjson.decode, raw)
  if ok and type(task) == 'table' and type(task.id) == 'string'
     and type(task.user_id) == 'string' and type(task.queued_at) == 'string' then
    attempts = mark_started(ARGV[4] .. task.id, ARGV[2], ARGV[3], task.user_id, task.queued_at)
  end
  out[#out + 1] = raw
  out[#out + 1] = attempts
end
return out
"""
)

# KEYS: processing, pending. ARGV: the entries the consumer knows it holds.
# Gives back every other entry (a fetch whose reply was lost); returns how many.
GIVE_BACK_UNKNOWN = """
local known = {}
for i = 1, #ARGV do known[ARGV[i]] = (known[ARGV[i]] or 0) + 1 end
local moved = 0
for _, raw in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  if (known[raw] or 0) > 0 then
    known[raw] = known[raw] - 1
  else
    redis.call('LREM', KEYS[1], 1, raw)
    redis.call('RPUSH', KEYS[2], raw)
    moved = moved + 1
  end
end
return moved
"""

# KEYS: status. ARGV: started_at, ttl ms, user_id, queued_at. Returns attempts.
MARK_STARTED = (
    MARK_STARTED_LUA + "return mark_started(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4])\n"
)

# KEYS: processing, then one status key per task.
# ARGV: ttl ms, then per task: raw task, finished_at, duration ms, user_id, queued_at.
# Records each success and acknowledges it (removes the entry, searching from
# the oldest end, where tasks that finish in order are). Several tasks per
# call (see coalesce.py). Returns what LREM removed, per task.
COMPLETE = """
local removed = {}
for i = 2, #KEYS do
  local a = 5 * (i - 2) + 2
  redis.call('HSET', KEYS[i], 'status', 'completed', 'finished_at', ARGV[a + 1],
             'duration_ms', ARGV[a + 2], 'user_id', ARGV[a + 3], 'queued_at', ARGV[a + 4])
  redis.call('PEXPIRE', KEYS[i], ARGV[1])
  removed[#removed + 1] = redis.call('LREM', KEYS[1], -1, ARGV[a])
end
return removed
"""

# KEYS: status, processing, delayed, dead.
# ARGV: raw task, attempts, outcome ('retrying' or 'dead', TaskQueue.failure_outcome),
#       retry delay ms, error, finished_at, ttl ms, dead-letter max, duration ms,
#       user_id, queued_at.
# A failed attempt: acknowledge, then either schedule a retry (due time from
# the Redis clock, so hosts' clocks do not matter) or dead-letter the task.
FAIL = """
redis.call('LREM', KEYS[2], 1, ARGV[1])
local attempts = tonumber(ARGV[2])
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
local outcome = ARGV[3]
if outcome == 'retrying' then
  redis.call('ZADD', KEYS[3], now_ms + tonumber(ARGV[4]), ARGV[1])
else
  redis.call('LPUSH', KEYS[4], '{"error":' .. cjson.encode(ARGV[5]) .. ',"attempts":' .. attempts ..
             ',"failed_at_ms":' .. now_ms .. ',"task":' .. ARGV[1] .. '}')
  redis.call('LTRIM', KEYS[4], 0, tonumber(ARGV[8]) - 1)
end
redis.call('HSET', KEYS[1], 'status', outcome, 'error', ARGV[5], 'finished_at', ARGV[6],
           'duration_ms', ARGV[9], 'user_id', ARGV[10], 'queued_at', ARGV[11])
redis.call('PEXPIRE', KEYS[1], ARGV[7])
return outcome
"""

# KEYS: delayed, pending. ARGV: most to move. Moves retries that are due
# (by the Redis clock) to the queue. Any process may run it, at any time.
PROMOTE = """
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms, 'LIMIT', 0, tonumber(ARGV[1]))
for _, raw in ipairs(due) do
  redis.call('ZREM', KEYS[1], raw)
  redis.call('LPUSH', KEYS[2], raw)
end
return #due
"""

# KEYS: pending, consumers, heartbeat, dead, suspects, processing_1..n.
# ARGV: status key prefix, forget ('1': unregister the consumers),
#       force ('1': even if the heartbeat exists), died ('1': the process
#       died, so the task may have killed it), max attempts, dead-letter max,
#       consumer_id_1..n.
# Without force, does nothing ({-1, 0}) while the heartbeat exists.
# Otherwise moves every entry of the processing lists back: after a graceful
# stop to the consuming end of the queue; after a death to the suspects,
# which run one at a time (FETCH_BATCH). A death counts against a task (the
# attempt its fetch charged stays) only if it was the only task its process
# was running; otherwise the crash cannot be pinned on one task and every
# task gets that attempt back. A task charged MAX_ATTEMPTS times this way
# (a poison pill) goes to the dead-letter list instead. Returns {requeued,
# dead-lettered}. Being one script, two reapers can never both move the
# same entry.
RECLAIM = """
if ARGV[3] ~= '1' and redis.call('EXISTS', KEYS[3]) == 1 then return {-1, 0} end
local requeued, dead = 0, 0
local max_attempts, dead_max = tonumber(ARGV[5]), tonumber(ARGV[6])
local died = ARGV[4] == '1'
local running = 0
for i = 6, #KEYS do running = running + redis.call('LLEN', KEYS[i]) end
local target = KEYS[1]
if died then target = KEYS[5] end
for i = 6, #KEYS do
  while true do
    local raw = redis.call('LPOP', KEYS[i])
    if not raw then break end
    local outcome = 'queued'
    local ok, task = pcall(cjson.decode, raw)
    local status = nil
    if ok and type(task) == 'table' and type(task.id) == 'string' then
      status = ARGV[1] .. task.id
      local record = redis.call('HMGET', status, 'attempts', 'status')
      local attempts = tonumber(record[1] or '0') or 0
      if died and running > 1 and record[2] == 'processing' and attempts > 0 then
        redis.call('HINCRBY', status, 'attempts', -1)
      elseif died and attempts >= max_attempts then
        outcome = 'dead'
      end
      if outcome == 'dead' then
        local error = 'its process died while running it, ' .. attempts .. ' time(s)'
        local now = redis.call('TIME')
        redis.call('LPUSH', KEYS[4], '{"error":' .. cjson.encode(error) .. ',"attempts":' ..
                   attempts .. ',"failed_at_ms":' .. (now[1] * 1000 + math.floor(now[2] / 1000)) ..
                   ',"task":' .. raw .. '}')
        redis.call('LTRIM', KEYS[4], 0, dead_max - 1)
        if redis.call('EXISTS', status) == 1 then redis.call('HSET', status, 'error', error) end
      end
      if redis.call('EXISTS', status) == 1 then redis.call('HSET', status, 'status', outcome) end
    end
    if outcome == 'queued' then
      redis.call('RPUSH', target, raw)
      requeued = requeued + 1
    else
      dead = dead + 1
    end
  end
  if ARGV[2] == '1' then redis.call('SREM', KEYS[2], ARGV[i + 1]) end
end
return {requeued, dead}
"""

# KEYS: heartbeat, consumers. ARGV: ttl ms, consumer ids...
HEARTBEAT = """
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
for i = 2, #ARGV do redis.call('SADD', KEYS[2], ARGV[i]) end
return 1
"""

STATUS_FIELDS = (
    "status",
    "user_id",
    "attempts",
    "queued_at",
    "started_at",
    "finished_at",
    "duration_ms",
    "error",
)


#: No tiers, so no counters: what enqueue() admits under.
_UNLIMITED = RatePolicy(Keys(""), ())


class Reclaimed(NamedTuple):
    """What giving a process's in-flight tasks back did."""

    requeued: int
    dead: int


Key = TypeVar("Key")
Item = TypeVar("Item")


class Batch(NamedTuple):
    """What one fetch got: ``[(raw, attempts), ...]`` and how to run it."""

    tasks: list[tuple[str, int]]
    #: A suspect: run it and nothing else until it ends.
    alone: bool = False
    #: Suspects wait for an idle consumer: start nothing, ask again once idle.
    wait: bool = False


def process_of(consumer_id: str) -> str:
    """Consumer ids are ``<process id>#<n>``; the heartbeat belongs to the process."""
    return consumer_id.rpartition("#")[0]


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
    ) -> None:
        self._redis = redis
        self.keys = keys
        self._status_ttl_ms = status_ttl_s * 1000
        self._timeout_s = timeout_s
        self._clock = clock
        self.max_attempts = max_attempts
        self._dead_letter_max = dead_letter_max
        self._admissions: dict[tuple[int, ...], Coalescer[tuple[Task, Sequence[str]], Any]] = {}
        self._completions: dict[str, Coalescer[tuple[str, Task, str, str], Any]] = {}

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

    async def _eval(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return await within(
            self._redis.eval(script, list(keys), list(args)), self._timeout_s, self._clock
        )

    async def admit(self, task: Task, policy: RatePolicy) -> Decision:
        """Check and charge ``task.user_id``'s tiers and, if allowed, enqueue the task.

        One script (ADMIT) runs the rate limit, the push and the status record,
        so "counted" and "enqueued" cannot disagree. Admissions made in the
        same reactor turn under the same tiers share one call.
        """
        batch = self._coalescer(
            self._admissions, policy.arguments, partial(self._admit_many, policy.arguments)
        )
        return policy.decide(await batch.submit((task, policy.counters(task.user_id))))

    async def _admit_many(
        self, tier_arguments: tuple[int, ...], tasks: list[tuple[Task, Sequence[str]]]
    ) -> list[Any]:
        keys = [self.keys.pending]
        args: list[Any] = [*tier_arguments, self._status_ttl_ms]
        for task, counters in tasks:
            keys += [*counters, self.keys.status(task.id)]
            args += [task.to_json(), task.user_id, task.queued_at]
        return list(await self._eval(ADMIT, keys, args))

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
        return Batch(tasks, alone=mode == "alone", wait=mode == "wait")

    async def give_back_unknown(self, consumer_id: str, held: Sequence[str]) -> int:
        """Return to the queue what is in our list but not in ``held`` (lost fetches)."""
        moved = await self._eval(
            GIVE_BACK_UNKNOWN,
            [self.keys.processing(consumer_id), self.keys.pending],
            list(held),
        )
        return int(moved)

    async def mark_started(self, task: Task, started_at: str) -> int:
        """Status "processing"; returns the attempt number (1 on the first run)."""
        attempts = await self._eval(
            MARK_STARTED,
            [self.keys.status(task.id)],
            [started_at, self._status_ttl_ms, task.user_id, task.queued_at],
        )
        return int(attempts)

    async def complete(
        self, consumer_id: str, raw: str, task: Task, finished_at: str, duration_ms: float
    ) -> None:
        """Record success and acknowledge: the entry leaves the processing list.

        The completions of one consumer in the same reactor turn share one call.
        """
        batch = self._coalescer(
            self._completions, consumer_id, partial(self._complete_many, consumer_id)
        )
        await batch.submit((raw, task, finished_at, f"{duration_ms:.3f}"))

    async def _complete_many(
        self, consumer_id: str, done: list[tuple[str, Task, str, str]]
    ) -> list[Any]:
        keys = [self.keys.processing(consumer_id)]
        args: list[Any] = [self._status_ttl_ms]
        for raw, task, finished_at, duration_ms in done:
            keys.append(self.keys.status(task.id))
            args += [raw, finished_at, duration_ms, task.user_id, task.queued_at]
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
        """Record a failed attempt and acknowledge it; returns its failure_outcome()."""
        outcome = self.failure_outcome(attempts)
        await self._eval(
            FAIL,
            [
                self.keys.status(task.id),
                self.keys.processing(consumer_id),
                self.keys.delayed,
                self.keys.dead,
            ],
            [
                raw,
                attempts,
                outcome,
                max(0, int(retry_in_s * 1000)),
                error,
                finished_at,
                self._status_ttl_ms,
                self._dead_letter_max,
                f"{duration_ms:.3f}",
                task.user_id,
                task.queued_at,
            ],
        )
        return outcome

    def failure_outcome(self, attempts: int) -> str:
        """What a failed ``attempts``-th attempt becomes: "retrying", or "dead" at the last.

        Known before the outcome is recorded, so the task-log line can be written first.
        """
        return "retrying" if attempts < self.max_attempts else "dead"

    async def promote(self, limit: int = 1000) -> int:
        """Move retries that are due into the queue; returns how many."""
        return int(await self._eval(PROMOTE, [self.keys.delayed, self.keys.pending], [limit]))

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
