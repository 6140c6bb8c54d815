-- taskserver-admin purge. KEYS: dead. Deletes the dead-letter list; returns how many
-- entries it held. One script, so the count is what was deleted, even while tasks die.
local count = redis.call('LLEN', KEYS[1])
redis.call('DEL', KEYS[1])
return count
