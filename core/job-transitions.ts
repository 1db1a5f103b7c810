import { paramsHash } from "./admission.js";
import { decodeJob, filesArgs, flatten, type JobStore } from "./job-store.js";
import {
  FencedError,
  type FileProgress,
  isTerminal,
  type JobErrorRecord,
  JobNotFoundError,
  type JobProgress,
  type JobRecord,
  type JobResultRecord,
  JobStateError,
  type JobStateName,
  newJobRecord,
  TERMINAL_STATES,
  type UploadState,
  type WebhookRecord,
} from "./jobs.js";
import { expiryMember } from "./keys.js";

// The job's state machine: one function per change, each with its allowed source states,
// each one atomic step in Redis (core/lua/transition.lua). These are the only writers of
// a job record; Initiate's creation of one is admission's script (core/admission.ts).
//
//   QUEUED ──markProcessing──> PROCESSING ──markCompleted──> COMPLETED ──markExpired
//     │   (a retry or a stall:      │ recordProgress             (result deleted)
//     │    PROCESSING again)        ├──markFailed──> FAILED
//     └──────markCancelled──────────┴──markCancelled──> CANCELLED
//   terminal states: recordWebhook; FAILED or CANCELLED ──markRequeued──> QUEUED (RetryJob);
//   any of them ──deleteJob──> gone (DeleteJob)
//
// Fencing. A run (one BullMQ attempt) claims the job when it starts: the claim checks
// that the run holds BullMQ's lock, stores the run's token in the record (`lease`) and
// counts the attempt. Every later write of the run holds the lease: it applies only if
// the record still names this run. BullMQ does not stop a run that lost its lock (a
// blocked event loop, a partition, a failover): stall detection hands the job to another
// run whose claim takes the lease, and the first run's next write fails with FencedError.
// The check is inside the same script as the write: no extra round trip.

/** One run of a job, as the worker knows it. */
export interface Attempt {
  jobId: string;
  /** BullMQ's lock token of this run: unique per run, the fencing token. */
  token: string;
  /**
   * Whether the claim checks that BullMQ's lock holds the token. False only where no
   * BullMQ worker runs the job (tests that drive a job by hand, tools).
   */
  checkLock: boolean;
}

interface Change {
  from: readonly JobStateName[];
  /** `files` here replaces every file's state (kept apart from the record: keys.ts jobFiles). */
  set: Partial<JobRecord>;
  /** Only these files changed (by index): the few entries a progress tick writes. */
  filesPatch?: Iterable<readonly [number, FileProgress]>;
  /** The reply carries the per-file state too (for transitions that return the record). */
  withFiles?: boolean;
  fence?: { kind: "claim" | "hold"; attempt: Attempt };
  ifAbsent?: Partial<JobRecord>;
  /** An uploaded object to register for deletion, whatever the checks say. */
  expire?: { jobId: string; key: string; at: number };
  /** The record must name this result object. */
  resultKey?: string;
  /** Fields removed from the record. */
  clear?: readonly (keyof JobRecord)[];
}

