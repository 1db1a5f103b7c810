--[[
Adds one completed run to the throughput measurements the queue forecast fits
(core/forecast.ts): exponentially weighted sums of a least-squares fit of the run's
seconds against [1, files, megabytes], older runs weighing `decay` times less with every
new one. Also remembers each source file's size (up to a cap of fields), so that a job
still queued can be sized before a worker has looked at its files.
KEYS[1] stats hash   KEYS[2] file sizes hash
ARGV[1] decay (0..1)   ARGV[2] files   ARGV[3] megabytes   ARGV[4] seconds
ARGV[5] cap of the sizes hash   ARGV[6..] file id, size pairs
Returns the number of runs measured so far.
]]
local decay = tonumber(ARGV[1])
local x = { 1, tonumber(ARGV[2]), tonumber(ARGV[3]) }
local y = tonumber(ARGV[4])
local names = { 'n', 'f', 'm' }
local prev = redis.call('HGETALL', KEYS[1])
local s = {}
for i = 1, #prev, 2 do s[prev[i]] = tonumber(prev[i + 1]) end
local out = {}
local function add(field, v)
  out[#out + 1] = field
  out[#out + 1] = string.format('%.17g', (s[field] or 0) * decay + v)
end
for i = 1, 3 do
  for j = i, 3 do add('x' .. names[i] .. names[j], x[i] * x[j]) end
  add('y' .. names[i], x[i] * y)
end
add('yy', y * y)
-- Mean bytes of one source file, for the files of queued jobs whose size is unknown.
add('mf', x[3] / math.max(1, x[2]))
out[#out + 1] = 'runs'
out[#out + 1] = tostring((s['runs'] or 0) + 1)
redis.call('HSET', KEYS[1], unpack(out))
if #ARGV > 5 and redis.call('HLEN', KEYS[2]) < tonumber(ARGV[5]) then
  redis.call('HSET', KEYS[2], unpack(ARGV, 6))
end
return (s['runs'] or 0) + 1
