-- uses: dead_letter
-- The dashboard's page of dead letters. KEYS: dead. ARGV: offset, limit, excerpt bytes.
-- Returns {length of the list, then per entry of offset .. offset + limit - 1 (newest
-- first): its fields without the task, the task up to its payload, the payload's JSON
-- text cut to at most `excerpt bytes` (at a character's start), 1 if it was cut}; or,
-- for an entry not of that shape, {the entry whole, "", "", -1}. Read at the same
-- moment (a page never disagrees with its total), and only the excerpt of a payload
-- leaves Redis: a page of 200 entries of 64 KiB is not 12.8 MB to decode.
local offset, cut_at = tonumber(ARGV[1]), tonumber(ARGV[3])
local entries = redis.call('LRANGE', KEYS[1], offset, offset + tonumber(ARGV[2]) - 1)
local reply = {redis.call('LLEN', KEYS[1])}

-- Task.to_json's shape: {"id":..,"user_id":..,"payload":<payload>,"queued_at":"..","attempts":n}.
-- The first ',"payload":' is the field (the user_id before it escapes its quotes); the
-- last ',"queued_at":' too (nothing after it comes from a client).
local function parts(entry)
  local raw = dead_letter_task(entry)
  if not raw then return nil end
  local at = string.find(entry, DEAD_TASK_FIELD, 1, true)
  local fields = string.sub(entry, 1, at - 1) .. '}'
  local payload_at = string.find(raw, ',"payload":', 1, true)
  local tail_at = string.find(raw, ',"queued_at":"[^"]*","attempts":%-?%d+}$')
  if not payload_at or not tail_at or tail_at <= payload_at then return nil end
  local head = string.sub(raw, 1, payload_at - 1) .. '}'
  local first, last = payload_at + #',"payload":', tail_at - 1
  local cut = 0
  if last - first + 1 > cut_at then
    last, cut = first + cut_at - 1, 1
    local byte = string.byte(raw, last + 1)
    while byte and byte >= 0x80 and byte < 0xC0 and last >= first do  -- not mid-character
      last = last - 1
      byte = string.byte(raw, last + 1)
    end
  end
  return fields, head, string.sub(raw, first, last), cut
end

for _, entry in ipairs(entries) do
  local fields, head, payload, cut = parts(entry)
  if fields then
    reply[#reply + 1] = fields
    reply[#reply + 1] = head
    reply[#reply + 1] = payload
    reply[#reply + 1] = cut
  else
    reply[#reply + 1] = entry
    reply[#reply + 1] = ''
    reply[#reply + 1] = ''
    reply[#reply + 1] = -1
  end
end
return reply
