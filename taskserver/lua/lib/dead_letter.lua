-- The dead-letter list's entries, written (FAIL, RECLAIM) and read (requeue) here
-- only. An entry is JSON, {"error":..,"attempts":..,"failed_at_ms":..,"task":<task>},
-- where <task> is the task's own text, verbatim and last: what goes back to the
-- queue is exactly the task that died (decoding and re-encoding it with cjson would
-- turn [] into {} and integers above 2^53 into floats).

local DEAD_TASK_FIELD = ',"task":'

-- Pushes the entry of `raw` onto the list `dead` (newest first), capped at `most`.
local function dead_letter(dead, most, raw, error, attempts, failed_at_ms)
  redis.call('LPUSH', dead, '{"error":' .. cjson.encode(error) .. ',"attempts":' .. attempts ..
             ',"failed_at_ms":' .. failed_at_ms .. DEAD_TASK_FIELD .. raw .. '}')
  redis.call('LTRIM', dead, 0, most - 1)
end

-- The task's own text in an entry, or nil. The first ',"task":' is the field: the
-- only string before it, the error, escapes its quotes.
local function dead_letter_task(entry)
  local at = string.find(entry, DEAD_TASK_FIELD, 1, true)
  if not at or string.sub(entry, -1) ~= '}' then return nil end
  return string.sub(entry, at + #DEAD_TASK_FIELD, -2)
end
