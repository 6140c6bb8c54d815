-- uses: limit, status
-- For each task: the rate limit, then, if it admits the task, its status record and
-- the push. Atomic, so a fast consumer can never finish a task before its "queued"
-- record lands. Several tasks per call (coalesce.py): one script invocation and one
-- LPUSH for all.
-- KEYS: pending, then per task: counter_1..counter_n, status.
-- ARGV: as read_tiers(), status ttl ms, then per task: json, user_id, queued_at.
-- Returns one rate-limit reply per task.
local tiers = read_tiers()
local n = #tiers
local ttl = ARGV[2 * n + 2]
local replies, pushed = {}, {}
local k = 2
for a = 2 * n + 3, #ARGV, 3 do
  local allowed, reply = charge(k, tiers)
  if allowed == 1 then
    record_queued(KEYS[k + n], ARGV[a + 1], ARGV[a + 2], ttl)
    pushed[#pushed + 1] = ARGV[a]
  end
  replies[#replies + 1] = reply
  k = k + n + 1
end
if #pushed > 0 then redis.call('LPUSH', KEYS[1], unpack(pushed)) end
return replies
