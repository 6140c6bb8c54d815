-- KEYS: heartbeat, consumers. ARGV: ttl ms, consumer ids...
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
for i = 2, #ARGV do redis.call('SADD', KEYS[2], ARGV[i]) end
return 1
