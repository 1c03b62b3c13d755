if not listed(KEYS[3], ARGV[2], ARGV[3]) then return 0 end
redis.call('SET', KEYS[2], ARGV[4])
return 1
