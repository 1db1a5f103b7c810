import { QUEUE_NAME } from "./queue.js";

// Every Redis key and channel of one deployment, in one place. They all start with
// QUEUE_PREFIX, which carries a hash tag on Redis Cluster ({dj}): so every key one Lua
// script touches (a job's hash, the outbox, the expiry set, BullMQ's lock of the job)
// shares one hash slot, as BullMQ's own keys do.

export class RedisKeys {
  constructor(readonly prefix: string) {}

  /** The job record: a hash of string fields (core/job-store.ts). */
  job(id: string): string {
    return `${this.prefix}:job:${id}`;
  }

  /**
   * A job's per-file state while it runs: a hash of file index -> FileProgress JSON,
   * written a few entries at a time by the transitions that change them (the record
   * itself then holds no `files`), expired and deleted with the record. Outside
   * `jobPrefix` on purpose: admission reads job hashes by that prefix.
   */
  jobFiles(id: string): string {
    return `${this.jobFilesPrefix}${id}`;
  }

  /** What jobFiles(id) starts with (the list script reads them by it). */
  get jobFilesPrefix(): string {
    return `${this.prefix}:job-files:`;
  }

  /** What job(id) starts with: admission reads other jobs' hashes by it. */
  get jobPrefix(): string {
    return `${this.prefix}:job:`;
  }

  /** The pub/sub channel on which every change of the job is published. */
  channel(id: string): string {
    return `${this.prefix}:job:${id}:events`;
  }

  /** Job ids whose terminal-state webhook is owed, scored by when it became due. */
  get webhookOutbox(): string {
    return `${this.prefix}:webhooks:outbox`;
  }

  /** Fair turns of webhook deliveries across owners (core/lua/fair-enqueue.lua). */
  get webhookFair(): string {
    return `${this.prefix}:fair:webhooks`;
  }

  /** An owner's webhook deliveries in flight: BullMQ job id -> lease end (ms). */
  webhookInFlight(owner: string): string {
    return `${this.prefix}:webhooks:owner:${owner}:inflight`;
  }

  /** An owner's deliveries waiting for one of its slots: BullMQ job id -> since (ms). */
  webhookParked(owner: string): string {
    return `${this.prefix}:webhooks:owner:${owner}:parked`;
  }

  /** Result objects by the time they are to be deleted (retention); see expiryMember. */
  get resultExpiry(): string {
    return `${this.prefix}:results:expiry`;
  }

  /**
   * The history outbox: a stream of job changes, appended to by the transition that makes
   * each one, read by the history writer's consumer group (worker/history-writer.ts).
   */
  get historyOutbox(): string {
    return `${this.prefix}:history:outbox`;
  }

  /** The channel on which API processes ask workers to stop a running job. */
  get cancelChannel(): string {
    return `${this.prefix}:cancel`;
  }

  /**
   * BullMQ's lock of a bundle job (its value is the lock token of the attempt that holds
   * it). Spelled here because the claim script checks it: BullMQ keeps a job's keys at
   * `<prefix>:<queue>:<job id>`, and our job ids are BullMQ's.
   */
  bundleLock(id: string): string {
    return `${this.prefix}:${QUEUE_NAME}:${id}:lock`;
  }

  /** BullMQ's list or set of bundle jobs in one state ("wait", "active", "prioritized"). */
  bundleJobs(state: "wait" | "active" | "prioritized" | "paused"): string {
    return `${this.prefix}:${QUEUE_NAME}:${state}`;
  }

  /** The measurements the queue forecast is fitted to (core/forecast.ts). */
  get runStats(): string {
    return `${this.prefix}:stats:runs`;
  }

  /** Source file sizes seen by the workers, by file id (core/forecast.ts). */
  get fileSizes(): string {
    return `${this.prefix}:stats:file-sizes`;
  }

  /** Initiate's idempotency key of an owner: "<job id> <params hash>". */
  idempotency(owner: string, keyDigest: string): string {
    return `${this.prefix}:idem:${owner}:${keyDigest}`;
  }

  /** The newest job id of an owner for one set of parameters (dedup, result reuse). */
  dedup(owner: string, paramsHash: string): string {
    return `${this.prefix}:dedup:${owner}:${paramsHash}`;
  }

  /** Ids of an owner's jobs not yet ended. */
  ownerActive(owner: string): string {
    return `${this.prefix}:owner:${owner}:active`;
  }

  /**
   * An owner's jobs by creation time (ms): ListJobs pages through it. Initiate adds to it
   * in the step that creates the record, DeleteJob removes from it in the step that
   * deletes the record; members whose record has expired are dropped as they are met.
   */
  ownerJobs(owner: string): string {
    return `${this.prefix}:owner:${owner}:jobs`;
  }

  /** The deployment's random key for ListJobs page tokens, made by the first API to need it. */
  get listPageSecret(): string {
    return `${this.prefix}:list:page-secret`;
  }

  /**
   * Fair scheduling's state of one priority level: V, the highest round handed out, and
   * each owner's tag (core/lua/fair-enqueue.lua).
   */
  fairLevel(priority: number): string {
    return `${this.prefix}:fair:${priority}`;
  }

  /** An owner's Initiate token bucket {tokens, ts}. */
  ownerRate(owner: string): string {
    return `${this.prefix}:owner:${owner}:rate`;
  }
}

/**
 * A member of the result expiry set: the job and the object, since a job can have an
 * object per attempt and each must go. Members written before per-attempt objects are
 * a bare job id.
 */
export function expiryMember(jobId: string, objectKey: string): string {
  return `${jobId} ${objectKey}`;
}

export function parseExpiryMember(member: string): { jobId: string; objectKey?: string } {
  const space = member.indexOf(" ");
  if (space < 0) return { jobId: member };
  return { jobId: member.slice(0, space), objectKey: member.slice(space + 1) };
}
