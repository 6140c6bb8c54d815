-- A task's status record, a hash (queue.STATUS_FIELDS). Every write that creates
-- a record or records an outcome sets its TTL, so no record outlives STATUS_TTL;
-- marking a task started keeps the TTL of its enqueue.

local function record_queued(status, user_id, queued_at, task_type, ttl_ms)
  if task_type == '' then
    redis.call('HSET', status, 'status', 'queued', 'user_id', user_id,
               'queued_at', queued_at, 'attempts', '0')
  else
    redis.call('HSET', status, 'status', 'queued', 'user_id', user_id,
               'queued_at', queued_at, 'attempts', '0', 'type', task_type)
  end
  redis.call('PEXPIRE', status, ttl_ms)
end

-- A delayed task waiting in the delayed set until run_at; `entry` is its text there,
-- so a cancel can remove it (CANCEL) without searching.
local function record_scheduled(status, user_id, queued_at, task_type, run_at, entry, ttl_ms)
  redis.call('HSET', status, 'status', 'scheduled', 'user_id', user_id,
             'queued_at', queued_at, 'attempts', '0', 'run_at', run_at, 'entry', entry)
  if task_type ~= '' then redis.call('HSET', status, 'type', task_type) end
  redis.call('PEXPIRE', status, ttl_ms)
end

-- Records "processing" and returns the attempt number. One HSET that keeps the
-- TTL of the enqueue; the whole record, with a TTL, only if it expired while the
-- task waited. A task whose record says "cancelled" does not start: 0 (the caller
-- drops its entry), so a cancel and a start never both happen (CANCEL).
local function mark_started(status, started_at, ttl_ms, user_id, queued_at)
  local record = redis.call('HMGET', status, 'attempts', 'status')
  local before = record[1]
  if record[2] == 'cancelled' then return 0 end
  if before then
    local attempts = (tonumber(before) or 0) + 1
    redis.call('HSET', status, 'status', 'processing', 'started_at', started_at,
               'attempts', attempts)
    return attempts
  end
  redis.call('HSET', status, 'status', 'processing', 'started_at', started_at,
             'attempts', 1, 'user_id', user_id, 'queued_at', queued_at)
  redis.call('PEXPIRE', status, ttl_ms)
  return 1
end

-- How an attempt ended: 'completed', 'retrying' or 'dead'; `error` is nil for a
-- success (a success keeps the error of an earlier attempt).
local function record_outcome(status, outcome, error, finished_at, duration_ms,
                              user_id, queued_at, ttl_ms)
  redis.call('HSET', status, 'status', outcome, 'finished_at', finished_at,
             'duration_ms', duration_ms, 'user_id', user_id, 'queued_at', queued_at)
  if error then redis.call('HSET', status, 'error', error) end
  redis.call('PEXPIRE', status, ttl_ms)
end

-- What a successful handler returned: its JSON text, or (result '') why it was not
-- kept. Written with the outcome, under its TTL: a result expires with its record.
local function record_result(status, result, note)
  if result ~= '' then
    redis.call('HSET', status, 'result', result)
  else
    redis.call('HSET', status, 'result_note', note)
  end
end

-- A dead task back in the queue (taskserver-admin requeue): "queued", with a fresh set
-- of attempts and nothing left of its last run. A record that expired stays away: the
-- fetch writes a whole one again.
local function record_requeued(status)
  if redis.call('EXISTS', status) == 1 then
    redis.call('HSET', status, 'status', 'queued', 'attempts', '0')
    redis.call('HDEL', status, 'started_at', 'finished_at', 'duration_ms', 'error')
  end
end
