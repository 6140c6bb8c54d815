-- uses: status
-- KEYS: processing, then one status key per task.
-- ARGV: ttl ms, then per task: raw task, finished_at, duration ms, user_id, queued_at;
-- then, only for the tasks whose handler returned something, triples: the task's
-- number (1 for the first task of the call), its result (JSON; '' if not stored), and
-- why it was not stored ('' if it was). None returned: no triple, so the common call
-- is as it was.
-- last, the finished channel (Pub/Sub: the ids recorded now, one message a call).
-- Acknowledges each success (removes the entry, searching from the oldest end, where
-- tasks that finish in order are) and, only if the entry was still there, records it:
-- a replay (its reply was lost) or an entry a reaper took back (the task runs again
-- and records its own outcome) writes nothing, so no expired record comes back and no
-- later run's status is overwritten. Several tasks per call (coalesce.py). Returns,
-- per task, 1 if this success is recorded: now, or by an earlier try of this same call
-- (the record says completed at this attempt's finished_at); else 0.
local removed = {}
local results = {}
for r = 5 * (#KEYS - 1) + 2, #ARGV - 1, 3 do results[tonumber(ARGV[r])] = r + 1 end
local finished = {}
for i = 2, #KEYS do
  local a = 5 * (i - 2) + 2
  local n = redis.call('LREM', KEYS[1], -1, ARGV[a])
  if n > 0 then
    record_outcome(KEYS[i], 'completed', nil, ARGV[a + 1], ARGV[a + 2], ARGV[a + 3],
                   ARGV[a + 4], ARGV[1])
    local r = results[i - 1]
    if r then record_result(KEYS[i], ARGV[r], ARGV[r + 1]) end
    finished[#finished + 1] = string.match(KEYS[i], '[^:]+$')
  else
    local record = redis.call('HMGET', KEYS[i], 'status', 'finished_at')
    if record[1] == 'completed' and record[2] == ARGV[a + 1] then n = 1 end
  end
  removed[#removed + 1] = n
end
if #finished > 0 then redis.call('PUBLISH', ARGV[#ARGV], table.concat(finished, ' ')) end
return removed
