--[[
A job's record and its per-file hash, read in one step (core/job-store.ts get): two
separate reads could pair a record with the files of another version. A script rather
than MULTI: ioredis builds a pipeline object per MULTI that copies every command defined
on the connection (BullMQ's scripts included), which cost GetStatus more than the read.

Every change of a record raises its version in the same script that makes it
(transition.lua), so a caller holding version ARGV[1] decoded already needs nothing more
when that is still the version: most polls of a job find it unchanged.

KEYS[1] job hash   KEYS[2] the job's per-file hash
ARGV[1] the version the caller holds, or '' for none

Returns 1 when the record is still at version ARGV[1]; otherwise {record field/value
list, files field/value list} (empty lists when absent).
]]
if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], 'version') == ARGV[1] then return 1 end
return {redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2])}
