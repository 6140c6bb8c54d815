-- uses: now_ms, dead_letter
-- KEYS: processing, delayed, dead, status, finished (Pub/Sub: the id when dead).
-- ARGV: raw task, delay ms, max attempts, dead-letter max.
-- Gives back one entry whose outcome could not be recorded (an error that retrying the
-- same call would not cure): it leaves the processing list for the delayed set, so it
-- runs again after the delay (PROMOTE), not at once in a loop. Each run was charged an
-- attempt by its fetch, so a task whose outcome can never be recorded ends in the
-- dead-letter list after MAX_ATTEMPTS runs, like a task that keeps failing. Only if the
-- entry was still there, so a replay moves nothing twice. A task whose record says
-- "cancelled" (cancelled between its pop and its start step) is only removed: it stays
-- cancelled and never runs. Returns 'retrying', 'dead', 'cancelled' or 'gone'.
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 'gone' end
local record = redis.call('HMGET', KEYS[4], 'attempts', 'status')
if record[2] == 'cancelled' then return 'cancelled' end
local attempts = tonumber(record[1] or '0') or 0
local error = 'its outcome could not be recorded'
if attempts >= tonumber(ARGV[3]) then
  dead_letter(KEYS[3], tonumber(ARGV[4]), ARGV[1], error, attempts, now_ms())
  if redis.call('EXISTS', KEYS[4]) == 1 then
    redis.call('HSET', KEYS[4], 'status', 'dead', 'error', error)
  end
  redis.call('PUBLISH', KEYS[5], string.match(KEYS[4], '[^:]+$'))
  return 'dead'
end
redis.call('ZADD', KEYS[2], now_ms() + tonumber(ARGV[2]), ARGV[1])
if redis.call('EXISTS', KEYS[4]) == 1 then
  redis.call('HSET', KEYS[4], 'status', 'retrying', 'error', error)
end
return 'retrying'
