-- uses: now_ms, dead_letter
-- KEYS: pending, consumers, heartbeat, dead, suspects, processing_1..n.
-- ARGV: status key prefix, forget ('1': unregister the consumers), force ('1': even
--       if the heartbeat exists), died ('1': the process died, so the task may have
--       killed it), max attempts, dead-letter max, consumer_id_1..n; last, the finished
--       channel (Pub/Sub: the id of each task made dead).
-- Without force, does nothing ({-1, 0}) while the heartbeat exists. Otherwise moves
-- every entry of the processing lists back: after a graceful stop to the consuming
-- end of the queue; after a death to the suspects, which run one at a time
-- (fetch_batch.lua). A death counts against a task (the attempt its fetch charged
-- stays) only if it was the only task its process was running; otherwise the crash
-- cannot be pinned on one task and every task gets that attempt back. A task charged
-- MAX_ATTEMPTS times this way (a poison pill) goes to the dead-letter list instead.
-- A task cancelled after its pop but before its start step (MARK_STARTED) is dropped:
-- it never runs.
-- Returns {requeued, dead-lettered}. Being one script, two reapers can never both
-- move the same entry. Status keys come from the tasks' ids, as in fetch_batch.lua.
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
      if record[2] == 'cancelled' then
        outcome = 'cancelled'
      elseif died and running > 1 and record[2] == 'processing' and attempts > 0 then
        redis.call('HINCRBY', status, 'attempts', -1)
      elseif died and attempts >= max_attempts then
        outcome = 'dead'
      end
      if outcome == 'dead' then
        local error = 'its process died while running it, ' .. attempts .. ' time(s)'
        dead_letter(KEYS[4], dead_max, raw, error, attempts, now_ms())
        if redis.call('EXISTS', status) == 1 then redis.call('HSET', status, 'error', error) end
        redis.call('PUBLISH', ARGV[#ARGV], task.id)
      end
      if outcome ~= 'cancelled' and redis.call('EXISTS', status) == 1 then
        redis.call('HSET', status, 'status', outcome)
      end
    end
    if outcome == 'queued' then
      redis.call('RPUSH', target, raw)
      requeued = requeued + 1
    elseif outcome == 'dead' then
      dead = dead + 1
    end
  end
  if ARGV[2] == '1' then redis.call('SREM', KEYS[2], ARGV[i + 1]) end
end
return {requeued, dead}
