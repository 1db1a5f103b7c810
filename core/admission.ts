import { createHash } from "node:crypto";
import { flatten, type JobStore } from "./job-store.js";
import {
  IdempotencyMismatchError,
  InvalidInputError,
  type JobRecord,
  newJobRecord,
  OverloadedError,
  QuotaExceededError,
} from "./jobs.js";
import type { RedisClient } from "./redis.js";

// What Initiate decides before a job exists, in one Lua script so that concurrent
// calls cannot both pass a check and then both create: the idempotency key (AIP-155),
// dedup of an owner's identical in-flight job, reuse of a completed result, the owner's
// active-job limit and Initiate rate, and the queue's depth. Only a call that creates
// a job uses up rate tokens and a slot: a replay or a dedup hit costs nothing, so a
// client retrying a timed-out call is never punished for it.
//
// Keys (besides the job hashes of JobStore):
//   <prefix>:idem:<owner>:<sha256(key)>   "<job id> <params hash>", IDEMPOTENCY_TTL_SECONDS
//   <prefix>:dedup:<owner>:<params hash>  the newest job id for those parameters
//   <prefix>:owner:<owner>:active         ids of the owner's jobs not yet ended
//   <prefix>:owner:<owner>:rate           token bucket {tokens, ts}
// The script reads other job hashes by name (<prefix>:job:<id>), as BullMQ's scripts do:
// fine on one Redis, not on Redis Cluster.

/** How Initiate arrived at the job it returns. */
export type AdmissionOutcome = "created" | "replayed" | "in_flight" | "reused_result";

export interface AdmissionPolicy {
  idempotencyTtlSeconds: number;
  dedupInFlight: boolean;
  reuseResults: boolean;
  /** How long a file set is remembered for dedup; covers the result's whole life. */
  dedupTtlSeconds: number;
  /** Most jobs an owner may have queued or running at once; 0 = no limit. */
  maxActivePerOwner: number;
  /** Jobs an owner may create per minute (a token bucket of this size); 0 = no limit. */
  ratePerMinute: number;
}

export interface AdmissionRequest {
  owner: string;
  fileIds: number[];
  callbackUrl?: string | undefined;
  /** request_id or the Idempotency-Key header, already validated. */
  idempotencyKey?: string | undefined;
  /** True when the queue is past MAX_QUEUE_DEPTH: only replays and dedup hits pass. */
  queueFull?: boolean;
  /** Retry hint for a full queue. */
  queueFullRetryMs?: number;
}

export interface Admitted {
  outcome: AdmissionOutcome;
  jobId: string;
  /** The new record, when outcome is "created". */
  created?: JobRecord;
}

/** When an owner at the active limit is told to try again: jobs take seconds to minutes. */
export const ACTIVE_LIMIT_RETRY_MS = 5_000;
/** A result this close to deletion is not handed out again: make a fresh one instead. */
const REUSE_MARGIN_MS = 60_000;

const ADMIT_SCRIPT = `
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
`;

/** A stable digest of what makes two Initiate calls "the same request". */
export function paramsHash(fileIds: readonly number[], callbackUrl: string | undefined): string {
  return createHash("sha256")
    .update(JSON.stringify({ fileIds, callbackUrl: callbackUrl ?? "" }))
    .digest("hex");
}

const IDEMPOTENCY_KEY = /^[\x21-\x7e]{1,128}$/;

/**
 * The idempotency key of an Initiate call from request_id and/or the Idempotency-Key
 * header (either may be empty). Both set and different is a client bug worth reporting.
 */
export function parseIdempotencyKey(
  requestId: string,
  header: string | null | undefined,
): string | undefined {
  const h = header?.trim() ?? "";
  if (requestId !== "" && h !== "" && requestId !== h) {
    throw new InvalidInputError(
      "request_id and the Idempotency-Key header differ: send one key, or the same in both",
    );
  }
  const key = requestId !== "" ? requestId : h;
  if (key === "") return undefined;
  if (!IDEMPOTENCY_KEY.test(key)) {
    throw new InvalidInputError(
      "request_id / Idempotency-Key must be 1 to 128 visible ASCII characters (a UUID is recommended)",
    );
  }
  return key;
}

