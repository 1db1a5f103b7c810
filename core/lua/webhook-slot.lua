--[[
An owner's webhook delivery slots (worker/webhooks.ts): at most `cap` deliveries of one
owner in flight across all workers, so receivers that never answer hold that owner's
slots, not everyone's. A slot is leased until the delivery's deadline, so a worker that
dies mid-delivery frees it by itself. A delivery that finds no free slot is parked; the
delivery that frees a slot hands back the longest-parked one, to be promoted at once.

KEYS[1] the owner's in-flight set (member -> lease end)   KEYS[2] its parked set (member -> since)
ARGV[1] "acquire" or "release"   ARGV[2] member (the BullMQ job id)   ARGV[3] now (ms)
ARGV[4] lease end (ms)   ARGV[5] cap   ARGV[6] how long the keys outlive their last use (ms)

acquire: 1 when the slot is had (again, for a member that holds one), 0 when parked.
release: the member to promote, or false.
]]
local now = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if ARGV[1] == 'acquire' then
  local had = redis.call('ZSCORE', KEYS[1], ARGV[2])
  if had or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[5]) then
    redis.call('ZADD', KEYS[1], ARGV[4], ARGV[2])
    redis.call('ZREM', KEYS[2], ARGV[2])
    redis.call('PEXPIRE', KEYS[1], ARGV[6])
    return 1
  end
  redis.call('ZADD', KEYS[2], 'NX', now, ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[6])
  return 0
end
redis.call('ZREM', KEYS[1], ARGV[2])
local next = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
if next then redis.call('ZREM', KEYS[2], next) end
return next or false
