import type { Queue } from "bullmq";
import {
  Admission,
  type AdmissionOutcome,
  type AdmissionPolicy,
  parseIdempotencyKey,
} from "./admission.js";
import { MAX_JOB_PRIORITY, type OwnerSettings } from "./config.js";
import { JobIndex, type JobListPage, type JobListQuery } from "./job-index.js";
import type { JobHead, JobStore } from "./job-store.js";
import { deleteJob, markCancelled, markRequeued } from "./job-transitions.js";
import {
  InvalidInputError,
  isTerminal,
  JobBusyError,
  JobNotFoundError,
  type JobRecord,
  JobStateError,
  newJobId,
  PermissionDeniedError,
  parseFileIds,
  parseJobId,
} from "./jobs.js";
import { parseLabels } from "./labels.js";
import { type BundleJobData, BundleScheduler, type SchedulerOptions } from "./queue.js";
import type { RedisClient } from "./redis.js";
import { currentTraceparent } from "./tracing.js";

// The domain operations behind the RPCs. Handlers parse nothing and know no Redis:
// they call these and map the domain errors to Connect codes. Every operation acts for
// an owner, and another owner's job is reported exactly like a job that does not exist.

export interface JobServiceDeps {
  store: JobStore;
  queue: Queue<BundleJobData>;
  /** Command connection used to publish cancel requests to workers. */
  redis: RedisClient;
  maxFilesPerJob: number;
  /** Idempotency, dedup and per-owner limits; the defaults apply none of the limits. */
  policy?: Partial<AdmissionPolicy>;
  /** Jobs waiting in the queue past which Initiate answers "come back later"; 0 = no limit. */
  maxQueueDepth?: number;
  /**
   * Checks a callback_url (scheme, resolved addresses) and returns it normalized;
   * undefined when webhooks are not configured, so callback_url is refused.
   */
  checkCallbackUrl?: ((url: string) => Promise<string>) | undefined;
  /** Deletes a result object (S3) for DeleteJob; unset: retention deletes it in its time. */
  deleteResult?: ((key: string) => Promise<void>) | undefined;
  /** REDIS_MIN_REPLICAS_ACK: a new job is acknowledged only once replicas hold it. */
  replicaAck?: { wait(): Promise<void> } | undefined;
  /** Each owner's priority ceiling and weight; default: ceiling 0, weight 1. */
  ownerSettings?: ((owner: string) => OwnerSettings) | undefined;
  /** FAIR_SCHEDULING and friends; default: owners take turns. */
  scheduling?: SchedulerOptions;
}

export interface InitiateInput {
  fileIds: readonly number[];
  /** InitiateRequest.request_id ("" when absent). */
  requestId?: string;
  /** The Idempotency-Key header, if any. */
  idempotencyKey?: string | null | undefined;
  /** InitiateRequest.callback_url ("" when absent). */
  callbackUrl?: string;
  /** InitiateRequest.labels (validated here). */
  labels?: Readonly<Record<string, string>>;
  /** InitiateRequest.priority (0 when absent). */
  priority?: number;
}

export interface RetryInput {
  /** RetryJobRequest.request_id ("" when absent). */
  requestId?: string;
  /** The Idempotency-Key header, if any. */
  idempotencyKey?: string | null | undefined;
}

export interface Retried {
  job: JobRecord;
  /** The idempotency key was seen before: this call queued nothing. */
  replayed: boolean;
}

export interface Initiated {
  job: JobRecord;
  outcome: AdmissionOutcome;
}

const DEFAULT_POLICY: AdmissionPolicy = {
  idempotencyTtlSeconds: 24 * 3600,
  dedupInFlight: true,
  reuseResults: true,
  dedupTtlSeconds: 2 * 24 * 3600,
  maxActivePerOwner: 0,
  ratePerMinute: 0,
};

const DEFAULT_OWNER: OwnerSettings = { maxPriority: 0, weight: 1 };

/** How long a queue depth reading is trusted; a soft limit needs no exact count. */
const DEPTH_CACHE_MS = 250;
/** The retry hint of a full queue: long enough for workers to make headway. */
const QUEUE_FULL_RETRY_MS = 10_000;
/** A cancelled run lets go of its job within a lock check or two (JOB_LOCK_MS / 2). */
const STOPPING_RETRY_MS = 1_000;

export class JobService {
  private readonly admission: Admission;
  private readonly index: JobIndex;
  private depth: { at: number; value: Promise<number> } | undefined;
  private readonly scheduler: BundleScheduler;
  private readonly settingsOf: (owner: string) => OwnerSettings;

