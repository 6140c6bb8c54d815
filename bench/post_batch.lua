-- wrk script: POST batches of BATCH_SIZE tasks, every item from a distinct user (the rate
-- limit never bites), and count the items accepted (202 results), which done() prints.
local BATCH_SIZE = 100
local threads = {}
function setup(thread)
  threads[#threads + 1] = thread
  thread:set("thread_number", #threads)
end

local counter = 0
accepted = 0
function request()
  local items = {}
  for i = 1, BATCH_SIZE do
    counter = counter + 1
    items[i] = string.format('{"user_id":"batch-%d-%d-%d"}',
      thread_number or 0, counter, math.random(1, 1000000000))
  end
  local body = '{"tasks":[' .. table.concat(items, ",") .. ']}'
  return wrk.format("POST", "/api/v1/tasks", {["Content-Type"] = "application/json"}, body)
end

function response(status, headers, body)
  if status == 200 then
    local _, n = string.gsub(body, '"status":202', "")
    accepted = accepted + n
  end
end

function done(summary, latency, requests)
  local total = 0
  for _, thread in ipairs(threads) do total = total + thread:get("accepted") end
  io.write(string.format("accepted tasks: %d\n", total))
end
