--[[
Stores a new QUEUED job record unless one exists under that id (tests and tools; Initiate
creates jobs through admit.lua), and lists it in its owner's index as admit.lua does.
KEYS[1] job hash   KEYS[2] the owner's jobs index
ARGV[1] created at (ms)   ARGV[2] job id   ARGV[3..] the record's field/value pairs
Returns 1 when created, 0 when the id is taken.
]]
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
return 1
