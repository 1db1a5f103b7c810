--[[
One change of a job record (core/job-transitions.ts names each one). Atomically: checks
the record exists, is in an allowed state and, for a worker's write, that the attempt
making it owns the job; applies the fields; bumps `version`; publishes the whole record
on the job's channel. So watchers see gap-free versions in order, a terminal state is
never overwritten, and an attempt that lost the job can change nothing.

KEYS[1] job hash     KEYS[2] webhook outbox     KEYS[3] result expiry set
KEYS[4] BullMQ's lock of the job (read only by a claim)
KEYS[5] history outbox stream (appended to only once the history writer has made it)
KEYS[6] the job's per-file state: file index -> FileProgress JSON (core/keys.ts jobFiles)

ARGV[1]  channel
ARGV[2]  allowed source states, comma-separated ("" = any)
ARGV[3]  fence: "" none | "claim" the attempt takes the job | "hold" it must own it
ARGV[4]  the attempt's token
ARGV[5]  "1": a claim needs BullMQ's lock to hold the token
ARGV[6]  record TTL in seconds, applied when the new state is terminal
ARGV[7]  "1" when the new state is terminal
ARGV[8]  the new state ("" = unchanged)
ARGV[9]  result expiry member ("" = none), ARGV[10] its score
ARGV[11] the result key the record must name ("" = no such condition)
ARGV[12] how many of the field/value pairs are set only where absent (they come first)
ARGV[13] the history outbox's approximate length cap
ARGV[14] fields to remove, comma-separated ("" = none)
ARGV[15] per-file state: "" unchanged | "set" the entries below are all the files (the
         record's own `files` field goes) | "patch" only these entries changed
ARGV[16] "1": the reply carries the per-file hash too (a third element, HGETALL)
ARGV[17] the files' indices, comma-separated, in order
ARGV[18] their entries' JSON, one a line (JSON text holds no raw newline), in that order:
         two arguments however many files (a call of 140,000 arguments overflows the
         client's stack)
ARGV[19..] field/value pairs

Returns {1, json[, files]} applied (or already applied by this attempt), {0} no such
job, {2, state} not in an allowed state, {3, holder} the attempt does not own the job.

Per-file state lives in KEYS[6], not in the record: a progress tick of a job of 70,000
files writes the few entries that changed instead of the whole list (megabytes), and
the message published carries them as `filesPatch` ([[index, entry], ...]) for
watchers to apply to the version before (server/watch-hub.ts, core/job-store.ts
FilesFollower). "set" publishes the whole list as `files`, as a record read does.
]]

-- An uploaded object is registered for deletion whatever the checks below say: an
-- upload that a cancel or another attempt overtook is still an object retention removes.
if ARGV[9] ~= '' then redis.call('ZADD', KEYS[3], ARGV[10], ARGV[9]) end

local filesMode, withFiles = ARGV[15], ARGV[16] == '1'
local dataAt = 19
-- index, entry, index, entry, ... of the files this change writes
local fileArgs = {}
if filesMode ~= '' then
  local entries = {}
  for e in string.gmatch(ARGV[18], '[^\n]+') do entries[#entries + 1] = e end
  local n = 0
  for idx in string.gmatch(ARGV[17], '[^,]+') do
    n = n + 1
    fileArgs[#fileArgs + 1] = idx
    fileArgs[#fileArgs + 1] = entries[n]
  end
end
local function reply(json)
  if withFiles then return {1, json, redis.call('HGETALL', KEYS[6])} end
  return {1, json}
end

local f = redis.call('HMGET', KEYS[1], 'state', 'lease')
local state, lease = f[1], f[2]
if not state then return {0} end

local fence, token = ARGV[3], ARGV[4]
if fence == 'hold' and lease ~= token then return {3, lease or ''} end
if fence == 'claim' and ARGV[5] == '1' and redis.call('GET', KEYS[4]) ~= token then
  return {3, 'lock'}
end

local json
-- A command resent after a reconnect may have run already: the attempt that ended the
-- job is told it did, not that the job is in the wrong state.
if fence ~= '' and lease == token and ARGV[7] == '1' and state == ARGV[8] then
  local flat = redis.call('HGETALL', KEYS[1])
  local obj = {}
  for i = 1, #flat, 2 do obj[flat[i]] = flat[i + 1] end
  return reply(cjson.encode(obj))
end

if ARGV[2] ~= '' then
  local ok = false
  for s in string.gmatch(ARGV[2], '[^,]+') do
    if s == state then ok = true end
  end
  if not ok then return {2, state} end
end

if ARGV[11] ~= '' then
  local r = redis.call('HGET', KEYS[1], 'result')
  if not r or cjson.decode(r).key ~= ARGV[11] then return {2, state} end
end

for k in string.gmatch(ARGV[14], '[^,]+') do redis.call('HDEL', KEYS[1], k) end
local at = dataAt
for _ = 1, tonumber(ARGV[12]) do
  redis.call('HSETNX', KEYS[1], ARGV[at], ARGV[at + 1])
  at = at + 2
end
if #ARGV >= at then redis.call('HSET', KEYS[1], unpack(ARGV, at)) end
redis.call('HINCRBY', KEYS[1], 'version', 1)
if filesMode == 'set' then
  redis.call('DEL', KEYS[6])
  redis.call('HDEL', KEYS[1], 'files')
end
-- In slices: unpack() of more than a few thousand values overflows Lua's C stack.
for i = 1, #fileArgs, 2000 do
  redis.call('HSET', KEYS[6], unpack(fileArgs, i, math.min(i + 1999, #fileArgs)))
end
-- A claim resent after a reconnect is the same run: it is counted once.
if fence == 'claim' and lease ~= token then
  redis.call('HSET', KEYS[1], 'lease', token)
  redis.call('HINCRBY', KEYS[1], 'attempts', 1)
end
if ARGV[7] == '1' and tonumber(ARGV[6]) > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[6])
  redis.call('EXPIRE', KEYS[6], ARGV[6])
end
-- A job that leaves a terminal state (RetryJob) lives again until it ends.
if ARGV[7] ~= '1' and ARGV[8] ~= '' and (state == 'FAILED' or state == 'CANCELLED') then
  redis.call('PERSIST', KEYS[1])
  redis.call('PERSIST', KEYS[6])
end
-- The callback is owed from the moment the job ends, in the same step: a crash right
-- after this script cannot lose it, and only the attempt that ended the job owes it.
if ARGV[7] == '1' and redis.call('HEXISTS', KEYS[1], 'callbackUrl') == 1 then
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[2], t[1] * 1000 + math.floor(t[2] / 1000), string.match(KEYS[1], '[^:]+$'))
end
local flat = redis.call('HGETALL', KEYS[1])
local obj = {}
for i = 1, #flat, 2 do obj[flat[i]] = flat[i + 1] end
json = cjson.encode(obj)
-- What watchers need besides the record: the files that changed, or all of them. The
-- entries are JSON already: spliced in as text, never decoded here.
local changed = {}
if filesMode == 'set' then
  obj.files = '[' .. string.gsub(ARGV[18], '\n', ',') .. ']'
elseif filesMode == 'patch' then
  for i = 1, #fileArgs, 2 do changed[#changed + 1] = '[' .. fileArgs[i] .. ',' .. fileArgs[i + 1] .. ']' end
  obj.filesPatch = '[' .. table.concat(changed, ',') .. ']'
end
redis.call('PUBLISH', ARGV[1], filesMode == '' and json or cjson.encode(obj))
-- History (worker/history-writer.ts): a change of state, or a new run of the job, goes to
-- the outbox in the same step as the change itself, so PostgreSQL can lag or be down
-- without losing any. NOMKSTREAM: with no history writer there is no stream and no cost.
-- Progress, webhook and expiry writes are not history; per-file progress and the lease
-- stay out of it.
if ARGV[8] ~= '' and (ARGV[8] ~= state or (fence == 'claim' and lease ~= token)) then
  local entry = {}
  for i = 1, #flat, 2 do
    local k = flat[i]
    if k ~= 'files' and k ~= 'lease' and k ~= 'callbackUrl' and k ~= 'webhook' and k ~= 'upload' then
      entry[#entry + 1] = k
      entry[#entry + 1] = flat[i + 1]
    end
  end
  redis.call('XADD', KEYS[5], 'NOMKSTREAM', 'MAXLEN', '~', ARGV[13], '*', unpack(entry))
end
return reply(json)
