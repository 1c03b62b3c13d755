if redis.call('GET', KEYS[1]) ~= ARGV[3] then return -1 end
if not listed(KEYS[2], ARGV[1], ARGV[2]) then return 0 end
redis.call('SET', KEYS[1], ARGV[4])
return 1
