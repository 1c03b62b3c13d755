-- Prelude: `now`, milliseconds on the Redis server's clock (scripts replicate their effects,
-- so reading the clock is safe).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
