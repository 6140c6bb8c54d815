-- Idempotency keys (idempotency.py). KEYS: claim. ARGV: our claim.
-- Deletes the claim only if it is still ours: one taken over meanwhile (TAKE_OVER)
-- belongs to another request, whose task may exist. Returns 1 if it deleted.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
