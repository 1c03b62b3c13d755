if overtaken(KEYS[1], ARGV[2]) then return 0 end
local out = {}
for i = 2, #KEYS do
  local a = (i - 2) * 3
  local existing = redis.call('GET', KEYS[i])
  if existing then
    out[#out + 1] = existing
  else
    redis.call('SET', KEYS[i], ARGV[a + 3])
    redis.call('ZADD', KEYS[1], ARGV[a + 2], ARGV[a + 1])
    out[#out + 1] = 1
  end
end
return out
