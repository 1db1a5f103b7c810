import { type FileProgress, JobNotFoundError, type JobRecord, type JobStateName } from "./jobs.js";
import { expiryMember, RedisKeys } from "./keys.js";
import type { RedisClient } from "./redis.js";
import { type ScriptCommands, withScripts } from "./redis-scripts.js";

// Job records live in Redis as hashes of string fields; structured parts are JSON. This
// file reads them and knows their encoding; every write is a named transition in
// core/job-transitions.ts (one Lua script, core/lua/transition.lua), and the keys are
// spelled in core/keys.ts.

type Flat = Record<string, string>;

/** A job's identity, version, state, owner and result: what its ETag is made of. */
export type JobHead = Pick<JobRecord, "id" | "version" | "state" | "owner" | "result">;

const JSON_FIELDS = [
  "fileIds",
  "progress",
  "files",
  "result",
  "error",
  "webhook",
  "labels",
  "upload",
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

/**
 * Hash fields -> record. Accepts what HGETALL returns and what the script publishes.
 * A running job's per-file state is kept apart (keys.ts jobFiles): pass that hash's
 * fields as `files` (HGETALL's object or flat array); without them, and without a
 * `files` field in the record, `files` is left unset (see FilesFollower for messages).
 */
export function decodeJob(flat: Flat, files?: Flat | string[]): JobRecord {
  const rec: Record<string, unknown> = { ...flat };
  delete rec.filesPatch;
  for (const k of JSON_FIELDS) if (flat[k] !== undefined) rec[k] = JSON.parse(flat[k]);
  for (const k of NUMBER_FIELDS) if (flat[k] !== undefined) rec[k] = Number(flat[k]);
  if (files !== undefined) {
    const list = filesFromHash(files);
    if (list.length > 0 || rec.files === undefined) rec.files = list;
  }
  return rec as unknown as JobRecord;
}

/** The per-file hash (index -> entry JSON, in any order) as the list in file order. */
export function filesFromHash(hash: Flat | string[]): FileProgress[] {
  const pairs: [string, string][] = [];
  if (Array.isArray(hash)) {
    for (let i = 0; i + 1 < hash.length; i += 2)
      pairs.push([hash[i] as string, hash[i + 1] as string]);
  } else {
    for (const k in hash) pairs.push([k, hash[k] as string]);
  }
  const out = new Array<FileProgress>(pairs.length);
  for (const [k, v] of pairs) out[Number(k)] = JSON.parse(v) as FileProgress;
  return out;
}

/**
 * Per-file changes as the transition script takes them, by index: the indices
 * comma-separated, and the entries' JSON one a line (JSON.stringify writes no raw
 * newline). Two arguments whatever the number of files: one argument each would be a
 * call of 140,000 arguments for 70,000 files, past what a JavaScript call can take.
 */
export function filesArgs(entries: Iterable<readonly [number, FileProgress]>): [string, string] {
  const sorted = [...entries].sort((a, b) => a[0] - b[0]);
  return [sorted.map(([i]) => i).join(","), sorted.map(([, f]) => JSON.stringify(f)).join("\n")];
}

/**
 * Follows one job's records across the messages of its channel. A progress message
 * carries only the files that changed (`filesPatch`), to be applied to the files of the
 * version just before; a record read whole (`base`) or a message with every file starts
 * over. `event` returns the whole record, or undefined when the version before is not
 * known here (a lost message, none read yet): the caller then reads the record.
 */
export class FilesFollower {
  private files: FileProgress[] | undefined;
  private version = 0;

  /** A whole record (a read, or a message carrying all files): the base for what follows. */
  base(rec: JobRecord): void {
    if (rec.version < this.version || rec.files === undefined) return;
    this.files = rec.files;
    this.version = rec.version;
  }

  event(flat: Flat): JobRecord | undefined {
    const rec = decodeJob(flat);
    if (rec.files !== undefined) {
      this.base(rec);
      return rec;
    }
    if (this.files === undefined || rec.version !== this.version + 1) return undefined;
    let files = this.files;
    if (flat.filesPatch !== undefined) {
      const patch = JSON.parse(flat.filesPatch) as [number, FileProgress][];
      if (patch.length > 0) {
        // A new array: records already handed out keep the files of their own version.
        files = files.slice();
        for (const [index, f] of patch) files[index] = f;
      }
    }
    rec.files = files;
    this.files = files;
    this.version = rec.version;
    return rec;
  }
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
  /**
   * REDIS_MIN_REPLICAS_ACK for a worker: markCompleted waits until replicas hold the
   * completion (core/replica-ack.ts); unset, it answers once the primary has it.
   */
  replicaAck?: { wait(): Promise<void> } | undefined;
  /**
   * Keeps up to this many decoded records (the API's: the jobs being polled), so that a
   * read of an unchanged job costs one version check in Redis and no decoding; 0 (the
   * default) keeps none. Records handed out are shared: nobody may change them.
   */
  readCache?: number;
}

/** A record with more files than this is decoded at each read rather than kept. */
const READ_CACHE_MAX_FILES = 10_000;

export class JobStore {
  readonly prefix: string;
  readonly keys: RedisKeys;
  readonly recordTtlSeconds: number;
  readonly historyOutboxMaxEntries: number;
  /** The connection with our scripts defined on it (for core/job-transitions.ts). */
  readonly scripts: ScriptCommands;
  /** See JobStoreOptions.replicaAck. */
  readonly replicaAck: { wait(): Promise<void> } | undefined;
  private readonly readCacheSize: number;
  /** Decoded records by job id, least recently read first (see JobStoreOptions.readCache). */
  private readonly recent = new Map<string, JobRecord>();

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
    this.replicaAck = opts.replicaAck;
    this.readCacheSize = opts.readCache ?? 0;
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

  /**
   * The record with its per-file state, read together (one script: one version of both).
   * With a read cache, a record still at the version kept is not sent again.
   */
  async get(id: string): Promise<JobRecord> {
    const kept = this.readCacheSize > 0 ? this.recent.get(id) : undefined;
    const reply = (await this.scripts.djReadJob(
      this.key(id),
      this.keys.jobFiles(id),
      kept === undefined ? "" : String(kept.version),
    )) as 1 | [string[], string[]];
    if (reply === 1 && kept !== undefined) {
      this.recent.delete(id);
      this.recent.set(id, kept);
      return kept;
    }
    const [record, files] = reply as [string[], string[]];
    const flat = pairs(record);
    if (flat.state === undefined) {
      this.recent.delete(id);
      throw new JobNotFoundError(id);
    }
    const rec = decodeJob(flat, pairs(files));
    if (this.readCacheSize > 0) this.keep(rec);
    return rec;
  }

  private keep(rec: JobRecord): void {
    this.recent.delete(rec.id);
    if ((rec.files?.length ?? 0) > READ_CACHE_MAX_FILES) return;
    if (this.recent.size >= this.readCacheSize)
      this.recent.delete(this.recent.keys().next().value as string);
    this.recent.set(rec.id, rec);
  }

  /**
   * What names a job's current answer, without its files or progress: one HMGET, for a
   * conditional poll (If-None-Match) that is most often answered 304.
   */
  async head(id: string): Promise<JobHead> {
    const [version, state, owner, result] = await this.redis.hmget(
      this.key(id),
      "version",
      "state",
      "owner",
      "result",
    );
    if (state === null || state === undefined) throw new JobNotFoundError(id);
    return {
      id,
      version: Number(version),
      state: state as JobStateName,
      owner: owner ?? "",
      ...(result !== null && result !== undefined
        ? { result: JSON.parse(result) as NonNullable<JobRecord["result"]> }
        : {}),
    };
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

/** A field/value list as HGETALL sends it, as an object. */
function pairs(list: string[]): Flat {
  const flat: Flat = {};
  for (let i = 0; i + 1 < list.length; i += 2) flat[list[i] as string] = list[i + 1] as string;
  return flat;
}
