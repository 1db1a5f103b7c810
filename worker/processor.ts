import { randomUUID } from "node:crypto";
import { SpanKind } from "@opentelemetry/api";
import { type Job, UnrecoverableError } from "bullmq";
import type { JobStore } from "../core/job-store.js";
import {
  type Attempt,
  countAttempt,
  markCompleted,
  markFailed,
  markProcessing,
  recordProgress,
} from "../core/job-transitions.js";
import {
  entryNameFor,
  FencedError,
  type FileProgress,
  JobNotFoundError,
  type JobProgress,
  type JobRecord,
  JobStateError,
  type UploadState,
} from "../core/jobs.js";
import type { Logger } from "../core/logger.js";
import type { JobMetrics, JobOutcome } from "../core/metrics.js";
import type { BundleJobData } from "../core/queue.js";
import { SourceError } from "../core/s3-errors.js";
import type { SourceInfo, Storage } from "../core/storage.js";
import { extractContext, inSpan } from "../core/tracing.js";
import { abortError, type BundleEntry, type BundleOptions, bundleToS3 } from "./bundle.js";
import { BundleSpans } from "./bundle-spans.js";
import { entryNames } from "./entry-names.js";
import { planResume, type ResumePlan, storedLayout } from "./stored-bundle.js";

// One BullMQ job = one bundle; one run of the processor = one attempt. The job record is
// the truth, changed only through core/job-transitions.ts: the run claims the job
// (markProcessing, which takes the lease with BullMQ's lock token), and every later
// write it makes is fenced on that lease and on the job still running. So a Cancel from
// any API process wins over a late write from here, and a run that lost its lock (BullMQ
// keeps it running: a stall, a partition, a failover) can change nothing once another
// run has taken the job.
//
// Each run uploads to its own object (storage.resultKey(jobId, attempt)) and the record
// names the one that completed the job, so a run that lost, was cancelled or failed
// deletes its own object and never one another run's record points to.
//
// A run ends whatever the moment a cancel (or a lost lease) arrives: every wait of the
// run races the abort signal (untilAborted), so a step that ignores the signal cannot
// hold the run, its BullMQ lock or its worker slot; and the run re-reads its job's state
// and lease every ownershipCheckMs, in case the cancel message was lost and no write is
// due (a stalled source, the upload's last part).
//
// Crash-resume hook (for multipart uploads kept across runs): a transition that stores
// this run's {key, uploadId} in the record under its lease lets the next run's claim
// (markProcessing returns the record) adopt that upload explicitly instead of starting
// its own key; the run that lost must then skip aborting an upload the record names.

export interface ProcessorDeps {
  store: JobStore;
  storage: Storage;
  log: Logger;
  /** Abort controllers of the jobs running in this process, by job id (for Cancel). */
  running: Map<string, AbortController>;
  zipLevel: number;
  throttleBytesPerSecond: number;
  progressIntervalMs: number;
  headConcurrency?: number;
  /** Prometheus hooks (job_duration_seconds, job_bytes_total, ...); none in some tests. */
  metrics?: JobMetrics;
  /** Largest total size of a job's sources; 0 = no limit. */
  maxJobBytes?: number;
  /** How long a result object is kept after completion (retention deletes it then). */
  resultTtlSeconds?: number;
  /** How often a run re-reads its job's state and lease (a missed cancel, a lost lease). */
  ownershipCheckMs?: number;
  /** Read-ahead window, deadlines and retries of source reads (worker/read-ahead.ts). */
  read?: BundleOptions["read"];
  /** A job still running this long after its first start fails (deadline_exceeded); 0 = never. */
  maxJobSeconds?: number;
}

export class CancelledError extends Error {
  override name = "CancelledError";
}

export type ProcessOutcome = "completed" | "cancelled" | "skipped";

