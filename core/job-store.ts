import { JobNotFoundError, type JobRecord, type JobStateName } from "./jobs.js";
import { expiryMember, RedisKeys } from "./keys.js";
import type { RedisClient } from "./redis.js";
import { type ScriptCommands, withScripts } from "./redis-scripts.js";

// Job records live in Redis as hashes of string fields; structured parts are JSON. This
// file reads them and knows their encoding; every write is a named transition in
// core/job-transitions.ts (one Lua script, core/lua/transition.lua), and the keys are
// spelled in core/keys.ts.

type Flat = Record<string, string>;

const JSON_FIELDS = [
  "fileIds",
  "progress",
  "files",
  "result",
  "error",
  "webhook",
  "labels",
] as const;
const NUMBER_FIELDS = [
  "version",
  "attempts",
  "createdAt",
  "updatedAt",
  "startedAt",
  "endedAt",
  "priority",
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

/** About 1 GB of Redis at the usual ~1 KB a change (see HISTORY_OUTBOX_MAX_ENTRIES). */
export const DEFAULT_HISTORY_OUTBOX_MAX_ENTRIES = 1_000_000;

export interface JobStoreOptions {
  /** Key prefix shared by every process of one deployment (QUEUE_PREFIX). */
  prefix: string;
  /** How long a finished job's record is kept, in seconds. */
  recordTtlSeconds: number;
  /**
   * The history outbox's approximate length cap (HISTORY_OUTBOX_MAX_ENTRIES): past it the
   * oldest unwritten changes are dropped rather than Redis filling up.
   */
  historyOutboxMaxEntries?: number;
}

export class JobStore {
  readonly prefix: string;
  readonly keys: RedisKeys;
  readonly recordTtlSeconds: number;
  readonly historyOutboxMaxEntries: number;
  /** The connection with our scripts defined on it (for core/job-transitions.ts). */
  readonly scripts: ScriptCommands;

  constructor(
    readonly redis: RedisClient,
    opts: JobStoreOptions,
  ) {
    this.prefix = opts.prefix;
    this.keys = new RedisKeys(opts.prefix);
    this.recordTtlSeconds = opts.recordTtlSeconds;
    this.historyOutboxMaxEntries =
      opts.historyOutboxMaxEntries ?? DEFAULT_HISTORY_OUTBOX_MAX_ENTRIES;
    this.scripts = withScripts(redis);
  }

  key(id: string): string {
    return this.keys.job(id);
  }

  /** The pub/sub channel on which every change of the job is published. */
  channel(id: string): string {
    return this.keys.channel(id);
  }

  /** Job ids whose terminal-state webhook is owed, scored by when it became due. */
  get webhookOutboxKey(): string {
    return this.keys.webhookOutbox;
  }

  /** Result objects by the time they are to be deleted (retention). */
  get resultExpiryKey(): string {
    return this.keys.resultExpiry;
  }

  /** The channel on which API processes ask workers to stop a running job. */
  get cancelChannel(): string {
    return this.keys.cancelChannel;
  }

  /** Removes a job's callback from the outbox once its delivery is settled. */
  async settleWebhook(id: string): Promise<void> {
    await this.redis.zrem(this.webhookOutboxKey, id);
  }

  /** Members of the expiry set (see keys.ts expiryMember) due at `now`, oldest first. */
  async dueResultExpiries(now: number, limit: number): Promise<string[]> {
    return this.redis.zrangebyscore(this.resultExpiryKey, "-inf", now, "LIMIT", 0, limit);
  }

  /**
   * Registers an object for deletion at `at` (ms) without a record write: a run's own
   * upload that lost to a cancel or another run, should it land after the run deleted it.
   */
  async scheduleResultDeletion(jobId: string, objectKey: string, at: number): Promise<void> {
    await this.redis.zadd(this.resultExpiryKey, at, expiryMember(jobId, objectKey));
  }

  async forgetResultExpiry(member: string): Promise<void> {
    await this.redis.zrem(this.resultExpiryKey, member);
  }

  async get(id: string): Promise<JobRecord> {
    const flat = await this.redis.hgetall(this.key(id));
    if (flat.state === undefined) throw new JobNotFoundError(id);
    return decodeJob(flat);
  }

  /** The job's state and the token of the attempt that owns it (a cheap read for workers). */
  async ownership(id: string): Promise<{ state?: JobStateName; lease?: string }> {
    const [state, lease] = await this.redis.hmget(this.key(id), "state", "lease");
    return {
      ...(state !== null && state !== undefined ? { state: state as JobStateName } : {}),
      ...(lease !== null && lease !== undefined ? { lease } : {}),
    };
  }
}
