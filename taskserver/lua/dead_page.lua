-- The dashboard's page of dead letters. KEYS: dead. ARGV: offset, limit.
-- Returns {length of the list, its entries offset .. offset + limit - 1}, newest first,
-- read at the same moment (a page never disagrees with its total).
local offset = tonumber(ARGV[1])
local entries = redis.call('LRANGE', KEYS[1], offset, offset + tonumber(ARGV[2]) - 1)
return {redis.call('LLEN', KEYS[1]), entries}
