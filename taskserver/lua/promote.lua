-- uses: now_ms
-- KEYS: delayed, pending. ARGV: most to move, status key prefix. Moves retries and
-- delayed tasks that are due (by the Redis clock) to the queue. A delayed task's
-- record says "scheduled" until then and "queued" from then on (a retry's says
-- "retrying" until it starts, so only "scheduled" changes); one whose record says
-- "cancelled" is dropped here instead (CANCEL removed it already, unless a cancel
-- raced its admission's reply). Any process may run it, at any time.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms(), 'LIMIT', 0, tonumber(ARGV[1]))
local moved = 0
for _, raw in ipairs(due) do
  redis.call('ZREM', KEYS[1], raw)
  local ok, task = pcall(cjson.decode, raw)
  local state
  if ok and type(task) == 'table' and type(task.id) == 'string' then
    state = redis.call('HGET', ARGV[2] .. task.id, 'status')
  end
  if state ~= 'cancelled' then
    if state == 'scheduled' then
      redis.call('HSET', ARGV[2] .. task.id, 'status', 'queued')
      redis.call('HDEL', ARGV[2] .. task.id, 'entry')
    end
    redis.call('LPUSH', KEYS[2], raw)
    moved = moved + 1
  end
end
return moved
