-- KEYS: pending, suspects, dead, delayed, consumers, metrics, workers, history.
-- ARGV: processing key prefix, heartbeat key prefix, history entries to read (0: none).
-- Reads only, and nothing per task: the counts are LLEN and ZCARD, the oldest pending
-- task is one LINDEX (the consuming end), processing is one LLEN per registered
-- consumer. Returns {pending, suspects, dead, delayed, oldest pending entry or false,
-- {seconds, microseconds} of Redis TIME, metrics as HGETALL, workers as HGETALL,
-- {consumer, in flight, heartbeat (1/0), ...}, history entries newest first}.
-- The processing and heartbeat keys come from the consumer ids; they share the
-- slot of KEYS, as in fetch_batch.lua.
local consumers = {}
for _, consumer in ipairs(redis.call('SMEMBERS', KEYS[5])) do
  local process = string.match(consumer, '^(.*)#[^#]*$') or consumer
  table.insert(consumers, consumer)
  table.insert(consumers, redis.call('LLEN', ARGV[1] .. consumer))
  table.insert(consumers, redis.call('EXISTS', ARGV[2] .. process))
end
local history = {}
local most = tonumber(ARGV[3])
if most > 0 then history = redis.call('LRANGE', KEYS[8], 0, most - 1) end
return {
  redis.call('LLEN', KEYS[1]),
  redis.call('LLEN', KEYS[2]),
  redis.call('LLEN', KEYS[3]),
  redis.call('ZCARD', KEYS[4]),
  redis.call('LINDEX', KEYS[1], -1),
  redis.call('TIME'),
  redis.call('HGETALL', KEYS[6]),
  redis.call('HGETALL', KEYS[7]),
  consumers,
  history,
}
