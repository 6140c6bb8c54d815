-- uses: status
-- KEYS: pending, processing, suspects.
-- ARGV: most, started_at, ttl ms, status key prefix, idle ('1': the consumer runs
-- nothing now).
-- Moves up to `most` waiting tasks into the processing list (oldest first) and marks
-- each started; returns {mode, raw_1, attempts_1, raw_2, attempts_2, ...}. A task
-- cancelled while it waited is dropped instead (mode then reads 'tasks:<how many>'). While
-- suspects (tasks whose process died running them) wait, they go first, one at a
-- time, to an idle consumer only: mode 'alone' (run it and nothing else until it
-- ends), or 'wait' and nothing for a busy consumer (let your tasks finish, then ask
-- again). Otherwise mode 'tasks'. One round trip for a whole batch: what keeps
-- consumers up with a busy web side. The status keys come from the popped tasks'
-- ids (they cannot be declared in KEYS beforehand); they share the slot of KEYS.
local source, most, mode = KEYS[1], tonumber(ARGV[1]), 'tasks'
if redis.call('LLEN', KEYS[3]) > 0 then
  if ARGV[5] ~= '1' then return {'wait'} end
  source, most, mode = KEYS[3], 1, 'alone'
end
local out, dropped = {mode}, 0
for _ = 1, most do
  local raw = redis.call('RPOPLPUSH', source, KEYS[2])
  if not raw then break end
  local attempts = 1
  local ok, task = pcall(cjson.decode, raw)
  if ok and type(task) == 'table' and type(task.id) == 'string'
     and type(task.user_id) == 'string' and type(task.queued_at) == 'string' then
    attempts = mark_started(ARGV[4] .. task.id, ARGV[2], ARGV[3], task.user_id, task.queued_at)
  end
  if attempts == 0 then
    redis.call('LPOP', KEYS[2])  -- cancelled: acknowledged (it is the entry just moved), not run
    dropped = dropped + 1
  else
    out[#out + 1] = raw
    out[#out + 1] = attempts
  end
end
if dropped > 0 then out[1] = mode .. ':' .. dropped end
return out
