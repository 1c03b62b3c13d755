if overtaken(KEYS[1], ARGV[2]) then return 0 end
local out = {}
-- The last key is the partition's queued-bytes counter; each record's body size follows its blob.
local stored = 0
for i = 2, #KEYS - 1 do
  local a = (i - 2) * 4
  local existing = redis.call('GET', KEYS[i])
  if existing then
    out[#out + 1] = existing
  else
    redis.call('SET', KEYS[i], ARGV[a + 3])
    redis.call('ZADD', KEYS[1], ARGV[a + 2], ARGV[a + 1])
    stored = stored + tonumber(ARGV[a + 4])
    out[#out + 1] = 1
  end
end
if stored > 0 then redis.call('INCRBY', KEYS[#KEYS], stored) end
return out
