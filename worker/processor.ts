import { SpanKind } from "@opentelemetry/api";
import { type Job, UnrecoverableError } from "bullmq";
import type { JobStore } from "../core/job-store.js";
import {
  entryNameFor,
  type FileProgress,
  JobNotFoundError,
  type JobProgress,
  type JobRecord,
  JobStateError,
} from "../core/jobs.js";
import type { Logger } from "../core/logger.js";
import type { JobMetrics, JobOutcome } from "../core/metrics.js";
import type { BundleJobData } from "../core/queue.js";
import type { SourceInfo, Storage } from "../core/storage.js";
import { extractContext, inSpan } from "../core/tracing.js";
import { type BundleEntry, bundleToS3 } from "./bundle.js";
import { BundleSpans } from "./bundle-spans.js";

// One BullMQ job = one bundle. The job record (core/job-store.ts) is the truth: the
// processor moves it QUEUED/PROCESSING -> PROCESSING -> COMPLETED/FAILED, and every write
// it makes is conditional on the job still running, so a Cancel from any API process
// wins over a late write from here.

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
}

export class CancelledError extends Error {
  override name = "CancelledError";
}

export type ProcessOutcome = "completed" | "cancelled" | "skipped";

export function createProcessor(deps: ProcessorDeps) {
  // BullMQ makes the AbortSignal only for processors that declare all three parameters.
  return async (
    job: Job<BundleJobData>,
    _token?: string,
    signal?: AbortSignal,
  ): Promise<ProcessOutcome> => {
    const { jobId } = job.data;
    const { owner, traceparent } = job.data;
    const log = deps.log.child({
      jobId,
      attempt: job.attemptsMade + 1,
      ...(owner !== undefined ? { owner } : {}),
    });
    const cancel = new AbortController();
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
      const outcome = await inSpan("bundle", span, () => run(deps, job, abort, cancel, log));
      // Not awaited: the metrics must not delay BullMQ's own bookkeeping of the job.
      if (outcome !== "skipped") void observeRun(deps, jobId, outcome, started);
      return outcome;
    } catch (err) {
      void observeRun(deps, jobId, failedRunOutcome(job, err, cancel.signal, abort), started);
      throw err;
    } finally {
      deps.running.delete(jobId);
    }
  };
}

