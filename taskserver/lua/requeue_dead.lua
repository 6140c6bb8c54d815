-- uses: dead_letter, status
-- taskserver-admin requeue. KEYS: dead, pending.
-- ARGV: status key prefix, most, then task ids (none: every dead task).
-- Moves dead tasks back to the queue, oldest first, each exactly the text that died,
-- with a fresh set of attempts (record_requeued). The status keys come from the tasks'
-- ids, as in fetch_batch.lua. Work per call is bounded, so Redis is never held up for
-- long (it answers nothing else while a script runs):
-- - no ids: takes up to `most` entries from the oldest end (RPOP, O(1) each; admin.py
--   calls again until the list is done). An entry it cannot read (not written by
--   taskserver) stays, moved to the newest end, so the next call does not meet it.
--   Returns {moved, taken from the list}.
-- - ids: each named task's oldest entry, found scanning from the oldest end, removed
--   with LREM from that end (where it is). Returns {moved, 0}.
-- The task's id: read from the front of the text as Task.to_json writes it (no need to
-- decode a whole payload), else decoded.
local function task_id(raw)
  local id = string.match(raw, '^{"id":"(%x+)"')
  if id then return id end
  local ok, task = pcall(cjson.decode, raw)
  if ok and type(task) == 'table' and type(task.id) == 'string' then return task.id end
  return nil
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
for i = 3, #ARGV do
  if not wanted[ARGV[i]] then wanted[ARGV[i]], left = true, left + 1 end
end
local entries = redis.call('LRANGE', KEYS[1], 0, -1)
for i = #entries, 1, -1 do
  if left == 0 then break end
  local raw = dead_letter_task(entries[i])
  local id = raw and task_id(raw)
  if id and wanted[id] then
    wanted[id], left = nil, left - 1
    redis.call('LREM', KEYS[1], -1, entries[i])
    requeue(raw, id)
    moved = moved + 1
  end
end
return {moved, 0}
