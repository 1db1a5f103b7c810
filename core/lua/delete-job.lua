--[[
DeleteJob (core/job-transitions.ts deleteJob): forgets a finished job in one step, so
that no call sees it half gone. The record goes, and with it every pointer that could
hand the job out again: the owner's list entry, the dedup entry of its parameters (if
it still names this job), its active slot, an owed callback, and its result's
retention entry (the API deletes the object itself). Idempotency keys that name it are
free once the record is gone (admit.lua).

KEYS[1] job hash   KEYS[2] the owner's jobs index   KEYS[3] the dedup key of its params
KEYS[4] the owner's active set   KEYS[5] webhook outbox   KEYS[6] result expiry set
KEYS[7] the job's per-file state (core/keys.ts jobFiles)
ARGV[1] owner   ARGV[2] job id   ARGV[3] result expiry member ("" = none)

Returns {1} deleted, {0} no such job (or another owner's), {2, state} not finished.
]]
local f = redis.call('HMGET', KEYS[1], 'state', 'owner')
if not f[1] or f[2] ~= ARGV[1] then return {0} end
if f[1] ~= 'COMPLETED' and f[1] ~= 'FAILED' and f[1] ~= 'CANCELLED' then return {2, f[1]} end
redis.call('DEL', KEYS[1], KEYS[7])
redis.call('ZREM', KEYS[2], ARGV[2])
if redis.call('GET', KEYS[3]) == ARGV[2] then redis.call('DEL', KEYS[3]) end
redis.call('SREM', KEYS[4], ARGV[2])
redis.call('ZREM', KEYS[5], ARGV[2])
if ARGV[3] ~= '' then redis.call('ZREM', KEYS[6], ARGV[3]) end
return {1}
