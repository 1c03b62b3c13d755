-- Prelude: membership tests on the sorted sets of a partition (queue, dead letters), whose
-- members are idempotency keys scored by sequence number.

-- Whether `member` is in `zset` with score `seq` (the same item, not a later retry of it).
local function listed(zset, member, seq)
  local s = redis.call('ZSCORE', zset, member)
  return s ~= false and tonumber(s) == tonumber(seq)
end

-- Whether the tail of `queue` is already at or above `seq` (another writer numbered later and
-- wrote first: appending `seq` would break the order).
local function overtaken(queue, seq)
  local tail = redis.call('ZRANGE', queue, -1, -1, 'WITHSCORES')
  return tail[2] ~= nil and tonumber(tail[2]) >= tonumber(seq)
end

-- Take `bytes` off a partition's queued-bytes counter, never below zero (items queued before
-- the counter existed were never added to it).
local function unqueue_bytes(counter, bytes)
  local left = redis.call('DECRBY', counter, bytes)
  if left <= 0 then redis.call('DEL', counter) end
end
