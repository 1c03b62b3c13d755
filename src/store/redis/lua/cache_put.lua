local function drop(m)
  local len = redis.call('HSTRLEN', KEYS[1], m)
  if redis.call('HDEL', KEYS[1], m) == 1 then
    redis.call('HINCRBY', KEYS[4], 'bytes', -len)
  end
  redis.call('ZREM', KEYS[2], m)
  redis.call('ZREM', KEYS[3], m)
end
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. now, 'LIMIT', 0, tonumber(ARGV[5]))
for _, m in ipairs(expired) do drop(m) end
drop(ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HINCRBY', KEYS[4], 'bytes', string.len(ARGV[2]))
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
local tick = redis.call('HINCRBY', KEYS[4], 'tick', 1)
redis.call('ZADD', KEYS[3], tick, ARGV[1])
local budget = tonumber(ARGV[4])
while tonumber(redis.call('HGET', KEYS[4], 'bytes') or '0') > budget do
  local victim = redis.call('ZRANGE', KEYS[3], 0, 0)
  if #victim == 0 then break end
  drop(victim[1])
end
return 1