  constructor(private readonly deps: JobServiceDeps) {
    this.admission = new Admission(deps.redis, deps.store, { ...DEFAULT_POLICY, ...deps.policy });
    this.index = new JobIndex(deps.store);
    this.scheduler = new BundleScheduler(
      deps.queue,
      deps.store.scripts,
      deps.store.keys,
      deps.scheduling ?? { fair: true },
    );
    this.settingsOf = deps.ownerSettings ?? (() => DEFAULT_OWNER);
  }

  get store(): JobStore {
    return this.deps.store;
  }

  async initiate(owner: string, input: InitiateInput): Promise<Initiated> {
    const fileIds = parseFileIds(input.fileIds, this.deps.maxFilesPerJob);
    const idempotencyKey = parseIdempotencyKey(input.requestId ?? "", input.idempotencyKey);
    const labels = parseLabels(input.labels ?? {});
    const priority = this.checkPriority(owner, input.priority ?? 0);
    let callbackUrl: string | undefined;
    if (input.callbackUrl !== undefined && input.callbackUrl !== "") {
      if (this.deps.checkCallbackUrl === undefined) {
        throw new InvalidInputError(
          "callback_url is not accepted: this server has no webhook secret configured",
        );
      }
      callbackUrl = await this.deps.checkCallbackUrl(input.callbackUrl);
    }
    const req = {
      owner,
      fileIds,
      priority,
      callbackUrl,
      labels,
      idempotencyKey,
      queueFull: await this.queueFull(),
      queueFullRetryMs: QUEUE_FULL_RETRY_MS,
    };
    const admitted = await this.admission.admit(req, newJobId());
    if (admitted.created !== undefined) {
      try {
        await this.enqueue(admitted.created);
      } catch (err) {
        // Without its queue entry the job would wait forever: undo it, so that the
        // caller's retry (it got an error) starts clean.
        await this.admission.forget(req, admitted.jobId).catch(() => undefined);
        throw err;
      }
      await this.deps.replicaAck?.wait();
      return { job: admitted.created, outcome: admitted.outcome };
    }
    const job = await this.deps.store.get(admitted.jobId);
    // An earlier Initiate may have stored the job and then lost its queue entry to a
    // Redis failure; adding it again is a no-op when it is there (same BullMQ id).
    if (job.state === "QUEUED") await this.enqueue(job);
    return { job, outcome: admitted.outcome };
  }

  /** The job if it exists and belongs to `owner`; JobNotFoundError otherwise. */
  /** The owner's job's head (job-store.ts head): NOT_FOUND as get. */
  async head(owner: string, rawJobId: string): Promise<JobHead> {
    const id = parseJobId(rawJobId);
    const head = await this.deps.store.head(id);
    if (head.owner !== owner) throw new JobNotFoundError(id);
    return head;
  }

  async get(owner: string, rawJobId: string): Promise<JobRecord> {
    const id = parseJobId(rawJobId);
    const rec = await this.deps.store.get(id);
    if (rec.owner !== owner) throw new JobNotFoundError(id);
    return rec;
  }

  /**
   * Queued or running -> CANCELLED at once. A queued job is removed from the queue (and a
   * worker that races to it sees the state and skips it); a running one is told to stop
   * through Redis, whichever process runs it. Idempotent on a cancelled job.
   */
  async cancel(owner: string, rawJobId: string): Promise<JobRecord> {
    const id = (await this.get(owner, rawJobId)).id;
    let rec: JobRecord;
    try {
      rec = await markCancelled(this.deps.store, id, owner);
    } catch (err) {
      if (err instanceof JobStateError && err.state === "CANCELLED") return this.deps.store.get(id);
      if (err instanceof JobStateError) {
        throw new JobStateError(
          id,
          err.state,
          `job is already ${err.state.toLowerCase()}: only queued or running jobs can be cancelled`,
        );
      }
      throw err;
    }
    await this.deps.redis.publish(this.deps.store.cancelChannel, id);
    // Removing a waiting job frees its slot; on an active job this is a no-op (the worker
    // handles that case through the cancel message and the state check).
    await this.deps.queue.remove(id).catch(() => 0);
    return rec;
  }

  /** A page of the owner's live jobs, newest first (core/job-index.ts). */
  list(owner: string, query: JobListQuery): Promise<JobListPage> {
    return this.index.list(owner, query);
  }

