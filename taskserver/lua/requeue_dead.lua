-- uses: dead_letter
-- taskserver-admin requeue. KEYS: dead, pending. ARGV: status key prefix, task ids
-- (none: all). Moves dead tasks back to the queue (oldest first), each exactly the
-- text that died, with a fresh set of attempts; returns how many moved.
local wanted = {}
for i = 2, #ARGV do wanted[ARGV[i]] = true end
local entries = redis.call('LRANGE', KEYS[1], 0, -1)
local moved = 0
for i = #entries, 1, -1 do
  local raw = dead_letter_task(entries[i]) or ''
  local ok, task = pcall(cjson.decode, raw)
  if ok and type(task) == 'table' and type(task.id) == 'string' then
    if #ARGV == 1 or wanted[task.id] then
      redis.call('LREM', KEYS[1], 1, entries[i])
      redis.call('LPUSH', KEYS[2], raw)
      local status = ARGV[1] .. task.id
      if redis.call('EXISTS', status) == 1 then
        redis.call('HSET', status, 'status', 'queued', 'attempts', '0')
      end
      moved = moved + 1
    end
  end
end
return moved
