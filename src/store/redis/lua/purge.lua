local n = 0
for i = 2, #KEYS do
  local key = ARGV[i]
  local s = redis.call('ZSCORE', KEYS[1], key)
  if s and tonumber(s) < tonumber(ARGV[1]) then
    redis.call('ZREM', KEYS[1], key)
    n = n + redis.call('DEL', KEYS[i])
  end
end
return n
