--[[
What Initiate decides before a job exists, in one step so that concurrent calls cannot
both pass a check and then both create (core/admission.ts): idempotency key, dedup of an
owner's identical in-flight job, reuse of a completed result, the queue's depth, the
owner's active-job limit and Initiate rate; then the new QUEUED record.

KEYS[1] the new job's hash   KEYS[2] idempotency key   KEYS[3] dedup key
KEYS[4] the owner's active set   KEYS[5] the owner's rate bucket
ARGV[1] job key prefix (other jobs' hashes are read by name, as BullMQ's scripts do)
ARGV[2] new job id   ARGV[3] params hash   ARGV[4] idempotency TTL (0 = no key)
ARGV[5] dedup in flight   ARGV[6] reuse results   ARGV[7] dedup TTL
ARGV[8] max active per owner   ARGV[9] rate per minute   ARGV[10] now (ms)
ARGV[11] reuse margin (ms)   ARGV[12] "1" when the queue is full   ARGV[13..] the record

Returns {1, id} created, {2, id} replayed, {3, id} in flight, {4, id} reused result,
{5} key reused with other parameters, {6, n} active limit, {7, ms} rate limit,
{8} queue full, {0} id collision.
]]
local jobPrefix = ARGV[1]
local newId = ARGV[2]
local params = ARGV[3]
local idemTtl = tonumber(ARGV[4])
local dedup = ARGV[5] == '1'
local reuse = ARGV[6] == '1'
local maxActive = tonumber(ARGV[8])
local rate = tonumber(ARGV[9])
local now = tonumber(ARGV[10])

local function remember(id)
  if idemTtl > 0 then redis.call('SET', KEYS[2], id .. ' ' .. params, 'EX', idemTtl) end
end

if idemTtl > 0 then
  local prev = redis.call('GET', KEYS[2])
  if prev then
    local id, hash = string.match(prev, '^(%S+) (%S+)$')
    if hash ~= params then return {5} end
    -- A key whose job record has expired is free again.
    if redis.call('EXISTS', jobPrefix .. id) == 1 then return {2, id} end
  end
end

if dedup or reuse then
  local id = redis.call('GET', KEYS[3])
  if id then
    local f = redis.call('HMGET', jobPrefix .. id, 'state', 'result')
    if dedup and (f[1] == 'QUEUED' or f[1] == 'PROCESSING') then
      remember(id)
      return {3, id}
    end
    if reuse and f[1] == 'COMPLETED' and f[2] then
      local r = cjson.decode(f[2])
      if r.expired ~= true and tonumber(r.expiresAt or 0) > now + tonumber(ARGV[11]) then
        remember(id)
        return {4, id}
      end
    end
  end
end

if ARGV[12] == '1' then return {8} end

if maxActive > 0 and redis.call('SCARD', KEYS[4]) >= maxActive then
  -- Ended jobs leave the set only here, when it looks full: a job that ended (or whose
  -- record vanished) no longer counts, and a set below the limit needs no look at its
  -- members, so the usual Initiate costs one SCARD, not a read of every job.
  local active = 0
  for _, id in ipairs(redis.call('SMEMBERS', KEYS[4])) do
    local s = redis.call('HGET', jobPrefix .. id, 'state')
    if s == 'QUEUED' or s == 'PROCESSING' then active = active + 1 else redis.call('SREM', KEYS[4], id) end
  end
  if active >= maxActive then return {6, active} end
end

if rate > 0 then
  local b = redis.call('HMGET', KEYS[5], 'tokens', 'ts')
  local tokens = tonumber(b[1]) or rate
  local ts = tonumber(b[2]) or now
  tokens = math.min(rate, tokens + math.max(0, now - ts) * rate / 60000)
  if tokens < 1 then return {7, math.ceil((1 - tokens) * 60000 / rate)} end
  redis.call('HSET', KEYS[5], 'tokens', tostring(tokens - 1), 'ts', tostring(now))
  redis.call('PEXPIRE', KEYS[5], 60000 + math.ceil(60000 / rate))
end

if redis.call('EXISTS', KEYS[1]) == 1 then return {0} end
redis.call('HSET', KEYS[1], unpack(ARGV, 13))
if maxActive > 0 then redis.call('SADD', KEYS[4], newId) end
if dedup or reuse then redis.call('SET', KEYS[3], newId, 'EX', ARGV[7]) end
remember(newId)
return {1, newId}
