if redis.call('GET', KEYS[1]) ~= ARGV[3] then return -1 end
local from = nil
-- ARGV[6] 'dead': only a dead letter (an operator's edit supersedes it), never a pending item.
local first = 2
if ARGV[6] == 'dead' then first = 3 end
for i = first, 3 do
  if listed(KEYS[i], ARGV[1], ARGV[2]) then
    from = KEYS[i]
    break
  end
end
if not from then return 0 end
redis.call('ZREM', from, ARGV[1])
if from == KEYS[2] then unqueue_bytes(KEYS[5], ARGV[7]) end
redis.call('SET', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[1])
return 1
