import {
  isTerminal,
  JobNotFoundError,
  type JobRecord,
  JobStateError,
  type JobStateName,
  newJobRecord,
} from "./jobs.js";
import type { RedisClient } from "./redis.js";

// Job records live in Redis as hashes of string fields; structured parts are JSON.
// Every change goes through one Lua script that checks the state precondition, bumps
// `version`, writes, and publishes the whole record on the job's channel, atomically.
// So a watcher's versions are gap-free in order, and a terminal state can never be
// overwritten by a late progress write from a worker.

type Flat = Record<string, string>;

const JSON_FIELDS = ["fileIds", "progress", "files", "result", "error", "webhook"] as const;
const NUMBER_FIELDS = [
  "version",
  "attempts",
  "createdAt",
  "updatedAt",
  "startedAt",
  "endedAt",
] as const;

/** Record -> hash fields (JSON for structured parts). `version` is owned by the script. */
export function flatten(patch: Partial<JobRecord>): Flat {
  const out: Flat = {};
  for (const [k, v] of Object.entries(patch)) {
    if (v === undefined || k === "version") continue;
    out[k] = (JSON_FIELDS as readonly string[]).includes(k) ? JSON.stringify(v) : String(v);
  }
  return out;
}

/** Hash fields -> record. Accepts what HGETALL returns and what the script publishes. */
export function decodeJob(flat: Flat): JobRecord {
  const rec: Record<string, unknown> = { ...flat };
  for (const k of JSON_FIELDS) if (flat[k] !== undefined) rec[k] = JSON.parse(flat[k]);
  for (const k of NUMBER_FIELDS) if (flat[k] !== undefined) rec[k] = Number(flat[k]);
  return rec as unknown as JobRecord;
}

// KEYS[1] job hash, KEYS[2] the webhook outbox (a sorted set of job ids by due time,
// which the worker drains), KEYS[3] the result expiry set (retention's sorted set of job
// ids by when their result is to be deleted). ARGV[1] channel, ARGV[2] comma-separated
// allowed states ("" = any), ARGV[3] attempts increment, ARGV[4] TTL seconds applied
// when the new state is terminal, ARGV[5] "1" if the new state is terminal, ARGV[6] when
// the job's result is to be deleted ("" = no change), ARGV[7] how many of the
// field/value pairs that follow are set only where the field is absent (they come
// first), ARGV[8..] the field/value pairs.
// Returns {1, json} on success, {0} when the job does not exist, {2, state} when the
// job's state is not one of the allowed ones.
const UPDATE_SCRIPT = `
-- The result is registered for deletion whatever the state check below says: an upload
-- that a cancel overtook is still an object that retention must remove.
if ARGV[6] ~= '' then redis.call('ZADD', KEYS[3], ARGV[6], string.match(KEYS[1], '[^:]+$')) end
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {0} end
if ARGV[2] ~= '' then
  local ok = false
  for s in string.gmatch(ARGV[2], '[^,]+') do
    if s == state then ok = true end
  end
  if not ok then return {2, state} end
end
local at = 8
for _ = 1, tonumber(ARGV[7]) do
  redis.call('HSETNX', KEYS[1], ARGV[at], ARGV[at + 1])
  at = at + 2
end
if #ARGV >= at then redis.call('HSET', KEYS[1], unpack(ARGV, at)) end
redis.call('HINCRBY', KEYS[1], 'version', 1)
if tonumber(ARGV[3]) > 0 then redis.call('HINCRBY', KEYS[1], 'attempts', ARGV[3]) end
if ARGV[5] == '1' and tonumber(ARGV[4]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[4]) end
-- The callback is owed from the moment the job ends, in the same step: a crash right
-- after this script cannot lose it.
if ARGV[5] == '1' and redis.call('HEXISTS', KEYS[1], 'callbackUrl') == 1 then
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[2], t[1] * 1000 + math.floor(t[2] / 1000), string.match(KEYS[1], '[^:]+$'))
end
local flat = redis.call('HGETALL', KEYS[1])
local obj = {}
for i = 1, #flat, 2 do obj[flat[i]] = flat[i + 1] end
local json = cjson.encode(obj)
redis.call('PUBLISH', ARGV[1], json)
return {1, json}
`;

export interface UpdateOptions {
  /** The update applies only if the job is in one of these states. */
  from?: readonly JobStateName[];
  /** Adds to `attempts` (a worker starting a run). */
  addAttempts?: number;
  /** Fields written only where the record has none yet (the first start of a job). */
  ifAbsent?: Partial<JobRecord>;
  /**
   * Registers the job's result for deletion at this time (ms), in the same step and
   * before the state check: the result is never announced unregistered, and an upload
   * that lost to a cancel is registered all the same.
   */
  expireResultAt?: number;
}

