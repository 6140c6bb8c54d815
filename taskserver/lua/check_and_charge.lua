-- uses: limit
-- A rate limit on its own (RateLimiter.check: the per-address backstop).
-- KEYS: counter_1..counter_n. ARGV: as read_tiers(). Returns charge()'s reply.
local _, reply = charge(1, read_tiers())
return reply
