if not listed(KEYS[3], ARGV[1], ARGV[2]) then return 0 end
if overtaken(KEYS[2], ARGV[3]) then return -2 end
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('SET', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('INCRBY', KEYS[4], ARGV[5])
return 1
