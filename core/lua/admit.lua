--[[
What Initiate decides before a job exists, in one step so that concurrent calls cannot
both pass a check and then both create (core/admission.ts): idempotency key, dedup of an
owner's identical in-flight job, reuse of a completed result, the queue's depth, the
owner's active-job limit and Initiate rate; then the new QUEUED record.

RetryJob (mode "redrive") passes the same checks for an existing failed or cancelled job:
the idempotency key, the queue's depth, the owner's limits; it reserves the job's active
slot here and leaves the record's change to its transition (core/job-transitions.ts).

KEYS[1] the new job's hash   KEYS[2] idempotency key   KEYS[3] dedup key
KEYS[4] the owner's active set   KEYS[5] the owner's rate bucket
KEYS[6] the owner's jobs by creation time (ListJobs)
ARGV[1] job key prefix (other jobs' hashes are read by name, as BullMQ's scripts do)
ARGV[2] new job id   ARGV[3] params hash   ARGV[4] idempotency TTL (0 = no key)
ARGV[5] dedup in flight   ARGV[6] reuse results   ARGV[7] dedup TTL
ARGV[8] max active per owner   ARGV[9] rate per minute   ARGV[10] now (ms)
ARGV[11] reuse margin (ms)   ARGV[12] "1" when the queue is full
ARGV[13] "create", or "redrive" (then ARGV[2] is the existing job and ARGV[14] its owner)
ARGV[14..] the record

Returns {1, id} created (redrive: admitted), {2, id} replayed, {3, id} in flight,
{4, id} reused result, {5} key reused with other parameters, {6, n} active limit,
{7, ms} rate limit, {8} queue full, {0} id collision, {9, state} redrive of a job in
another state than failed or cancelled, {10} redrive of a job that does not exist.
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
    -- A key whose job record has expired (or was deleted) is free again.
    if redis.call('EXISTS', jobPrefix .. id) == 1 then
      if hash ~= params then return {5} end
      return {2, id}
    end
  end
end

local redrive = ARGV[13] == 'redrive'
if redrive then
  local f = redis.call('HMGET', KEYS[1], 'state', 'owner')
  if not f[1] or f[2] ~= ARGV[14] then return {10} end
  if f[1] ~= 'FAILED' and f[1] ~= 'CANCELLED' then return {9, f[1]} end
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

if redrive then
  if maxActive > 0 then redis.call('SADD', KEYS[4], newId) end
  remember(newId)
  return {1, newId}
end

if redis.call('EXISTS', KEYS[1]) == 1 then return {0} end
redis.call('HSET', KEYS[1], unpack(ARGV, 14))
redis.call('ZADD', KEYS[6], now, newId)
-- The index's oldest members go once their records have expired, a couple per new job:
-- an owner who never lists keeps an index about as long as their live jobs.
for _, old in ipairs(redis.call('ZRANGE', KEYS[6], 0, 1)) do
  if redis.call('EXISTS', jobPrefix .. old) == 0 then redis.call('ZREM', KEYS[6], old) end
end
if maxActive > 0 then redis.call('SADD', KEYS[4], newId) end
if dedup or reuse then redis.call('SET', KEYS[3], newId, 'EX', ARGV[7]) end
remember(newId)
return {1, newId}