export function createProcessor(deps: ProcessorDeps) {
  // BullMQ makes the AbortSignal only for processors that declare all three parameters.
  return async (
    job: Job<BundleJobData>,
    token?: string,
    signal?: AbortSignal,
  ): Promise<ProcessOutcome> => {
    const { jobId } = job.data;
    const { owner, traceparent } = job.data;
    // BullMQ's lock token is the fencing token; a caller without one (no BullMQ lock to
    // check) gets a token of its own.
    const attempt: Attempt =
      token !== undefined
        ? { jobId, token, checkLock: true }
        : { jobId, token: randomUUID(), checkLock: false };
    const log = deps.log.child({
      jobId,
      attempt: job.attemptsMade + 1,
      ...(owner !== undefined ? { owner } : {}),
    });
    const cancel = new AbortController();
    // A second run of one job in this process: BullMQ gave the job out again, so the
    // first run lost its lock. Stop it here at once rather than at its next write.
    deps.running.get(jobId)?.abort(new FencedError(jobId, attempt.token));
    deps.running.set(jobId, cancel);
    const abort = signal ? AbortSignal.any([cancel.signal, signal]) : cancel.signal;
    const started = performance.now();
    try {
      // The worker's spans join the trace of the RPC that started the job (a trace of
      // their own when the job carries none).
      const span = {
        kind: SpanKind.CONSUMER,
        parent: extractContext({ traceparent }),
        attributes: { "job.id": jobId, "job.attempt": job.attemptsMade + 1 },
      };
      const outcome = await inSpan("bundle", span, () =>
        run(deps, job, attempt, abort, cancel, log),
      );
      // Not awaited: the metrics must not delay BullMQ's own bookkeeping of the job.
      if (outcome !== "skipped") void observeRun(deps, jobId, outcome, started);
      return outcome;
    } catch (err) {
      void observeRun(deps, jobId, failedRunOutcome(job, err, cancel.signal, abort), started);
      throw err;
    } finally {
      if (deps.running.get(jobId) === cancel) deps.running.delete(jobId);
    }
  };
}

/** Whether the run was stopped because another run owns the job now. */
function fenced(err: unknown, cancel: AbortSignal): boolean {
  return err instanceof FencedError || (cancel.aborted && cancel.reason instanceof FencedError);
}