/** Runs one change; resolves to the new record (JSON) and, if asked, its per-file hash. */
async function apply(
  store: JobStore,
  id: string,
  change: Change,
): Promise<{ json: string; files?: string[] }> {
  const { files, ...set } = change.set;
  const fields = flatten({ ...set, updatedAt: set.updatedAt ?? Date.now() });
  const fileArgs =
    files !== undefined
      ? filesArgs(files.map((f, i) => [i, f] as const))
      : change.filesPatch !== undefined
        ? filesArgs(change.filesPatch)
        : ["", ""];
  const filesMode = files !== undefined ? "set" : change.filesPatch !== undefined ? "patch" : "";
  const keep = Object.entries(flatten(change.ifAbsent ?? {}));
  const state = change.set.state;
  const reply = (await store.scripts.djTransition(
    store.keys.job(id),
    store.keys.webhookOutbox,
    store.keys.resultExpiry,
    store.keys.bundleLock(id),
    store.keys.historyOutbox,
    store.keys.jobFiles(id),
    store.keys.channel(id),
    change.from.join(","),
    change.fence?.kind ?? "",
    change.fence?.attempt.token ?? "",
    change.fence?.attempt.checkLock === false ? "0" : "1",
    String(store.recordTtlSeconds),
    state !== undefined && isTerminal(state) ? "1" : "0",
    state ?? "",
    change.expire !== undefined ? expiryMember(change.expire.jobId, change.expire.key) : "",
    String(change.expire?.at ?? 0),
    change.resultKey ?? "",
    String(keep.length),
    String(store.historyOutboxMaxEntries),
    (change.clear ?? []).join(","),
    filesMode,
    change.withFiles === true ? "1" : "0",
    ...fileArgs,
    ...keep.flat(),
    ...Object.entries(fields).flat(),
  )) as [number, string?, string[]?];
  switch (reply[0]) {
    case 1:
      return {
        json: reply[1] as string,
        ...(reply[2] !== undefined ? { files: reply[2] } : {}),
      };
    case 0:
      throw new JobNotFoundError(id);
    case 3:
      throw new FencedError(id, reply[1] ?? "");
    default: {
      const now = reply[1] as JobStateName;
      throw new JobStateError(id, now, `job ${id} is ${now.toLowerCase()}`);
    }
  }
}

const decode = (r: { json: string; files?: string[] }) =>
  decodeJob(JSON.parse(r.json) as Record<string, string>, r.files);

/** Stores a new QUEUED job (tests and tools; Initiate goes through core/admission.ts). */
export async function createJob(
  store: JobStore,
  id: string,
  fileIds: number[],
  owner: string,
  now = Date.now(),
): Promise<JobRecord> {
  const rec = newJobRecord(id, owner, fileIds, now);
  const fields = { ...flatten(rec), version: String(rec.version) };
  const created = await store.scripts.djCreateJob(
    store.keys.job(id),
    store.keys.ownerJobs(owner),
    String(now),
    id,
    ...Object.entries(fields).flat(),
  );
  if (created !== 1) throw new Error(`job id collision: ${id}`);
  return rec;
}

/**
 * QUEUED (or PROCESSING: a retry, or a stalled run's job) -> PROCESSING with the totals
 * the run found, and the run takes the job. The first start time is kept on retries.
 */
export async function markProcessing(
  store: JobStore,
  attempt: Attempt,
  start: { progress: JobProgress; files: FileProgress[]; startedAt: number },
): Promise<JobRecord> {
  const applied = await apply(store, attempt.jobId, {
    from: ["QUEUED", "PROCESSING"],
    fence: { kind: "claim", attempt },
    set: { state: "PROCESSING", progress: start.progress, files: start.files },
    ifAbsent: { startedAt: start.startedAt },
  });
  // The files are the ones just written: not read back (megabytes for a large job).
  return { ...decode(applied), files: start.files };
}

/**
 * Counts a run that failed before it could start the job (it will be retried): the
 * record says how many runs the job has had.
 */
export async function countAttempt(
  store: JobStore,
  attempt: Attempt,
  startedAt: number,
): Promise<void> {
  await apply(store, attempt.jobId, {
    from: ["QUEUED", "PROCESSING"],
    fence: { kind: "claim", attempt },
    set: {},
    ifAbsent: { startedAt },
  });
}

/**
 * PROCESSING -> PROCESSING: the run's progress (throttled by the worker: one write a
 * tick), with the files that changed since the last tick (`filesPatch`, by index) or
 * all of them (`files`).
 */
