-- uses: now_ms
-- KEYS: processing, delayed. ARGV: raw task, delay ms.
-- Gives back one entry whose outcome could not be recorded (an error that retrying the
-- same call would not cure): it leaves the processing list for the delayed set, so it
-- runs again after the delay (PROMOTE), not at once in a loop. Only if it was still
-- there, so a replay moves nothing twice. Returns 1 if it moved.
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('ZADD', KEYS[2], now_ms() + tonumber(ARGV[2]), ARGV[1])
return 1