async function run(
  deps: ProcessorDeps,
  job: Job<BundleJobData>,
  attempt: Attempt,
  signal: AbortSignal,
  cancel: AbortController,
  log: Logger,
): Promise<ProcessOutcome> {
  const { store, storage } = deps;
  const { jobId, fileIds } = job.data;
  const attempts = job.opts.attempts ?? 1;
  const lastAttempt = job.attemptsMade + 1 >= attempts;
  const startedAt = Date.now();
  // Until the run has claimed the job, a failure write claims it (and counts the run).
  let claimed = false;
  // This run's own result object, known once it has claimed the job.
  let key: string | undefined;
  let bundling: Promise<unknown> | undefined;
  let progress: ProgressTracker | undefined;
  let watch: NodeJS.Timeout | undefined;

  const stop = (reason: Error) => {
    if (!cancel.signal.aborted) cancel.abort(reason);
  };
  /** Stops the run when a write was refused because the job is not its to change. */
  const refused = (err: unknown): boolean => {
    if (err instanceof FencedError) {
      stop(err);
      return true;
    }
    if (err instanceof JobStateError || err instanceof JobNotFoundError) {
      stop(new CancelledError(`job ${jobId} is no longer running`));
      return true;
    }
    return false;
  };

  try {
    // The sources first, so that the job turns PROCESSING with its totals in one record
    // write (and one message to every watcher) instead of two. Nothing is written yet:
    // a job cancelled meanwhile costs a few HEADs and is skipped below.
    const sources = await untilAborted(
      headAll(storage, fileIds, deps.headConcurrency ?? 8, signal),
      signal,
    );
    const missing = fileIds.filter((_, i) => sources[i] === undefined);
    if (missing.length > 0) {
      const gone = new Set(missing);
      const failed = await failJob(
        deps,
        attempt,
        claimed,
        log,
        {
          code: "not_found",
          message: `source files not found: ${missing.join(", ")}. Check the file ids and initiate again.`,
          retryable: false,
          missingFileIds: missing,
        },
        fileIds.map((fileId) => ({
          fileId,
          state: gone.has(fileId) ? "FAILED" : "PENDING",
          sizeBytes: 0,
          bytesDone: 0,
          entryName: entryNameFor(fileId),
        })),
      );
      if (!failed) return "skipped";
      log.warn({ missing }, "job failed: missing source files");
      throw new UnrecoverableError(`missing source files: ${missing.join(", ")}`);
    }
    const totalBytes = (sources as SourceInfo[]).reduce((n, s) => n + s.sizeBytes, 0);
    const maxBytes = deps.maxJobBytes ?? 0;
    if (maxBytes > 0 && totalBytes > maxBytes) {
      // Known from the HEADs alone: refuse before a single byte is read or uploaded.
      const failed = await failJob(deps, attempt, claimed, log, {
        code: "resource_exhausted",
        message: `the files add up to ${totalBytes} bytes, more than the ${maxBytes} bytes one job may bundle: split the request`,
        retryable: false,
      });
      if (!failed) return "skipped";
      log.warn({ totalBytes, maxBytes }, "job failed: too many bytes");
      throw new UnrecoverableError(`job too large: ${totalBytes} > ${maxBytes} bytes`);
    }
    const entries = toEntries(sources as SourceInfo[]);
    // A run that takes over a crashed one continues its upload where it can (stored ZIPs).
    const { plan, prior } = await resumePlan(deps, jobId, entries, log);
    const start = startingPoint(entries, totalBytes, plan);

    let rec: JobRecord;
    try {
      // PROCESSING too: a job whose run died or lost its lock comes back here through
      // stall detection, and this run takes it over.
      rec = await markProcessing(store, attempt, { ...start, startedAt });
    } catch (err) {
      if (err instanceof JobStateError || err instanceof JobNotFoundError) {
        log.info({ reason: err.message }, "job skipped");
        return "skipped";
      }
      throw err;
    }
    claimed = true;
    key = plan?.state.key ?? storage.resultKey(jobId, rec.attempts);
    log.info(
      {
        files: rec.fileIds.length,
        bytes: totalBytes,
        key,
        ...(plan !== undefined ? { resumedAt: plan.offset, parts: plan.state.parts.length } : {}),
      },
      plan !== undefined ? "job resumed from the last uploaded part" : "job started",
    );
    if (plan === undefined && prior !== undefined) {
      // Not continued: nobody will finish that upload. Its object, should a run that lost
      // the job still complete it, goes with retention.
      void storage
        .abortResultUpload(prior.key, prior.uploadId)
        .catch((e: unknown) => log.debug({ err: e }, "could not abort the earlier upload"));
      void store
        .scheduleResultDeletion(jobId, prior.key, Date.now() + 3_600_000)
        .catch((e: unknown) => log.debug({ err: e }, "could not register the earlier upload"));
    }

    watch = setInterval(() => {
      store.ownership(jobId).then(
        (o) => {
          // The lease first: a job another run ended is not this run's cancel.
          if (o.lease !== attempt.token) stop(new FencedError(jobId, o.lease ?? ""));
          else if (o.state !== "PROCESSING") {
            stop(new CancelledError(`job ${jobId} is no longer running`));
          }
        },
        () => undefined,
      );
    }, deps.ownershipCheckMs ?? 2000);
    watch.unref();

    progress = new ProgressTracker(rec, deps.progressIntervalMs, async (patch) => {
      try {
        await recordProgress(store, attempt, patch);
        return true;
      } catch (err) {
        // Cancelled, gone or taken by another run: stop, even if no message said so.
        if (!refused(err)) log.warn({ err }, "progress write failed");
        return false;
      }
    });
    const tracker = progress;

    const fileName = resultFileName(rec);
    const spans = new BundleSpans(entries);
    bundling = bundleToS3(
      storage,
      entries,
      { key, fileName },
      {
        zipLevel: deps.zipLevel,
        throttleBytesPerSecond: deps.throttleBytesPerSecond,
        ...(deps.read !== undefined ? { read: deps.read } : {}),
        ...(deps.maxJobSeconds
          ? { deadlineAt: (rec.startedAt ?? startedAt) + deps.maxJobSeconds * 1000 }
          : {}),
        signal,
        onFileStart: (i) => {
          tracker.fileStarted(i);
          spans.fileStarted(i);
        },
        onBytes: (i, n) => {
          tracker.addBytes(i, n);
          deps.metrics?.bytesRead(n);
        },
        onFileDone: (i, crc) => {
          tracker.fileDone(i, crc);
          spans.fileDone(i);
        },
        ...(plan !== undefined ? { resume: plan } : {}),
        onDurable: (state) => tracker.uploaded(state),
        keepUpload: (err) => {
          // Another run owns the job now and may be continuing this very upload.
          if (fenced(err, cancel.signal)) return true;
          if (cancel.signal.aborted) return false;
          if (err instanceof SourceError && !err.retryable) return false;
          // The worker is stopping, or another attempt follows: it continues from here.
          return signal.aborted || !lastAttempt;
        },
      },
    );
    // Observed here: after an abort the run stops waiting for it (below), and it may
    // still settle later.
    bundling.catch(() => undefined);
    const result = await untilAborted(bundling as ReturnType<typeof bundleToS3>, signal).catch(
      (err: unknown) => {
        spans.failed(err);
        throw err;
      },
    );
    spans.done(result.sizeBytes);
    key = result.key;
    await tracker.stop();
    signal.throwIfAborted();
    const endedAt = Date.now();
    const expiresAt = endedAt + (deps.resultTtlSeconds ?? 24 * 3600) * 1000;
    try {
      // The result is registered for deletion in the same step, whatever the checks
      // say: retention removes it even if a cancel or another run won.
      const { replicated, error } = await markCompleted(store, attempt, {
        endedAt,
        progress: tracker.final(),
        filesPatch: tracker.takeChanged(),
        result: {
          key: result.key,
          fileName,
          sizeBytes: result.sizeBytes,
          sha256: result.sha256,
          expiresAt,
        },
      });
      if (!replicated)
        log.warn(
          { err: error },
          "completion not confirmed by the replicas; a failover may rerun the job",
        );
    } catch (err) {
      if (err instanceof JobStateError || err instanceof JobNotFoundError) {
        // Cancelled while the last part was being written: leave nothing behind.
        await discardOwnResult(store, storage, attempt, key, undefined, log);
        log.info("job cancelled after upload; result deleted");
        return "cancelled";
      }
      throw err;
    }
    log.info(
      {
        ms: Date.now() - startedAt,
        bytes: result.sizeBytes,
        read: result.read,
        ...(result.resumedAt > 0 ? { resumedAt: result.resumedAt } : {}),
      },
      "job completed",
    );
    return "completed";
  } catch (err) {
    clearInterval(watch);
    await progress?.stop();
    if (fenced(err, cancel.signal)) {
      // Another run owns the job: its record, its object and its webhook are its own.
      // This run only removes what it made; BullMQ refuses whatever it reports (the lock
      // is gone), and the job goes on in the run that holds it. A stored ZIP's upload is
      // left alone: the run that took over may be continuing it (and removes it if not).
      if (deps.zipLevel !== 0) await discardOwnResult(store, storage, attempt, key, bundling, log);
      log.warn({ ms: Date.now() - startedAt }, "run stopped: another run owns the job now");
      throw new Error(`job ${jobId}: this run lost the job to another run`);
    }
    if (cancel.signal.aborted) {
      await discardOwnResult(store, storage, attempt, key, bundling, log);
      log.info({ ms: Date.now() - startedAt }, "job cancelled");
      // Unrecoverable: a retry would start the cancelled job again.
      throw new UnrecoverableError("cancelled");
    }
    if (err instanceof UnrecoverableError) throw err;
    if (err instanceof SourceError && !err.retryable) {
      // Missing, forbidden, archived or changed sources, or the job's deadline: another
      // attempt would end the same way, so the job fails now, naming the file.
      await failJob(deps, attempt, claimed, log, {
        code: err.code,
        message: err.message,
        retryable: false,
      }).catch((e: unknown) => log.error({ err: e }, "could not record failure"));
      log.warn({ err, fileId: err.fileId }, "job failed");
      throw new UnrecoverableError(err.message);
    }
    if (signal.aborted) {
      // BullMQ took the job from us (shutting down): it will run again.
      log.warn({ err }, "job interrupted");
      throw err;
    }
    if (lastAttempt) {
      await failJob(deps, attempt, claimed, log, {
        code: "unavailable",
        message: `storage or queue unavailable after ${job.attemptsMade + 1} attempts: ${(err as Error).message}`,
        retryable: true,
      }).catch((e: unknown) => log.error({ err: e }, "could not record failure"));
      log.error({ err }, "job failed after last attempt");
    } else {
      // A run that failed before it claimed the job still counts: the record says how
      // many runs the job has had (a failure path, so the extra write is rare).
      if (!claimed) {
        await countAttempt(store, attempt, startedAt).catch((e: unknown) =>
          log.debug({ err: e }, "could not count the attempt"),
        );
      }
      log.warn({ err }, "job attempt failed; will retry");
    }
    throw err;
  } finally {
    clearInterval(watch);
  }
}