export async function recordProgress(
  store: JobStore,
  attempt: Attempt,
  progress: {
    progress: JobProgress;
    files?: FileProgress[];
    filesPatch?: Iterable<readonly [number, FileProgress]>;
    /** The run's multipart upload as far as it is safe, when it changed (crash-resume). */
    upload?: UploadState;
  },
): Promise<void> {
  await apply(store, attempt.jobId, {
    from: ["PROCESSING"],
    fence: { kind: "hold", attempt },
    set: {
      progress: progress.progress,
      ...(progress.files !== undefined ? { files: progress.files } : {}),
      ...(progress.upload !== undefined ? { upload: progress.upload } : {}),
    },
    ...(progress.filesPatch !== undefined ? { filesPatch: progress.filesPatch } : {}),
  });
}

/**
 * PROCESSING -> COMPLETED with the run's result object. The object is registered for
 * deletion at `result.expiresAt` in the same step, whatever the checks say: an object a
 * cancel or another run overtook is removed by retention all the same.
 *
 * With REDIS_MIN_REPLICAS_ACK (store.replicaAck) it answers only once that many replicas
 * hold the completion (Redis WAIT), so the run reports the job done to BullMQ only when
 * a failover can no longer lose the completion and run the job again. When fewer
 * replicas acknowledge within REDIS_REPLICAS_ACK_TIMEOUT_MS (or the primary is lost
 * meanwhile) it still resolves, with `replicated: false`: the job is COMPLETED on the
 * primary and watchers may have seen it, so failing the run would only retry a finished
 * job. What is then lost with the primary is lost as without WAIT, and BullMQ runs the
 * job again. `replicated` is true when no acknowledgement was asked for.
 */
export async function markCompleted(
  store: JobStore,
  attempt: Attempt,
  done: {
    endedAt: number;
    progress: JobProgress;
    /** Every file's final state, or (filesPatch) only those changed since the last tick. */
    files?: FileProgress[];
    filesPatch?: Iterable<readonly [number, FileProgress]>;
    result: JobResultRecord & { expiresAt: number };
  },
): Promise<{ replicated: boolean; error?: unknown }> {
  const { filesPatch, ...set } = done;
  await apply(store, attempt.jobId, {
    from: ["PROCESSING"],
    fence: { kind: "hold", attempt },
    set: { state: "COMPLETED", ...set },
    ...(filesPatch !== undefined ? { filesPatch } : {}),
    // The upload is an object now: nothing is left to resume.
    clear: ["upload"],
    expire: { jobId: attempt.jobId, key: done.result.key, at: done.result.expiresAt },
  });
  if (store.replicaAck === undefined) return { replicated: true };
  return store.replicaAck.wait().then(
    () => ({ replicated: true }),
    (error: unknown) => ({ replicated: false, error }),
  );
}

/**
 * QUEUED or PROCESSING -> FAILED, decided by a run. A run that has not claimed the job
 * yet (it failed on what it found before starting) claims it in the same step, which
 * counts its attempt; `files` replaces the record's files (the missing ones FAILED).
 */
export async function markFailed(
  store: JobStore,
  attempt: Attempt,
  failure: { error: JobErrorRecord; claimed: boolean; files?: FileProgress[]; now?: number },
): Promise<JobRecord> {
  const now = failure.now ?? Date.now();
  const applied = await apply(store, attempt.jobId, {
    from: ["QUEUED", "PROCESSING"],
    fence: { kind: failure.claimed ? "hold" : "claim", attempt },
    withFiles: true,
    set: {
      state: "FAILED",
      endedAt: now,
      error: failure.error,
      ...(failure.files !== undefined ? { files: failure.files } : {}),
    },
    ...(failure.claimed ? {} : { ifAbsent: { startedAt: now } }),
  });
  return decode(applied);
}

/**
 * QUEUED or PROCESSING -> FAILED when BullMQ itself gave up on the job (stalled too
 * often): no run decided it, and none holds the job any more, so no lease is checked.
 */
export async function markAbandoned(
  store: JobStore,
  jobId: string,
  error: JobErrorRecord,
): Promise<JobRecord> {
  return decode(
    await apply(store, jobId, {
      from: ["QUEUED", "PROCESSING"],
      set: { state: "FAILED", endedAt: Date.now(), error },
      withFiles: true,
    }),
  );
}

