--[[
One page of an owner's jobs, newest created first (core/job-index.ts), from the owner's
index (a sorted set of job ids by creation time, core/keys.ts ownerJobs). Each call looks
at no more than a budget of index members, whatever the owner's total: a filter that
matches few jobs gives short pages, each with the position to go on from. Members whose
record has expired are removed as they are met.

KEYS[1] the owner's jobs index
ARGV[1] job key prefix   ARGV[2] owner
ARGV[3] highest score to look at ("+inf", "(<ms>" exclusive, or "<ms>")
ARGV[4] with ARGV[3] a number: members at that score from this id on (descending) were
        listed already ("" = none)
ARGV[5] lowest score ("-inf" or "<ms>")
ARGV[6] page size   ARGV[7] most members to look at
ARGV[8] states, comma-separated ("" = every state)
ARGV[9] labels every job must carry, as a JSON object ("" = none)
ARGV[10] per-file state key prefix (core/keys.ts jobFiles): a running job's files live
         there, not in its record

Returns {next score, next id, job JSON...}: next score "" when nothing follows, else
the position after the last member looked at.
]]
local index, prefix, owner = KEYS[1], ARGV[1], ARGV[2]
local max, afterId, min = ARGV[3], ARGV[4], ARGV[5]
local size, budget = tonumber(ARGV[6]), tonumber(ARGV[7])
local states = {}
for s in string.gmatch(ARGV[8], '[^,]+') do states[s] = true end
local anyState = ARGV[8] == ''
local wanted = nil
if ARGV[9] ~= '' then wanted = cjson.decode(ARGV[9]) end
local maxScore = tonumber(max)

local out = {}
local stale = {}
local looked, offset = 0, 0
local lastScore, lastId = nil, nil
local ended = false
while #out < size and looked < budget do
  local batch = math.min(budget - looked, math.max(size - #out, 16))
  local items = redis.call('ZREVRANGEBYSCORE', index, max, min, 'WITHSCORES', 'LIMIT', offset, batch)
  if #items == 0 then ended = true break end
  offset = offset + #items / 2
  for i = 1, #items, 2 do
    local id, score = items[i], items[i + 1]
    if #out >= size then break end
    looked = looked + 1
    if afterId == '' or tonumber(score) ~= maxScore or id < afterId then
      lastScore, lastId = score, id
      local f = redis.call('HMGET', prefix .. id, 'state', 'owner', 'labels')
      if not f[1] then
        stale[#stale + 1] = id
      elseif f[2] == owner and (anyState or states[f[1]]) then
        local ok = true
        if wanted then
          local labels = f[3] and cjson.decode(f[3]) or {}
          for k, v in pairs(wanted) do
            if labels[k] ~= v then ok = false end
          end
        end
        if ok then
          local flat = redis.call('HGETALL', prefix .. id)
          local obj = {}
          for j = 1, #flat, 2 do obj[flat[j]] = flat[j + 1] end
          if obj.files == nil then
            local hash = redis.call('HGETALL', ARGV[10] .. id)
            local list = {}
            for j = 1, #hash, 2 do list[tonumber(hash[j]) + 1] = hash[j + 1] end
            obj.files = '[' .. table.concat(list, ',') .. ']'
          end
          out[#out + 1] = cjson.encode(obj)
        end
      end
    end
    if looked >= budget then break end
  end
end
-- More follows when the scan stopped before the range's end and the index holds a
-- member after the last one looked at (index order is score, then id, both descending).
local more = false
if not ended and lastId then
  local rank = redis.call('ZREVRANK', index, lastId)
  local nxt = redis.call('ZREVRANGE', index, rank + 1, rank + 1, 'WITHSCORES')
  local floor = min == '-inf' and -math.huge or tonumber(min)
  more = #nxt > 0 and tonumber(nxt[2]) >= floor
end
if #stale > 0 then redis.call('ZREM', index, unpack(stale)) end
if more then return {lastScore, lastId, unpack(out)} end
return {'', '', unpack(out)}
