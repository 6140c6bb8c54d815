-- wrk script: POST a task, every request from a distinct user (the rate limit never bites).
-- setup() runs in the main Lua state; thread:set() gives each thread's state its number.
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("thread_number", threads)
end

local counter = 0
function request()
  counter = counter + 1
  local body = string.format('{"user_id":"bench-%d-%d-%d"}',
    thread_number or 0, counter, math.random(1, 1000000000))
  return wrk.format("POST", "/api/v1/task", {["Content-Type"] = "application/json"}, body)
end
