--[[
The BullMQ priority of a new bundle job that makes owners take turns (core/queue.ts,
BundleScheduler). Start-time fair queueing: each owner has a tag, the virtual time at
which its next job may start; a job is given max(V, the owner's tag) and moves the tag on
by 1/weight. V is the round of the next waiting job of this priority level (the head of
BullMQ's `prioritized` set within the level's band of scores), or, when none waits, the
highest round handed out so far. Jobs start in round order, ties in arrival order
(BullMQ's score is priority * 2^32 + an arrival counter), so an owner with 200 jobs
queued holds one place per round and a newcomer's job goes into the next round.

A level's band is `size` consecutive BullMQ priorities from `base`. Rounds only grow;
once V reaches half the band every round of the level moves down by V (the waiting jobs'
scores, and the `priority` field of every job BullMQ could queue again: waiting, active,
delayed), so the band never runs out.

KEYS[1] the level's state hash: vt (V), max (highest round handed out), t:<owner> (tags)
KEYS[2] BullMQ prioritized   KEYS[3] BullMQ's hash of this job   KEYS[4] BullMQ wait
KEYS[5] BullMQ active   KEYS[6] BullMQ delayed
ARGV[1] owner   ARGV[2] weight (>= 1)   ARGV[3] base   ARGV[4] size
ARGV[5] BullMQ job key prefix ("<prefix>:bundles:")

Returns the priority to add the job with, or 0 when BullMQ holds the job already (a
replayed Initiate re-adds a QUEUED job; it keeps its place and the owner its tag).
]]
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end

local SCALE = 4294967296
local owner = 't:' .. ARGV[1]
local weight = tonumber(ARGV[2])
local base = tonumber(ARGV[3])
local size = tonumber(ARGV[4])
-- Scores reach 2^53: spelled with %.0f, as tostring() would round them to 14 digits.
local lo = string.format('%.0f', base * SCALE)
local hi = '(' .. string.format('%.0f', (base + size) * SCALE)

local state = redis.call('HMGET', KEYS[1], 'vt', 'max')
local vt = tonumber(state[1]) or 0
local maxRound = tonumber(state[2]) or 0
local head = redis.call('ZRANGEBYSCORE', KEYS[2], lo, hi, 'WITHSCORES', 'LIMIT', 0, 1)
if head[2] then
  vt = math.max(vt, math.floor(tonumber(head[2]) / SCALE) - base)
else
  -- Nothing of this level waits: every round handed out has started.
  vt = math.max(vt, maxRound)
end

if vt >= size / 2 then
  local shift = math.floor(vt)
  local function lower(id)
    local k = ARGV[5] .. id
    local p = tonumber(redis.call('HGET', k, 'priority'))
    if p and p >= base and p < base + size then
      redis.call('HSET', k, 'priority', math.max(base, p - shift))
    end
  end
  local waiting = redis.call('ZRANGEBYSCORE', KEYS[2], lo, hi, 'WITHSCORES')
  for i = 1, #waiting, 2 do
    local score = tonumber(waiting[i + 1])
    local counter = score % SCALE
    local round = math.floor(score / SCALE) - base
    local moved = (base + math.max(0, round - shift)) * SCALE + counter
    redis.call('ZADD', KEYS[2], string.format('%.0f', moved), waiting[i])
    lower(waiting[i])
  end
  for _, id in ipairs(redis.call('LRANGE', KEYS[4], 0, -1)) do lower(id) end
  for _, id in ipairs(redis.call('LRANGE', KEYS[5], 0, -1)) do lower(id) end
  for _, id in ipairs(redis.call('ZRANGE', KEYS[6], 0, -1)) do lower(id) end
  local fields = redis.call('HGETALL', KEYS[1])
  for i = 1, #fields, 2 do
    local f = fields[i]
    if string.sub(f, 1, 2) == 't:' then
      local t = tonumber(fields[i + 1]) - shift
      if t > 0 then redis.call('HSET', KEYS[1], f, tostring(t)) else redis.call('HDEL', KEYS[1], f) end
    end
  end
  vt = vt - shift
  maxRound = math.max(0, maxRound - shift)
end

local start = math.max(vt, tonumber(redis.call('HGET', KEYS[1], owner)) or 0)
local round = math.min(math.floor(start), size - 1)
redis.call('HSET', KEYS[1], owner, tostring(start + 1 / weight), 'vt', tostring(vt),
  'max', tostring(math.max(maxRound, round)))
return base + round