/**
 * Deletes this run's own result object (never another's: each run has its own key). An
 * upload the abort did not stop in time may still land: the object is deleted again
 * once the bundle has settled, and registered with retention, which deletes it at its
 * next sweep should it land later still.
 */
async function discardOwnResult(
  store: JobStore,
  storage: Storage,
  attempt: Attempt,
  key: string | undefined,
  bundling: Promise<unknown> | undefined,
  log: Logger,
): Promise<void> {
  if (key === undefined) return;
  const del = () =>
    storage
      .deleteResult(key)
      .catch((e: unknown) => log.warn({ err: e, key }, "could not delete result"));
  if (bundling !== undefined) {
    void bundling.then(del, del);
    await store
      .scheduleResultDeletion(attempt.jobId, key, Date.now())
      .catch((e: unknown) => log.warn({ err: e, key }, "could not register result for deletion"));
  }
  await del();
}

/** Resolves or rejects as `p`, or rejects with the abort reason as soon as `signal` aborts. */
function untilAborted<T>(p: Promise<T>, signal: AbortSignal): Promise<T> {
  if (signal.aborted) {
    p.catch(() => undefined);
    return Promise.reject(abortError(signal));
  }
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => reject(abortError(signal));
    signal.addEventListener("abort", onAbort, { once: true });
    p.then(
      (v) => {
        signal.removeEventListener("abort", onAbort);
        resolve(v);
      },
      (e: unknown) => {
        signal.removeEventListener("abort", onAbort);
        reject(e);
      },
    );
  });
}

