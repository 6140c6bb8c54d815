-- Milliseconds since the epoch by the Redis server's clock: one clock for every
-- host, so retry times and dead-letter times do not depend on the hosts' clocks.

local function now_ms()
  local now = redis.call('TIME')
  return now[1] * 1000 + math.floor(now[2] / 1000)
end
