-- KEYS: status, delayed, finished (the Pub/Sub channel). ARGV: task id, cancelled_at,
-- status ttl ms (the record expires that long after its cancel, not after its delay).
-- A queued or scheduled task becomes "cancelled", atomically with the check of its
-- status: the start step (lib/status.lua mark_started, in FETCH_BATCH and
-- MARK_STARTED) refuses a task whose record says cancelled, so a task either starts
-- (and a cancel after that finds "processing") or is cancelled, never both. A
-- scheduled one also leaves the delayed set (its entry is in its record; no O(N)
-- search). Returns {status after the call, changed (1 if cancelled by this call)};
-- status false when there is no record.
local state = redis.call('HGET', KEYS[1], 'status')
if not state then return {false, 0} end
if state ~= 'queued' and state ~= 'scheduled' then return {state, 0} end
if state == 'scheduled' then
  local entry = redis.call('HGET', KEYS[1], 'entry')
  if entry then redis.call('ZREM', KEYS[2], entry) end
end
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'cancelled_at', ARGV[2])
redis.call('HDEL', KEYS[1], 'entry')
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PUBLISH', KEYS[3], ARGV[1])
return {'cancelled', 1}
