-- uses: limit, status, now_ms
-- For each task: the rate limit, then, if it admits the task, its status record and
-- the push (or, for a delayed task, its place in the delayed set). Atomic, so a fast
-- consumer can never finish a task before its "queued" record lands. Several tasks
-- per call (coalesce.py): one script invocation and one LPUSH for all.
-- KEYS: pending, delayed, then per task: counter_1..counter_n, status and, when the
-- recent-tasks list is kept (list max > 0), the user's list.
-- ARGV: as read_tiers(), status ttl ms, stride (3 or 6), list max (USER_TASKS_MAX, '0'
-- for none), the length of the status keys' prefix, then per task: json, user_id, queued_at and, when the stride is 6: type
-- ('' for none), delay ms ('0' for none), run_at (the due time for the record).
-- Returns one rate-limit reply per task.
local tiers = read_tiers()
local n = #tiers
local ttl = tonumber(ARGV[2 * n + 2])
local stride = tonumber(ARGV[2 * n + 3])
local list_max = tonumber(ARGV[2 * n + 4])
local id_from = tonumber(ARGV[2 * n + 5]) + 1
local per_task = n + 1
if list_max > 0 then per_task = n + 2 end
local replies, pushed = {}, {}
-- Each user's list once per call: its new ids, oldest first, and the TTL it needs.
local lists, list_order = {}, {}
local k = 3
local now
for a = 2 * n + 6, #ARGV, stride do
  local allowed, reply = charge(k, tiers)
  if allowed == 1 then
    local task_type, delay_ms = '', 0
    if stride == 6 then task_type, delay_ms = ARGV[a + 3], tonumber(ARGV[a + 4]) end
    if delay_ms > 0 then
      now = now or now_ms()
      -- Kept until it is due, and STATUS_TTL after that.
      record_scheduled(KEYS[k + n], ARGV[a + 1], ARGV[a + 2], task_type, ARGV[a + 5], ARGV[a],
                       ttl + delay_ms)
      redis.call('ZADD', KEYS[2], now + delay_ms, ARGV[a])
    else
      record_queued(KEYS[k + n], ARGV[a + 1], ARGV[a + 2], task_type, ttl)
      pushed[#pushed + 1] = ARGV[a]
    end
    if list_max > 0 then
      local key = KEYS[k + n + 1]
      local list = lists[key]
      if not list then
        list = {ids = {}, ttl = 0}
        lists[key] = list
        list_order[#list_order + 1] = key
      end
      -- The id is the status key's tail: the list holds ids, not whole tasks.
      list.ids[#list.ids + 1] = string.sub(KEYS[k + n], id_from)
      if ttl + delay_ms > list.ttl then list.ttl = ttl + delay_ms end
    end
  end
  replies[#replies + 1] = reply
  k = k + per_task
end
if #pushed > 0 then redis.call('LPUSH', KEYS[1], unpack(pushed)) end
for _, key in ipairs(list_order) do
  local list = lists[key]
  local length = redis.call('LPUSH', key, unpack(list.ids))
  if length > list_max then redis.call('LTRIM', key, 0, list_max - 1) end
  -- Never shorter than a record it lists (a scheduled task's record outlives a plain
  -- one's). PTTL, not PEXPIRE's GT: that needs Redis 7, and a script's error midway
  -- would leave its earlier writes in place.
  if length == #list.ids or redis.call('PTTL', key) < list.ttl then
    redis.call('PEXPIRE', key, list.ttl)  -- a new list (no TTL yet), or one to extend
  end
end
return replies
