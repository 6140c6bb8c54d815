-- uses: dead_letter, status
-- taskserver-admin requeue, and the dashboard's. KEYS: dead, pending.
-- ARGV: status key prefix, most; then (most = 0) skip, count and the task ids.
-- Moves dead tasks back to the queue, oldest first, each exactly the text that died,
-- with a fresh set of attempts (record_requeued). The status keys come from the tasks'
-- ids, as in fetch_batch.lua. Work per call is bounded, so Redis is never held up for
-- long (it answers nothing else while a script runs):
-- - no ids: takes up to `most` entries from the oldest end (RPOP, O(1) each; deadletters.py
--   calls again until the list is done). An entry it cannot read (not written by
--   taskserver) stays, moved to the newest end, so the next call does not meet it.
--   Returns {moved, taken from the list}.
-- - ids: each named task's oldest entry, found scanning from the oldest end, removed
--   with LREM from that end (where it is). One call scans `count` entries after the
--   `skip` oldest (deadletters.py calls again, further on, until each id is found or the
--   list is done: 100,000 entries are not one long call). An entry's id is read in place;
--   only a named task's entry is cut apart. Returns {moved, scanned, the ids found...}.
-- The task's id: read from the front of the text as Task.to_json writes it (no need to
-- decode a whole payload), else decoded.
local function task_id(raw)
  local id = string.match(raw, '^{"id":"(%x+)"')
  if id then return id end
  local ok, task = pcall(cjson.decode, raw)
  if ok and type(task) == 'table' and type(task.id) == 'string' then return task.id end
  return nil
end

-- The id of an entry's task, read where Task.to_json puts it without cutting the task
-- out (the first ',"task":' is the field, as in dead_letter_task); else decoded.
local function entry_task_id(entry)
  local at = string.find(entry, DEAD_TASK_FIELD, 1, true)
  local id = at and string.match(entry, '^{"id":"(%x+)"', at + #DEAD_TASK_FIELD)
  if id then return id end
  local raw = dead_letter_task(entry)
  return raw and task_id(raw)
end

local function requeue(raw, id)
  redis.call('LPUSH', KEYS[2], raw)
  if id then record_requeued(ARGV[1] .. id) end
end

local moved = 0
if #ARGV == 2 then
  local taken, unreadable = 0, {}
  for _ = 1, tonumber(ARGV[2]) do
    local entry = redis.call('RPOP', KEYS[1])
    if not entry then break end
    taken = taken + 1
    local raw = dead_letter_task(entry)
    if raw then
      requeue(raw, task_id(raw))
      moved = moved + 1
    else
      unreadable[#unreadable + 1] = entry
    end
  end
  for _, entry in ipairs(unreadable) do redis.call('LPUSH', KEYS[1], entry) end
  return {moved, taken}
end

local wanted, left = {}, 0
for i = 5, #ARGV do
  if not wanted[ARGV[i]] then wanted[ARGV[i]], left = true, left + 1 end
end
local skip, count = tonumber(ARGV[3]), tonumber(ARGV[4])
local entries = redis.call('LRANGE', KEYS[1], -skip - count, -skip - 1)
local found = {}
for i = #entries, 1, -1 do
  if left == 0 then break end
  local id = entry_task_id(entries[i])
  local raw = id and wanted[id] and dead_letter_task(entries[i])
  if raw then
    wanted[id], left = nil, left - 1
    redis.call('LREM', KEYS[1], -1, entries[i])
    requeue(raw, id)
    moved = moved + 1
    found[#found + 1] = id
  end
end
return {moved, #entries, unpack(found)}
