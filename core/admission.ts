import { createHash } from "node:crypto";
import { flatten, type JobStore } from "./job-store.js";
import {
  IdempotencyMismatchError,
  InvalidInputError,
  JobNotFoundError,
  type JobRecord,
  JobStateError,
  type JobStateName,
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
// The script is core/lua/admit.lua and its keys are spelled in core/keys.ts. It reads
// other job hashes by name (dedup, the active set), as BullMQ's scripts do: on Redis
// Cluster that holds because every key of a deployment shares QUEUE_PREFIX's hash tag.

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
  /** Initiate's priority, already checked against the owner's maximum; 0 by default. */
  priority?: number;
  callbackUrl?: string | undefined;
  /** The caller's labels (core/labels.ts), validated and sorted; part of the params. */
  labels?: Readonly<Record<string, string>> | undefined;
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

/** A stable digest of what makes two Initiate calls "the same request". */
export function paramsHash(
  fileIds: readonly number[],
  callbackUrl: string | undefined,
  labels?: Readonly<Record<string, string>>,
  priority = 0,
): string {
  // Labels and a priority join the digest only when set: older jobs keep theirs.
  const withLabels = labels !== undefined && Object.keys(labels).length > 0 ? { labels } : {};
  const withPriority = priority > 0 ? { priority } : {};
  return createHash("sha256")
    .update(
      JSON.stringify({ fileIds, callbackUrl: callbackUrl ?? "", ...withLabels, ...withPriority }),
    )
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
  ) {}

  async admit(req: AdmissionRequest, newId: string, now = Date.now()): Promise<Admitted> {
    const rec = newJobRecord(newId, req.owner, req.fileIds, now, req.callbackUrl, req.labels);
    if (req.priority !== undefined && req.priority > 0) rec.priority = req.priority;
    const fields = { ...flatten(rec), version: String(rec.version) };
    const params = paramsHash(req.fileIds, req.callbackUrl, req.labels, req.priority);
    const reply = await this.run(req, newId, params, now, [
      "create",
      ...Object.entries(fields).flat(),
    ]);
    return this.outcome(reply, req, newId, rec);
  }

  /**
   * RetryJob's admission of an existing failed or cancelled job: the same key, depth and
   * limit checks as a new job, its active slot reserved; the record is not changed here
   * (the redrive transition does it). A replay returns "replayed".
   */
  async readmit(req: AdmissionRequest, jobId: string, now = Date.now()): Promise<Admitted> {
    const params = createHash("sha256").update(`redrive ${jobId}`).digest("hex");
    const noDedup = { ...this.policy, dedupInFlight: false, reuseResults: false };
    const reply = await this.run(req, jobId, params, now, ["redrive", req.owner], noDedup);
    return this.outcome(reply, req, jobId, undefined);
  }

  private async run(
    req: AdmissionRequest,
    newId: string,
    params: string,
    now: number,
    tail: string[],
    p: AdmissionPolicy = this.policy,
  ): Promise<[number, (string | number)?]> {
    const keyDigest = req.idempotencyKey !== undefined ? digestOf(req.idempotencyKey) : "-";
    const keys = this.store.keys;
    const reply = (await this.store.scripts.djAdmit(
      keys.job(newId),
      keys.idempotency(req.owner, keyDigest),
      keys.dedup(req.owner, params),
      keys.ownerActive(req.owner),
      keys.ownerRate(req.owner),
      keys.ownerJobs(req.owner),
      keys.jobPrefix,
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
      ...tail,
    )) as [number, (string | number)?];
    return reply;
  }

  private outcome(
    [code, value]: [number, (string | number)?],
    req: AdmissionRequest,
    newId: string,
    rec: JobRecord | undefined,
  ): Admitted {
    const p = this.policy;
    switch (code) {
      case 1:
        return { outcome: "created", jobId: newId, ...(rec !== undefined ? { created: rec } : {}) };
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
      case 9:
        throw new JobStateError(
          newId,
          String(value) as JobStateName,
          `job is ${String(value).toLowerCase()}: only failed or cancelled jobs can be retried` +
            (value === "COMPLETED" ? " (Initiate the same files for a fresh ZIP)" : ""),
        );
      case 10:
        throw new JobNotFoundError(newId);
      default:
        throw new Error(`job id collision: ${newId}`);
    }
  }

  /** Frees an idempotency key whose call failed after admission (a RetryJob that lost). */
  async forgetKey(owner: string, idempotencyKey: string | undefined): Promise<void> {
    if (idempotencyKey === undefined) return;
    await this.redis.del(this.store.keys.idempotency(owner, digestOf(idempotencyKey)));
  }

  /** Undoes a creation whose queue entry could not be written, so a retry starts clean. */
  async forget(req: AdmissionRequest, jobId: string): Promise<void> {
    const params = paramsHash(req.fileIds, req.callbackUrl, req.labels, req.priority);
    const k = this.store.keys;
    const keys = [k.job(jobId), k.dedup(req.owner, params)];
    if (req.idempotencyKey !== undefined) {
      keys.push(k.idempotency(req.owner, digestOf(req.idempotencyKey)));
    }
    await this.redis.del(...keys);
    await this.redis.srem(k.ownerActive(req.owner), jobId);
    await this.redis.zrem(k.ownerJobs(req.owner), jobId);
  }
}

function digestOf(idempotencyKey: string): string {
  return createHash("sha256").update(idempotencyKey).digest("hex");
}
