-- Idempotency keys (idempotency.py). KEYS: claim. ARGV: record, ttl ms.
-- Returns nil if claimed now, else the existing record.
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return false end
return redis.call('GET', KEYS[1])
