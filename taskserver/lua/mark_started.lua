-- uses: status
-- KEYS: status. ARGV: started_at, ttl ms, user_id, queued_at. Returns attempts.
-- A replay (the consumer asks again when a reply timed out) finds its own started_at
-- and answers the same attempt number, so a lost reply charges no second attempt.
local record = redis.call('HMGET', KEYS[1], 'status', 'started_at', 'attempts')
if record[1] == 'processing' and record[2] == ARGV[1] then return tonumber(record[3]) end
return mark_started(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4])
