local e = redis.call('ZSCORE', KEYS[2], ARGV[1])
if (not e) or tonumber(e) < now then return false end
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then return false end
local tick = redis.call('HINCRBY', KEYS[4], 'tick', 1)
redis.call('ZADD', KEYS[3], tick, ARGV[1])
return v