/** How a run that threw ended, for the metrics; undefined when BullMQ took the job away. */
function failedRunOutcome(
  job: Job<BundleJobData>,
  err: unknown,
  cancel: AbortSignal,
  abort: AbortSignal,
): JobOutcome | undefined {
  // Another run owns the job and reports how it ends; this run only counts as superseded.
  if (fenced(err, cancel)) return "superseded";
  if (cancel.aborted) return "cancelled";
  if (err instanceof UnrecoverableError) return "failed";
  // Lock lost or the worker is stopping: another run follows, and nobody decided anything.
  if (abort.aborted) return undefined;
  return job.attemptsMade + 1 >= (job.opts.attempts ?? 1) ? "failed" : "retry";
}

/** Reports one run to the metrics; never rejects. */
async function observeRun(
  deps: ProcessorDeps,
  jobId: string,
  outcome: JobOutcome | undefined,
  started: number,
): Promise<void> {
  const m = deps.metrics;
  if (m === undefined || outcome === undefined) return;
  const stoppedAt = Date.now();
  m.runEnded(outcome, (performance.now() - started) / 1000);
  if (outcome === "retry") m.retried();
  if (outcome !== "cancelled" && outcome !== "failed") return;
  // The record holds what the run itself does not know: when the API took the cancel,
  // and the code the failure was recorded with.
  const rec = await deps.store.get(jobId).catch(() => undefined);
  if (outcome === "cancelled" && rec?.state === "CANCELLED" && rec.endedAt !== undefined) {
    m.cancelStopped((stoppedAt - rec.endedAt) / 1000);
  }
  if (outcome === "failed" && rec?.state === "FAILED") m.failed(rec.error?.code ?? "unknown");
}

/**
 * Records the job as FAILED, from QUEUED or PROCESSING; false when the job is no longer
 * running (cancelled meanwhile). A run that has not claimed the job claims it in the same
 * step. With `files`, the record's files are replaced (the missing ones FAILED).
 */
async function failJob(
  deps: ProcessorDeps,
  attempt: Attempt,
  claimed: boolean,
  log: Logger,
  error: NonNullable<JobRecord["error"]>,
  files?: FileProgress[],
): Promise<boolean> {
  try {
    await markFailed(deps.store, attempt, {
      error,
      claimed,
      ...(files !== undefined ? { files } : {}),
    });
    return true;
  } catch (err) {
    if (err instanceof JobStateError || err instanceof JobNotFoundError) {
      log.info({ reason: err.message }, "job skipped");
      return false;
    }
    throw err;
  }
}