  /**
   * Forgets a finished job: its ZIP is deleted first (so a failure leaves the job as it
   * was, and the call can be retried), then the record and every pointer to it in one
   * step. Queued or running: JobStateError (cancel first).
   */
  async delete(owner: string, rawJobId: string): Promise<void> {
    const rec = await this.get(owner, rawJobId);
    if (!isTerminal(rec.state)) {
      throw new JobStateError(
        rec.id,
        rec.state,
        `job is ${rec.state.toLowerCase()}: only finished jobs can be deleted, cancel it first`,
      );
    }
    const resultKey =
      rec.state === "COMPLETED" && rec.result !== undefined && rec.result.expired !== true
        ? rec.result.key
        : undefined;
    const deleteResult = this.deps.deleteResult;
    if (resultKey !== undefined && deleteResult !== undefined) await deleteResult(resultKey);
    // Without deleteResult the retention entry stays, and retention deletes the object.
    await deleteJob(this.deps.store, rec, deleteResult !== undefined ? resultKey : undefined);
    // BullMQ's own entry of the finished job (kept for a while for the dashboard).
    await this.deps.queue.remove(rec.id).catch(() => 0);
  }

  /**
   * RetryJob: a failed or cancelled job runs again under its id. Admitted like a new job
   * (idempotency key, queue depth, the owner's limits), then FAILED/CANCELLED -> QUEUED
   * and a fresh queue entry (BullMQ ignores an id it still holds, so the old one goes).
   */
  async retry(owner: string, rawJobId: string, input: RetryInput): Promise<Retried> {
    const rec = await this.get(owner, rawJobId);
    const idempotencyKey = parseIdempotencyKey(input.requestId ?? "", input.idempotencyKey);
    const id = rec.id;
    if (rec.state === "FAILED" || rec.state === "CANCELLED") {
      // A cancelled run may still be unwinding in its worker; BullMQ cannot take the id
      // back until it has.
      if ((await this.deps.queue.getJobState(id)) === "active") {
        throw new JobBusyError(
          "the job's last run is still stopping: retry in a second",
          STOPPING_RETRY_MS,
        );
      }
    }
    const req = {
      owner,
      fileIds: rec.fileIds,
      callbackUrl: rec.callbackUrl,
      labels: rec.labels,
      idempotencyKey,
      queueFull: await this.queueFull(),
      queueFullRetryMs: QUEUE_FULL_RETRY_MS,
    };
    const admitted = await this.admission.readmit(req, id);
    if (admitted.outcome === "replayed") {
      const job = await this.deps.store.get(id);
      // As in initiate(): a queue entry lost to a Redis failure is written again.
      if (job.state === "QUEUED") await this.enqueue(job);
      return { job, replayed: true };
    }
    let job: JobRecord;
    try {
      await this.deps.queue.remove(id);
      job = await markRequeued(this.deps.store, id);
    } catch (err) {
      // Nothing was queued: the key must not replay a redrive that did not happen.
      await this.admission.forgetKey(owner, idempotencyKey).catch(() => undefined);
      if (err instanceof JobStateError) {
        throw new JobStateError(
          id,
          err.state,
          `job is ${err.state.toLowerCase()}: only failed or cancelled jobs can be retried`,
        );
      }
      throw err;
    }
    await this.enqueue(job);
    await this.deps.replicaAck?.wait();
    return { job, replayed: false };
  }

  /** The Initiate priority if the owner may use it; says what is allowed otherwise. */
  private checkPriority(owner: string, priority: number): number {
    if (!Number.isInteger(priority) || priority < 0 || priority > MAX_JOB_PRIORITY) {
      throw new InvalidInputError(
        `priority is ${priority}: use 0 (the default) to ${MAX_JOB_PRIORITY} (the most urgent)`,
      );
    }
    const max = this.settingsOf(owner).maxPriority;
    if (priority > max) {
      throw new PermissionDeniedError(
        `priority ${priority} is above what you may use: your maximum is ${max}` +
          (max === 0 ? " (ask the operator to raise it)" : ""),
      );
    }
    return priority;
  }

  private async enqueue(rec: JobRecord): Promise<void> {
    // The worker continues the caller's trace, and logs the owner, from the job's data.
    const traceparent = currentTraceparent();
    const data = {
      jobId: rec.id,
      fileIds: rec.fileIds,
      owner: rec.owner,
      ...(traceparent !== undefined ? { traceparent } : {}),
    };
    await this.scheduler.add(data, {
      priority: rec.priority ?? 0,
      owner: rec.owner,
      weight: this.settingsOf(rec.owner).weight,
    });
  }

  private async queueFull(): Promise<boolean> {
    const max = this.deps.maxQueueDepth ?? 0;
    if (max <= 0) return false;
    const now = Date.now();
    if (this.depth === undefined || now - this.depth.at > DEPTH_CACHE_MS) {
      const value = this.deps.queue.getJobCountByTypes("waiting", "prioritized");
      // A failed reading is not cached: the next call asks again.
      value.catch(() => {
        if (this.depth?.value === value) this.depth = undefined;
      });
      this.depth = { at: now, value };
    }
    return (await this.depth.value) >= max;
  }
}
