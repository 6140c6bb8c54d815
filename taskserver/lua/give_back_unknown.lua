-- KEYS: processing, pending. ARGV: the entries the consumer knows it holds.
-- Gives back every other entry (a fetch whose reply was lost); returns how many.
local known = {}
for i = 1, #ARGV do known[ARGV[i]] = (known[ARGV[i]] or 0) + 1 end
local moved = 0
for _, raw in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  if (known[raw] or 0) > 0 then
    known[raw] = known[raw] - 1
  else
    redis.call('LREM', KEYS[1], 1, raw)
    redis.call('RPUSH', KEYS[2], raw)
    moved = moved + 1
  end
end
return moved