/** HEADs every source with bounded concurrency; undefined marks a missing file. */
async function headAll(
  storage: Storage,
  fileIds: readonly number[],
  concurrency: number,
  signal: AbortSignal,
): Promise<(SourceInfo | undefined)[]> {
  const out: (SourceInfo | undefined)[] = new Array<SourceInfo | undefined>(fileIds.length);
  let next = 0;
  const lanes = Array.from({ length: Math.min(concurrency, fileIds.length) }, async () => {
    while (next < fileIds.length) {
      const i = next++;
      out[i] = await storage.headSource(fileIds[i] as number, signal);
    }
  });
  await Promise.all(lanes);
  return out;
}

/**
 * The upload an earlier run of the job left (in its record), and whether this run can
 * continue it: stored ZIPs only (a deflated archive's bytes are not known in advance).
 * Says in the log why not when it cannot.
 */
async function resumePlan(
  deps: ProcessorDeps,
  jobId: string,
  entries: readonly BundleEntry[],
  log: Logger,
): Promise<{ plan?: ResumePlan; prior?: UploadState }> {
  // One field first: only a job that has an upload to continue is read whole.
  const kept = await deps.store.redis.hget(deps.store.key(jobId), "upload").catch(() => null);
  if (kept === null || kept === undefined) return {};
  const rec = await deps.store.get(jobId).catch(() => undefined);
  const prior = rec?.upload;
  if (rec === undefined || prior === undefined) return {};
  if (deps.zipLevel !== 0) {
    log.warn({ key: prior.key }, "starting over: a deflated ZIP (ZIP_LEVEL > 0) cannot be resumed");
    return { prior };
  }
  const crcs = rec.files.map((f) => (f.state === "DONE" ? f.crc32 : undefined));
  const plan = await planResume(
    deps.storage,
    entries,
    prior,
    crcs,
    deps.storage.opts.uploadPartBytes,
  );
  if ("reason" in plan) {
    log.warn({ key: prior.key, reason: plan.reason }, `starting over from byte 0: ${plan.reason}`);
    return { prior };
  }
  return { plan, prior };
}

/** The progress and per-file state a run starts with: all pending, or as far as it resumes. */
function startingPoint(
  entries: readonly BundleEntry[],
  totalBytes: number,
  plan: ResumePlan | undefined,
): { progress: JobProgress; files: FileProgress[] } {
  const files: FileProgress[] = entries.map((e, i) => {
    const crc = plan?.crcs[i];
    return {
      fileId: e.fileId,
      state: crc !== undefined ? "DONE" : "PENDING",
      sizeBytes: e.sizeBytes,
      bytesDone: crc !== undefined ? e.sizeBytes : 0,
      entryName: e.entryName,
      ...(crc !== undefined ? { crc32: crc } : {}),
    };
  });
  if (plan !== undefined) {
    // The entry the upload stopped in: the bytes of it already uploaded.
    const at = storedLayout(entries).locate(plan.offset);
    const f = files[at.entry];
    if (f !== undefined && f.state !== "DONE") {
      f.bytesDone = at.part === "data" ? at.within : at.part === "descriptor" ? f.sizeBytes : 0;
    }
  }
  return {
    progress: {
      filesDone: files.filter((f) => f.state === "DONE").length,
      filesTotal: entries.length,
      bytesDone: files.reduce((n, f) => n + f.bytesDone, 0),
      bytesTotal: totalBytes,
      bytesPerSecond: 0,
    },
    files,
  };
}

/** ZIP entry names: the source's `filename` metadata when safe and unique, else file-<id>. */
function toEntries(sources: readonly SourceInfo[]): BundleEntry[] {
  const names = entryNames(sources);
  return sources.map((s, i) => ({ ...s, entryName: names[i] as string }));
}

function resultFileName(rec: JobRecord): string {
  const day = new Date(rec.createdAt).toISOString().slice(0, 10);
  return `download-${day}-${rec.id.slice(0, 8)}.zip`;
}

/**
 * Keeps the job's progress and writes it to Redis at most once per interval (and once
 * at each file boundary that the interval allows), never two writes at a time. A write
 * carries only the files changed since the last one: a job of 70,000 files writes a few
 * entries a tick, not megabytes (core/keys.ts jobFiles).
 */
