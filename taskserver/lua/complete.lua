-- uses: status
-- KEYS: processing, then one status key per task.
-- ARGV: ttl ms, then per task: raw task, finished_at, duration ms, user_id, queued_at.
-- Records each success and acknowledges it (removes the entry, searching from the
-- oldest end, where tasks that finish in order are). Several tasks per call
-- (coalesce.py). Returns what LREM removed, per task.
local removed = {}
for i = 2, #KEYS do
  local a = 5 * (i - 2) + 2
  record_outcome(KEYS[i], 'completed', nil, ARGV[a + 1], ARGV[a + 2], ARGV[a + 3],
                 ARGV[a + 4], ARGV[1])
  removed[#removed + 1] = redis.call('LREM', KEYS[1], -1, ARGV[a])
end
return removed
