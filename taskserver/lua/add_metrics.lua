-- uses: now_ms
-- KEYS: metrics, workers, history, sampled, applied (this process's last batch number).
-- ARGV: worker id ('' for none), worker entry (JSON without seen_at; '' removes the
--       entry: a clean stop), history length, sample every ms, forget workers after
--       ms, batch number, forget the batch number after ms, then field_1, delta_1,
--       ... field_n, delta_n.
-- Adds the deltas to the totals (HINCRBY only) unless this batch number was
-- already applied (a re-sent batch whose first answer was lost), writes the worker's entry with
-- seen_at from the Redis clock, removes entries not refreshed for a while (their
-- process died), and, at most once per sample period cluster-wide (the first
-- flush that finds the marker gone), pushes a sample of the task totals to the
-- history, newest first, capped. Returns 1 if it took a sample, else 0.
local batch = tonumber(ARGV[6])
local applied = tonumber(redis.call('GET', KEYS[5]) or '0')
if batch > applied then
  for i = 8, #ARGV, 2 do
    redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
  end
  applied = batch
end
redis.call('SET', KEYS[5], applied, 'PX', ARGV[7])
local now = now_ms()
if ARGV[1] ~= '' then
  if ARGV[2] == '' then
    redis.call('HDEL', KEYS[2], ARGV[1])
  else
    local entry = cjson.decode(ARGV[2])
    entry.seen_at = now
    redis.call('HSET', KEYS[2], ARGV[1], cjson.encode(entry))
  end
end
local oldest = now - tonumber(ARGV[5])
local workers = redis.call('HGETALL', KEYS[2])
for i = 1, #workers, 2 do
  local ok, entry = pcall(cjson.decode, workers[i + 1])
  if not ok or type(entry) ~= 'table' or (tonumber(entry.seen_at) or 0) < oldest then
    redis.call('HDEL', KEYS[2], workers[i])
  end
end
if not redis.call('SET', KEYS[4], '1', 'PX', ARGV[4], 'NX') then return 0 end
local totals = redis.call('HGETALL', KEYS[1])
local sample = {}
local kept = 0
for i = 1, #totals, 2 do
  local name = totals[i]
  if string.sub(name, 1, 6) == 'tasks_' or string.sub(name, 1, 12) == 'rate_limited'
      or string.sub(name, 1, 18) == 'task_wait_seconds_'
      or string.sub(name, 1, 22) == 'task_duration_seconds_' then
    sample[name] = tonumber(totals[i + 1])
    kept = kept + 1
  end
end
local document
if kept == 0 then document = '{"t":' .. now .. ',"c":{}}'
else document = cjson.encode({t = now, c = sample}) end
redis.call('LPUSH', KEYS[3], document)
redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[3]) - 1)
return 1