export interface JobStoreOptions {
  /** Key prefix shared by every process of one deployment (QUEUE_PREFIX). */
  prefix: string;
  /** How long a finished job's record is kept, in seconds. */
  recordTtlSeconds: number;
}

export class JobStore {
  readonly prefix: string;
  private readonly ttl: number;

  constructor(
    private readonly redis: RedisClient,
    opts: JobStoreOptions,
  ) {
    this.prefix = opts.prefix;
    this.ttl = opts.recordTtlSeconds;
    redis.defineCommand("djUpdateJob", { numberOfKeys: 3, lua: UPDATE_SCRIPT });
  }

  key(id: string): string {
    return `${this.prefix}:job:${id}`;
  }

  /** The pub/sub channel on which every change of the job is published. */
  channel(id: string): string {
    return `${this.prefix}:job:${id}:events`;
  }

  /** Job ids whose terminal-state webhook is owed, scored by when it became due. */
  get webhookOutboxKey(): string {
    return `${this.prefix}:webhooks:outbox`;
  }

  /** Completed jobs by the time their result object is to be deleted (retention). */
  get resultExpiryKey(): string {
    return `${this.prefix}:results:expiry`;
  }

  /** Removes a job's callback from the outbox once its delivery is settled. */
  async settleWebhook(id: string): Promise<void> {
    await this.redis.zrem(this.webhookOutboxKey, id);
  }

  /** Job ids whose result is due for deletion at `now`, oldest first. */
  async dueResultExpiries(now: number, limit: number): Promise<string[]> {
    return this.redis.zrangebyscore(this.resultExpiryKey, "-inf", now, "LIMIT", 0, limit);
  }

  async forgetResultExpiry(id: string): Promise<void> {
    await this.redis.zrem(this.resultExpiryKey, id);
  }

  /** The channel on which API processes ask workers to stop a running job. */
  get cancelChannel(): string {
    return `${this.prefix}:cancel`;
  }

  /** Stores a new QUEUED job (tests and tools; Initiate goes through core/admission.ts). */
  async create(id: string, fileIds: number[], owner: string, now = Date.now()): Promise<JobRecord> {
    const rec = newJobRecord(id, owner, fileIds, now);
    const created = await this.redis.hsetnx(this.key(id), "id", id);
    if (created === 0) throw new Error(`job id collision: ${id}`);
    await this.redis.hset(this.key(id), { ...flatten(rec), version: String(rec.version) });
    return rec;
  }

  async get(id: string): Promise<JobRecord> {
    const flat = await this.redis.hgetall(this.key(id));
    if (flat.state === undefined) throw new JobNotFoundError(id);
    return decodeJob(flat);
  }

  /**
   * Applies `patch` atomically if the job is in an allowed state, bumps the version and
   * publishes the new record. Throws JobNotFoundError or JobStateError.
   */
  async update(
    id: string,
    patch: Partial<JobRecord>,
    opts: UpdateOptions = {},
  ): Promise<JobRecord> {
    return decodeJob(JSON.parse(await this.apply(id, patch, opts)) as Flat);
  }

  /** update() for a writer that does not need the new record back (progress, the result). */
  async write(id: string, patch: Partial<JobRecord>, opts: UpdateOptions = {}): Promise<void> {
    await this.apply(id, patch, opts);
  }

  /** Runs the update script; resolves to the new record's JSON. */
  private async apply(id: string, patch: Partial<JobRecord>, opts: UpdateOptions): Promise<string> {
    const fields = flatten({ ...patch, updatedAt: patch.updatedAt ?? Date.now() });
    const keep = Object.entries(flatten(opts.ifAbsent ?? {}));
    const terminal = patch.state !== undefined && isTerminal(patch.state);
    const args = [
      this.channel(id),
      (opts.from ?? []).join(","),
      String(opts.addAttempts ?? 0),
      String(this.ttl),
      terminal ? "1" : "0",
      opts.expireResultAt !== undefined ? String(opts.expireResultAt) : "",
      String(keep.length),
      ...keep.flat(),
      ...Object.entries(fields).flat(),
    ];
    const reply = (await (this.redis as unknown as UpdateCommand).djUpdateJob(
      this.key(id),
      this.webhookOutboxKey,
      this.resultExpiryKey,
      ...args,
    )) as [number, string?];
    if (reply[0] === 0) throw new JobNotFoundError(id);
    if (reply[0] === 2) {
      const state = reply[1] as JobStateName;
      throw new JobStateError(id, state, `job ${id} is ${state.toLowerCase()}`);
    }
    return reply[1] as string;
  }
}

interface UpdateCommand {
  djUpdateJob(key: string, outbox: string, expiry: string, ...args: string[]): Promise<unknown>;
}
