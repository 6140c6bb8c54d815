-- Idempotency keys (idempotency.py). KEYS: claim.
-- ARGV: the claim seen, the new claim, ttl ms, abandoned after ms.
-- Replaces the claim if it is still the one seen and old enough (by its TTL, so by
-- the Redis clock); returns 1 if it did.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if redis.call('PTTL', KEYS[1]) > tonumber(ARGV[3]) - tonumber(ARGV[4]) then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
