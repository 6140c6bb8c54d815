-- Fixed-window rate limits (ratelimit.py). read_tiers() reads the leading ARGV:
-- n, limit_1, window_ms_1, ..., limit_n, window_ms_n. charge(first, tiers) checks
-- and charges the counters KEYS[first .. first + n - 1]: every tier is read first,
-- and all are charged only if all admit, so a rejected request costs nothing. It
-- returns `allowed` (1 or 0) and `reply` = {allowed, used_1, ttl_ms_1, ...}; "used"
-- is after the charge when allowed, before it when not. A counter is created with
-- its TTL (SET ... PX), and one at PTTL <= 0 counts as a new window.

local function read_tiers()
  local tiers = {}
  for i = 1, tonumber(ARGV[1]) do
    tiers[i] = {tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])}
  end
  return tiers
end

local function charge(first, tiers)
  local allowed, used, ttl = 1, {}, {}
  for i, tier in ipairs(tiers) do
    local key = KEYS[first + i - 1]
    local count = tonumber(redis.call('GET', key) or '0') or 0
    local left = tier[2]
    if count > 0 then
      left = redis.call('PTTL', key)
      if left <= 0 then count, left = 0, tier[2] end
    end
    if count + 1 > tier[1] then allowed = 0 end
    used[i], ttl[i] = count, left
  end
  local reply = {allowed}
  for i, tier in ipairs(tiers) do
    if allowed == 1 then
      if used[i] == 0 then
        redis.call('SET', KEYS[first + i - 1], 1, 'PX', tier[2])
      else
        redis.call('INCR', KEYS[first + i - 1])
      end
      used[i] = used[i] + 1
    end
    reply[#reply + 1] = used[i]
    reply[#reply + 1] = ttl[i]
  end
  return allowed, reply
end
