-- uses: status
-- KEYS: status. ARGV: started_at, ttl ms, user_id, queued_at. Returns attempts.
return mark_started(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4])
