-- uses: limit, status, now_ms
-- For each task: the rate limit, then, if it admits the task, its status record and
-- the push (or, for a delayed task, its place in the delayed set). Atomic, so a fast
-- consumer can never finish a task before its "queued" record lands. Several tasks
-- per call (coalesce.py): one script invocation and one LPUSH for all.
-- KEYS: pending, delayed, then per task: counter_1..counter_n, status.
-- ARGV: as read_tiers(), status ttl ms, stride (3 or 6), then per task: json, user_id,
-- queued_at and, when the stride is 6: type ('' for none), delay ms ('0' for none),
-- run_at (the due time for the record).
-- Returns one rate-limit reply per task.
local tiers = read_tiers()
local n = #tiers
local ttl = ARGV[2 * n + 2]
local stride = tonumber(ARGV[2 * n + 3])
local replies, pushed = {}, {}
local k = 3
local now
for a = 2 * n + 4, #ARGV, stride do
  local allowed, reply = charge(k, tiers)
  if allowed == 1 then
    local task_type, delay_ms = '', 0
    if stride == 6 then task_type, delay_ms = ARGV[a + 3], tonumber(ARGV[a + 4]) end
    if delay_ms > 0 then
      now = now or now_ms()
      -- Kept until it is due, and STATUS_TTL after that.
      record_scheduled(KEYS[k + n], ARGV[a + 1], ARGV[a + 2], task_type, ARGV[a + 5], ARGV[a],
                       tonumber(ttl) + delay_ms)
      redis.call('ZADD', KEYS[2], now + delay_ms, ARGV[a])
    else
      record_queued(KEYS[k + n], ARGV[a + 1], ARGV[a + 2], task_type, ttl)
      pushed[#pushed + 1] = ARGV[a]
    end
  end
  replies[#replies + 1] = reply
  k = k + n + 1
end
if #pushed > 0 then redis.call('LPUSH', KEYS[1], unpack(pushed)) end
return replies