class ProgressTracker {
  files: FileProgress[];
  /** Files changed since the last write, by index. */
  private changed = new Set<number>();
  /** The upload as far as it is safe, when it changed since the last write. */
  private upload: UploadState | undefined;
  private progress: JobProgress;
  private timer: NodeJS.Timeout | undefined;
  private inFlight: Promise<void> | undefined;
  private dirty = false;
  private lastWrite = 0;
  private rateWindowStart = Date.now();
  private rateWindowBytes = 0;
  private stopped = false;

  constructor(
    rec: JobRecord,
    private readonly intervalMs: number,
    private readonly write: (patch: {
      progress: JobProgress;
      filesPatch: [number, FileProgress][];
      upload?: UploadState;
    }) => Promise<boolean>,
  ) {
    // As the run claimed the job: all pending, or as far as a resumed upload went.
    this.files = rec.files.map((f) => ({ ...f }));
    this.progress = { ...rec.progress, bytesPerSecond: 0 };
  }

  /** The upload's parts are safe up to here: written with the next tick. */
  uploaded(state: UploadState): void {
    this.upload = state;
    this.touch();
  }

  fileStarted(i: number): void {
    const f = this.files[i];
    if (f) f.state = "IN_PROGRESS";
    this.changed.add(i);
    this.touch();
  }

  addBytes(i: number, n: number): void {
    const f = this.files[i];
    if (f) f.bytesDone += n;
    this.changed.add(i);
    this.progress.bytesDone += n;
    this.rateWindowBytes += n;
    this.touch();
  }

  fileDone(i: number, crc?: number): void {
    const f = this.files[i];
    if (f) {
      f.state = "DONE";
      if (crc !== undefined) f.crc32 = crc;
    }
    this.changed.add(i);
    this.progress.filesDone += 1;
    this.touch();
  }

  /** The files changed since the last write (copies), and forgets them. */
  takeChanged(): [number, FileProgress][] {
    const out: [number, FileProgress][] = [];
    for (const i of this.changed) {
      const f = this.files[i];
      if (f) out.push([i, { ...f }]);
    }
    this.changed.clear();
    return out;
  }

  final(): JobProgress {
    const { etaSeconds: _eta, ...rest } = this.progress;
    return { ...rest, etaSeconds: 0 };
  }

  private touch(): void {
    this.dirty = true;
    if (this.timer !== undefined || this.stopped) return;
    const wait = Math.max(0, this.lastWrite + this.intervalMs - Date.now());
    this.timer = setTimeout(() => {
      this.timer = undefined;
      void this.flush();
    }, wait);
  }

  private snapshot(): {
    progress: JobProgress;
    filesPatch: [number, FileProgress][];
    upload?: UploadState;
  } {
    const now = Date.now();
    const elapsed = (now - this.rateWindowStart) / 1000;
    if (elapsed >= 0.5) {
      const rate = this.rateWindowBytes / elapsed;
      // Smooth the rate so the ETA does not jump with every chunk.
      this.progress.bytesPerSecond = Math.round(
        this.progress.bytesPerSecond === 0 ? rate : this.progress.bytesPerSecond * 0.6 + rate * 0.4,
      );
      this.rateWindowStart = now;
      this.rateWindowBytes = 0;
    }
    const left = this.progress.bytesTotal - this.progress.bytesDone;
    const { etaSeconds: _eta, ...rest } = this.progress;
    this.progress =
      this.progress.bytesPerSecond > 0 && this.progress.bytesTotal > 0
        ? { ...rest, etaSeconds: Math.ceil(left / this.progress.bytesPerSecond) }
        : rest;
    const upload = this.upload;
    this.upload = undefined;
    return {
      progress: { ...this.progress },
      filesPatch: this.takeChanged(),
      ...(upload !== undefined ? { upload } : {}),
    };
  }

  private async flush(): Promise<void> {
    if (this.inFlight) await this.inFlight;
    if (!this.dirty) return;
    this.dirty = false;
    this.lastWrite = Date.now();
    const snap = this.snapshot();
    this.inFlight = this.write(snap).then(
      (written) => {
        this.inFlight = undefined;
        // Not written: those files go with the next write instead.
        if (!written) {
          for (const [i] of snap.filesPatch) this.changed.add(i);
          this.upload ??= snap.upload;
        }
      },
      () => {
        this.inFlight = undefined;
      },
    );
    await this.inFlight;
  }

  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer !== undefined) clearTimeout(this.timer);
    this.timer = undefined;
    if (this.inFlight) await this.inFlight;
  }
}