async function run(
  deps: ProcessorDeps,
  job: Job<BundleJobData>,
  signal: AbortSignal,
  cancel: AbortController,
  log: Logger,
): Promise<ProcessOutcome> {
  const { store, storage } = deps;
  const { jobId, fileIds } = job.data;
  const attempts = job.opts.attempts ?? 1;
  const lastAttempt = job.attemptsMade + 1 >= attempts;
  const startedAt = Date.now();
  // Until this run's start is recorded, a failure write counts the attempt itself.
  let started = false;
  let progress: ProgressTracker | undefined;

  try {
    // The sources first, so that the job turns PROCESSING with its totals in one record
    // write (and one message to every watcher) instead of two. Nothing is written yet:
    // a job cancelled meanwhile costs a few HEADs and is skipped below.
    const sources = await headAll(storage, fileIds, deps.headConcurrency ?? 8, signal);
    const missing = fileIds.filter((_, i) => sources[i] === undefined);
    if (missing.length > 0) {
      await failJob(
        store,
        jobId,
        started,
        {
          code: "not_found",
          message: `source files not found: ${missing.join(", ")}. Check the file ids and initiate again.`,
          retryable: false,
          missingFileIds: missing,
        },
        { files: fileIds, missing },
      );
      log.warn({ missing }, "job failed: missing source files");
      throw new UnrecoverableError(`missing source files: ${missing.join(", ")}`);
    }
    const totalBytes = (sources as SourceInfo[]).reduce((n, s) => n + s.sizeBytes, 0);
    const maxBytes = deps.maxJobBytes ?? 0;
    if (maxBytes > 0 && totalBytes > maxBytes) {
      // Known from the HEADs alone: refuse before a single byte is read or uploaded.
      await failJob(store, jobId, started, {
        code: "resource_exhausted",
        message: `the files add up to ${totalBytes} bytes, more than the ${maxBytes} bytes one job may bundle: split the request`,
        retryable: false,
      });
      log.warn({ totalBytes, maxBytes }, "job failed: too many bytes");
      throw new UnrecoverableError(`job too large: ${totalBytes} > ${maxBytes} bytes`);
    }
    const entries = toEntries(sources as SourceInfo[]);

    let rec: JobRecord;
    try {
      rec = await store.update(
        jobId,
        {
          state: "PROCESSING",
          progress: {
            filesDone: 0,
            filesTotal: entries.length,
            bytesDone: 0,
            bytesTotal: totalBytes,
            bytesPerSecond: 0,
          },
          files: entries.map((e) => ({
            fileId: e.fileId,
            state: "PENDING",
            sizeBytes: e.sizeBytes,
            bytesDone: 0,
            entryName: e.entryName,
          })),
        },
        // PROCESSING too: a job whose worker died comes back here through stall
        // detection. A retry keeps the time of the first start.
        { from: ["QUEUED", "PROCESSING"], addAttempts: 1, ifAbsent: { startedAt } },
      );
    } catch (err) {
      if (err instanceof JobStateError || err instanceof JobNotFoundError) {
        log.info({ reason: err.message }, "job skipped");
        return "skipped";
      }
      throw err;
    }
    started = true;
    log.info({ files: rec.fileIds.length, bytes: totalBytes }, "job started");

    progress = new ProgressTracker(rec, deps.progressIntervalMs, async (patch) => {
      try {
        await store.write(jobId, patch, { from: ["PROCESSING"] });
      } catch (err) {
        if (err instanceof JobStateError || err instanceof JobNotFoundError) {
          // Cancelled (or gone) under us: stop, even if the cancel message was missed.
          cancel.abort(new CancelledError(`job ${jobId} is no longer running`));
          return;
        }
        log.warn({ err }, "progress write failed");
      }
    });
    const tracker = progress;

    const key = storage.resultKey(jobId);
    const fileName = resultFileName(rec);
    const spans = new BundleSpans(entries);
    const result = await bundleToS3(
      storage,
      entries,
      { key, fileName },
      {
        zipLevel: deps.zipLevel,
        throttleBytesPerSecond: deps.throttleBytesPerSecond,
        signal,
        onFileStart: (i) => {
          tracker.fileStarted(i);
          spans.fileStarted(i);
        },
        onBytes: (i, n) => {
          tracker.addBytes(i, n);
          deps.metrics?.bytesRead(n);
        },
        onFileDone: (i) => {
          tracker.fileDone(i);
          spans.fileDone(i);
        },
      },
    ).catch((err: unknown) => {
      spans.failed(err);
      throw err;
    });
    spans.done(result.sizeBytes);
    await tracker.stop();
    const endedAt = Date.now();
    const expiresAt = endedAt + (deps.resultTtlSeconds ?? 24 * 3600) * 1000;
    try {
      // The result is registered for deletion in the same step, whatever the state
      // check says: retention removes it even if a cancel won (core/job-store.ts).
      await store.write(
        jobId,
        {
          state: "COMPLETED",
          endedAt,
          progress: tracker.final(),
          files: tracker.files,
          result: { key, fileName, sizeBytes: result.sizeBytes, sha256: result.sha256, expiresAt },
        },
        { from: ["PROCESSING"], expireResultAt: expiresAt },
      );
    } catch (err) {
      if (err instanceof JobStateError) {
        // Cancelled while the last part was being written: leave nothing behind.
        await storage
          .deleteResult(key)
          .catch((e: unknown) => log.warn({ err: e }, "could not delete result"));
        log.info("job cancelled after upload; result deleted");
        return "cancelled";
      }
      throw err;
    }
    log.info({ ms: Date.now() - startedAt, bytes: result.sizeBytes }, "job completed");
    return "completed";
  } catch (err) {
    await progress?.stop();
    if (cancel.signal.aborted) {
      await storage.deleteResult(storage.resultKey(jobId)).catch(() => undefined);
      log.info({ ms: Date.now() - startedAt }, "job cancelled");
      // Unrecoverable: a retry would start the cancelled job again.
      throw new UnrecoverableError("cancelled");
    }
    if (err instanceof UnrecoverableError) throw err;
    if (signal.aborted) {
      // BullMQ took the job from us (lock lost or shutting down): it will run again.
      log.warn({ err }, "job interrupted");
      throw err;
    }
    if (lastAttempt) {
      await failJob(store, jobId, started, {
        code: "unavailable",
        message: `storage or queue unavailable after ${job.attemptsMade + 1} attempts: ${(err as Error).message}`,
        retryable: true,
      }).catch((e: unknown) => log.error({ err: e }, "could not record failure"));
      log.error({ err }, "job failed after last attempt");
    } else {
      // A run that failed before its start was recorded still counts: the record says
      // how many runs the job has had (a failure path, so the extra write is rare).
      if (!started) {
        await store
          .update(
            jobId,
            {},
            { from: ["QUEUED", "PROCESSING"], addAttempts: 1, ifAbsent: { startedAt } },
          )
          .catch((e: unknown) => log.debug({ err: e }, "could not count the attempt"));
      }
      log.warn({ err }, "job attempt failed; will retry");
    }
    throw err;
  }
}

