--[[
A job's record and its per-file hash, read in one step (core/job-store.ts get): two
separate reads could pair a record with the files of another version. A script rather
than MULTI: ioredis builds a pipeline object per MULTI that copies every command defined
on the connection (BullMQ's scripts included), which cost GetStatus more than the read.

KEYS[1] job hash   KEYS[2] the job's per-file hash

Returns {record field/value list, files field/value list} (empty lists when absent).
]]
return {redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2])}
