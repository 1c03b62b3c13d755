-- Prelude: the caller must hold the partition's lease. KEYS[1] is the lease key, ARGV[1] the
-- value it holds while the caller's lease is valid (`<instance>:<token>`); otherwise (expired,
-- released, taken over by another instance) the script answers -1 and writes nothing.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