/** How a run that threw ended, for the metrics; undefined when BullMQ took the job away. */
function failedRunOutcome(
  job: Job<BundleJobData>,
  err: unknown,
  cancel: AbortSignal,
  abort: AbortSignal,
): JobOutcome | undefined {
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
 * Records the job as FAILED, from QUEUED or PROCESSING. A run that fails before its
 * start was recorded counts its attempt here (and the start time, if the job has none).
 * With `missing`, the record's files are those of the request, the missing ones FAILED.
 */
async function failJob(
  store: JobStore,
  jobId: string,
  started: boolean,
  error: NonNullable<JobRecord["error"]>,
  missing?: { files: readonly number[]; missing: readonly number[] },
): Promise<void> {
  const now = Date.now();
  const gone = new Set(missing?.missing ?? []);
  await store.update(
    jobId,
    {
      state: "FAILED",
      endedAt: now,
      error,
      ...(missing !== undefined
        ? {
            files: missing.files.map((fileId) => ({
              fileId,
              state: gone.has(fileId) ? "FAILED" : "PENDING",
              sizeBytes: 0,
              bytesDone: 0,
              entryName: entryNameFor(fileId),
            })),
          }
        : {}),
    },
    {
      from: ["QUEUED", "PROCESSING"],
      ...(started ? {} : { addAttempts: 1, ifAbsent: { startedAt: now } }),
    },
  );
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

/** ZIP entry names: the source's `filename` metadata when safe and unique, else file-<id>. */
function toEntries(sources: readonly SourceInfo[]): BundleEntry[] {
  const used = new Set<string>();
  return sources.map((s) => {
    const wanted = s.fileName
      // biome-ignore lint/suspicious/noControlCharactersInRegex: control characters are what it removes
      ?.replace(/[\\/\x00-\x1f]/g, "_")
      .replace(/^\.+/, "_")
      .slice(0, 200);
    let name = wanted !== undefined && wanted !== "" ? wanted : entryNameFor(s.fileId);
    if (used.has(name)) name = `${s.fileId}-${name}`;
    used.add(name);
    return { ...s, entryName: name };
  });
}

function resultFileName(rec: JobRecord): string {
  const day = new Date(rec.createdAt).toISOString().slice(0, 10);
  return `download-${day}-${rec.id.slice(0, 8)}.zip`;
}

/**
 * Keeps the job's progress and writes it to Redis at most once per interval (and once
 * at each file boundary that the interval allows), never two writes at a time.
 */
class ProgressTracker {
  files: FileProgress[];
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
    private readonly write: (patch: Partial<JobRecord>) => Promise<void>,
  ) {
    this.files = rec.files.map((f) => ({ ...f, state: "PENDING", bytesDone: 0 }));
    this.progress = { ...rec.progress, filesDone: 0, bytesDone: 0, bytesPerSecond: 0 };
  }

  fileStarted(i: number): void {
    const f = this.files[i];
    if (f) f.state = "IN_PROGRESS";
    this.touch();
  }

  addBytes(i: number, n: number): void {
    const f = this.files[i];
    if (f) f.bytesDone += n;
    this.progress.bytesDone += n;
    this.rateWindowBytes += n;
    this.touch();
  }

  fileDone(i: number): void {
    const f = this.files[i];
    if (f) f.state = "DONE";
    this.progress.filesDone += 1;
    this.touch();
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

  private snapshot(): Partial<JobRecord> {
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
    return { progress: { ...this.progress }, files: this.files.map((f) => ({ ...f })) };
  }

  private async flush(): Promise<void> {
    if (this.inFlight) await this.inFlight;
    if (!this.dirty) return;
    this.dirty = false;
    this.lastWrite = Date.now();
    this.inFlight = this.write(this.snapshot()).finally(() => {
      this.inFlight = undefined;
    });
    await this.inFlight;
  }

  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer !== undefined) clearTimeout(this.timer);
    this.timer = undefined;
    if (this.inFlight) await this.inFlight;
  }
}
