-- uses: dead_letter, status
-- taskserver-admin requeue, and the dashboard's. KEYS: dead, pending, dead removed.
-- ARGV: status key prefix, most, most bytes; then (most = 0) start, chunk, removed and
-- the task ids.
-- Moves dead tasks back to the queue, each exactly the text that died, with a fresh set
-- of attempts (record_requeued). The status keys come from the tasks' ids, as in
-- fetch_batch.lua. Work per call is bounded by entries and by bytes (the entries read
-- are copied into Lua: 1,000 of 64 KiB would be 64 MB), so Redis is never held up for
-- long (it answers nothing else while a script runs). Each call says whether it met
-- the end of the list, so the caller never infers it:
-- - no ids: takes up to `most` entries from the oldest end (RPOP, O(1) each), stopping
--   once `most bytes` have been taken (deadletters.py calls again until the list is
--   done). An entry it cannot read (not written by taskserver) stays, moved to the
--   newest end, so the next call does not meet it. Returns {moved, taken, at end}.
-- - ids: scans from the newest end (the head), from offset `start`, in LRANGEs of
--   at most `chunk` entries (fewer when entries are large), until every id is found,
--   `most bytes` are read or the list ends.
--   A named task's entry is removed (LREM of its exact text) in the same call that
--   finds it. Counting from the head is what makes a scan over several calls miss
--   nothing: deaths meanwhile push at the head (the next call re-reads, never skips),
--   trims and requeue-all take from the tail, and purge deletes all (no offset moves;
--   the scan then ends). Only these LREMs remove from the middle, each moving the
--   entries behind it up one: each is counted in `dead removed`, and a call moves
--   `start` back by how much that grew since `removed` (what the last call returned),
--   so that it re-reads rather than skips. An entry's id is read in place; only a
--   named task's entry is cut apart.
--   Returns {moved, scanned, at end, next start, removed, the ids found...}.
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

-- A scan's first LRANGE is this small: the size of entries is not known yet.
local FIRST_CHUNK = 16
local most_bytes = tonumber(ARGV[3])
local moved = 0
if ARGV[2] ~= '0' then
  local taken, bytes, unreadable, at_end = 0, 0, {}, 0
  for _ = 1, tonumber(ARGV[2]) do
    if bytes >= most_bytes then break end
    local entry = redis.call('RPOP', KEYS[1])
    if not entry then
      at_end = 1
      break
    end
    taken, bytes = taken + 1, bytes + #entry
    local raw = dead_letter_task(entry)
    if raw then
      requeue(raw, task_id(raw))
      moved = moved + 1
    else
      unreadable[#unreadable + 1] = entry
    end
  end
  for _, entry in ipairs(unreadable) do redis.call('LPUSH', KEYS[1], entry) end
  return {moved, taken, at_end}
end

local wanted, left = {}, 0
for i = 7, #ARGV do
  if not wanted[ARGV[i]] then wanted[ARGV[i]], left = true, left + 1 end
end
local start, chunk = tonumber(ARGV[4]), tonumber(ARGV[5])
local removed = tonumber(redis.call('GET', KEYS[3]) or '0')
local since = removed - tonumber(ARGV[6])
-- Fewer than last time: the counter was deleted by hand; start again from the head.
if since < 0 then start = 0 else start = math.max(0, start - since) end
local scanned, bytes, at_end, found, raws = 0, 0, 0, {}, {}
local size = math.min(chunk, FIRST_CHUNK)
while left > 0 and bytes < most_bytes do
  local at = start + scanned - moved  -- each entry removed here moved the rest up one
  local entries = redis.call('LRANGE', KEYS[1], at, at + size - 1)
  for i = 1, #entries do
    local entry = entries[i]
    scanned, bytes = scanned + 1, bytes + #entry
    local id = entry_task_id(entry)
    local raw = id and wanted[id] and dead_letter_task(entry)
    if raw then
      wanted[id], left = nil, left - 1
      redis.call('LREM', KEYS[1], 1, entry)
      moved = moved + 1
      found[moved], raws[moved] = id, raw
      if left == 0 then break end
    end
  end
  if #entries < size then
    at_end = 1
    break
  end
  -- As many as the bytes left are likely to hold (entries read so far as the measure).
  if bytes > 0 then
    size = math.max(1, math.min(chunk, math.floor((most_bytes - bytes) * scanned / bytes) + 1))
  else
    size = chunk
  end
end
for i = moved, 1, -1 do requeue(raws[i], found[i]) end  -- the oldest first, as they died
if moved > 0 then removed = redis.call('INCRBY', KEYS[3], moved) end
return {moved, scanned, at_end, start + scanned - moved, removed, unpack(found)}
