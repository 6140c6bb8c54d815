-- A user's recent tasks, newest first, with their status records, in one call.
-- KEYS: the user's list. ARGV: status key prefix, limit, then the record's field names.
-- Returns {id, value_1, ..., value_n} per listed task whose record still exists;
-- ids whose records expired are left out.
local ids = redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1)
local fields = {}
for i = 3, #ARGV do fields[#fields + 1] = ARGV[i] end
local found = {}
for _, id in ipairs(ids) do
  local values = redis.call('HMGET', ARGV[1] .. id, unpack(fields))
  local any = false
  for i = 1, #fields do
    if values[i] then any = true else values[i] = false end
  end
  if any then
    table.insert(values, 1, id)
    found[#found + 1] = values
  end
end
return found