/**
 * QUEUED or PROCESSING -> CANCELLED, by the API: it wins over any run, whose next write
 * then fails with JobStateError (the run is also told through the cancel channel).
 * `by` is who asked (history keeps it).
 */
export async function markCancelled(
  store: JobStore,
  jobId: string,
  by?: string,
  now = Date.now(),
): Promise<JobRecord> {
  return decode(
    await apply(store, jobId, {
      from: ["QUEUED", "PROCESSING"],
      set: { state: "CANCELLED", endedAt: now, ...(by !== undefined ? { cancelledBy: by } : {}) },
      withFiles: true,
    }),
  );
}

/**
 * COMPLETED -> COMPLETED without its ZIP: retention deleted the object the record names
 * (the job keeps its record, dedup stops handing it out). Refused with JobStateError
 * when the record names another object.
 */
export async function markExpired(
  store: JobStore,
  jobId: string,
  result: JobResultRecord,
): Promise<void> {
  await apply(store, jobId, {
    from: ["COMPLETED"],
    set: { result: { ...result, expired: true } },
    resultKey: result.key,
  });
}

/** A terminal job's callback delivery, as the webhook worker saw it. */
export async function recordWebhook(
  store: JobStore,
  jobId: string,
  webhook: WebhookRecord,
): Promise<void> {
  await apply(store, jobId, { from: TERMINAL_STATES, set: { webhook } });
}

/**
 * FAILED or CANCELLED -> QUEUED: RetryJob runs the job again under the same id, after its
 * admission (core/admission.ts readmit). Progress and the callback's delivery start over;
 * the error and end time go; attempts, the first start time, the files and the labels
 * stay. The record lives again until it ends (no expiry meanwhile).
 */
export async function markRequeued(
  store: JobStore,
  jobId: string,
  now = Date.now(),
): Promise<JobRecord> {
  const rec = await store.get(jobId);
  const fresh = newJobRecord(rec.id, rec.owner, rec.fileIds, now, rec.callbackUrl);
  return decode(
    await apply(store, jobId, {
      from: ["FAILED", "CANCELLED"],
      set: {
        state: "QUEUED",
        updatedAt: now,
        progress: fresh.progress,
        files: fresh.files,
        ...(fresh.webhook !== undefined ? { webhook: fresh.webhook } : {}),
      },
      clear: ["error", "endedAt", "cancelledBy"],
      withFiles: true,
    }),
  );
}

/**
 * A finished job -> gone, with every pointer to it (core/lua/delete-job.lua). The owner
 * must match: for anyone else the job does not exist. A queued or running job is refused
 * with JobStateError. `resultKey` is the ZIP whose retention entry goes with it (the
 * caller deletes the object).
 */
export async function deleteJob(
  store: JobStore,
  rec: Pick<JobRecord, "id" | "owner" | "fileIds" | "callbackUrl" | "labels">,
  resultKey: string | undefined,
): Promise<void> {
  const k = store.keys;
  const reply = (await store.scripts.djDeleteJob(
    k.job(rec.id),
    k.ownerJobs(rec.owner),
    k.dedup(rec.owner, paramsHash(rec.fileIds, rec.callbackUrl, rec.labels)),
    k.ownerActive(rec.owner),
    k.webhookOutbox,
    k.resultExpiry,
    k.jobFiles(rec.id),
    rec.owner,
    rec.id,
    resultKey !== undefined ? expiryMember(rec.id, resultKey) : "",
  )) as [number, string?];
  if (reply[0] === 0) throw new JobNotFoundError(rec.id);
  if (reply[0] === 2) {
    const state = reply[1] as JobStateName;
    throw new JobStateError(
      rec.id,
      state,
      `job is ${state.toLowerCase()}: only finished jobs can be deleted, cancel it first`,
    );
  }
}
