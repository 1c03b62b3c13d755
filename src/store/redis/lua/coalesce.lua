-- A new mutation takes the place of a pending one it folds (route `coalesce = true`).
local existing = redis.call('GET', KEYS[5])
if existing then return existing end
-- A replayer holds the partition: the folded item may be in flight or in its batch.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if redis.call('GET', KEYS[4]) ~= ARGV[3] then return 0 end
if not listed(KEYS[2], ARGV[1], ARGV[2]) then return 0 end
local tail = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
if tail[2] == nil or tonumber(tail[2]) ~= tonumber(ARGV[8]) then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('SET', KEYS[4], ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[1])
redis.call('SET', KEYS[5], ARGV[7])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[6])
-- The queue's body bytes (KEYS[6]) change by the new body less the folded one.
local delta = tonumber(ARGV[9])
if delta ~= 0 then redis.call('INCRBY', KEYS[6], delta) end
return 1
