-- uses: now_ms, status, dead_letter
-- KEYS: status, processing, delayed, dead, finished (Pub/Sub: the id when dead).
-- ARGV: raw task, attempts, outcome ('retrying' or 'dead', TaskQueue.failure_outcome),
--       retry delay ms, error, finished_at, ttl ms, dead-letter max, duration ms,
--       user_id, queued_at.
-- A failed attempt, whose task-log line is already written: acknowledge, then either
-- schedule a retry (due time from the Redis clock) or dead-letter the task. Only if
-- the entry was still there: a replay of this call (its reply was lost) or a reaper
-- that took the entry back must not add a second copy of the task. Then it does
-- nothing and returns the outcome if an earlier try of this same call recorded it
-- (the record has this outcome at this attempt's finished_at), else 'gone'; else the
-- outcome.
if redis.call('LREM', KEYS[2], 1, ARGV[1]) == 0 then
  local record = redis.call('HMGET', KEYS[1], 'status', 'finished_at')
  if record[1] == ARGV[3] and record[2] == ARGV[6] then return ARGV[3] end
  return 'gone'
end
local outcome = ARGV[3]
if outcome == 'retrying' then
  redis.call('ZADD', KEYS[3], now_ms() + tonumber(ARGV[4]), ARGV[1])
else
  dead_letter(KEYS[4], tonumber(ARGV[8]), ARGV[1], ARGV[5], tonumber(ARGV[2]), now_ms())
end
record_outcome(KEYS[1], outcome, ARGV[5], ARGV[6], ARGV[9], ARGV[10], ARGV[11], ARGV[7])
if outcome == 'dead' then redis.call('PUBLISH', KEYS[5], string.match(KEYS[1], '[^:]+$')) end
return outcome