export class Admission {
  constructor(
    private readonly redis: RedisClient,
    private readonly store: JobStore,
    private readonly policy: AdmissionPolicy,
  ) {
    redis.defineCommand("djAdmit", { numberOfKeys: 5, lua: ADMIT_SCRIPT });
  }

  private ownerKey(owner: string, what: string): string {
    return `${this.store.prefix}:owner:${owner}:${what}`;
  }

  async admit(req: AdmissionRequest, newId: string, now = Date.now()): Promise<Admitted> {
    const p = this.policy;
    const params = paramsHash(req.fileIds, req.callbackUrl);
    const keyDigest =
      req.idempotencyKey !== undefined
        ? createHash("sha256").update(req.idempotencyKey).digest("hex")
        : "-";
    const rec = newJobRecord(newId, req.owner, req.fileIds, now, req.callbackUrl);
    const fields = { ...flatten(rec), version: String(rec.version) };
    const reply = (await (this.redis as unknown as AdmitCommand).djAdmit(
      this.store.key(newId),
      `${this.store.prefix}:idem:${req.owner}:${keyDigest}`,
      `${this.store.prefix}:dedup:${req.owner}:${params}`,
      this.ownerKey(req.owner, "active"),
      this.ownerKey(req.owner, "rate"),
      `${this.store.prefix}:job:`,
      newId,
      params,
      String(req.idempotencyKey !== undefined ? p.idempotencyTtlSeconds : 0),
      p.dedupInFlight ? "1" : "0",
      p.reuseResults ? "1" : "0",
      String(p.dedupTtlSeconds),
      String(p.maxActivePerOwner),
      String(p.ratePerMinute),
      String(now),
      String(REUSE_MARGIN_MS),
      req.queueFull === true ? "1" : "0",
      ...Object.entries(fields).flat(),
    )) as [number, (string | number)?];
    const [code, value] = reply;
    switch (code) {
      case 1:
        return { outcome: "created", jobId: newId, created: rec };
      case 2:
        return { outcome: "replayed", jobId: String(value) };
      case 3:
        return { outcome: "in_flight", jobId: String(value) };
      case 4:
        return { outcome: "reused_result", jobId: String(value) };
      case 5:
        throw new IdempotencyMismatchError(
          "this request_id / Idempotency-Key was already used with other parameters: use a new key for a new request",
        );
      case 6:
        throw new QuotaExceededError(
          `you have ${String(value)} jobs queued or running, the most allowed at once: wait for one to end`,
          ACTIVE_LIMIT_RETRY_MS,
        );
      case 7:
        throw new QuotaExceededError(
          `more than ${p.ratePerMinute} jobs a minute: slow down`,
          Math.max(1, Number(value)),
        );
      case 8:
        throw new OverloadedError(
          "the service is at capacity: retry later",
          req.queueFullRetryMs ?? 10_000,
        );
      default:
        throw new Error(`job id collision: ${newId}`);
    }
  }

  /** Undoes a creation whose queue entry could not be written, so a retry starts clean. */
  async forget(req: AdmissionRequest, jobId: string): Promise<void> {
    const params = paramsHash(req.fileIds, req.callbackUrl);
    const keys = [this.store.key(jobId), `${this.store.prefix}:dedup:${req.owner}:${params}`];
    if (req.idempotencyKey !== undefined) {
      keys.push(
        `${this.store.prefix}:idem:${req.owner}:${createHash("sha256").update(req.idempotencyKey).digest("hex")}`,
      );
    }
    await this.redis.del(...keys);
    await this.redis.srem(this.ownerKey(req.owner, "active"), jobId);
  }
}

interface AdmitCommand {
  djAdmit(...args: string[]): Promise<unknown>;
}
