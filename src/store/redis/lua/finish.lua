if not listed(KEYS[3], ARGV[2], ARGV[3]) then return 0 end
redis.call('ZREM', KEYS[3], ARGV[2])
redis.call('SET', KEYS[2], ARGV[4])
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[2])
unqueue_bytes(KEYS[5], ARGV[6])
return 1
