-- uses: now_ms
-- KEYS: delayed, pending. ARGV: most to move. Moves retries that are due (by the
-- Redis clock) to the queue. Any process may run it, at any time.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms(), 'LIMIT', 0, tonumber(ARGV[1]))
for _, raw in ipairs(due) do
  redis.call('ZREM', KEYS[1], raw)
  redis.call('LPUSH', KEYS[2], raw)
end
return #due
