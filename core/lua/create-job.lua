--[[
Stores a new QUEUED job record unless one exists under that id (tests and tools; Initiate
creates jobs through admit.lua).
KEYS[1] job hash   ARGV[1..] the record's field/value pairs
Returns 1 when created, 0 when the id is taken.
]]
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
