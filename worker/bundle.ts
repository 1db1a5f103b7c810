import { createHash } from "node:crypto";
import { once } from "node:events";
import { PassThrough, type Readable, Transform, type TransformCallback } from "node:stream";
import { setTimeout as sleep } from "node:timers/promises";
import { ZipArchive } from "archiver";
import type { UploadState } from "../core/jobs.js";
import { SourceError } from "../core/s3-errors.js";
import type { SourceInfo, Storage } from "../core/storage.js";
import { ReadAhead, type ReadAheadOptions, type ReadAheadStats } from "./read-ahead.js";
import { bundleStored, type ResumePlan } from "./stored-bundle.js";

// Sources -> streaming ZIP -> multipart upload, never holding a whole file in memory:
// memory is bounded by the read-ahead window plus the upload's part size times its
// queue size, whatever the bundle size. The sources are read ahead of the ZIP
// (worker/read-ahead.ts), entries stay in file order, and progress counts the bytes as
// they enter the ZIP. The ZIP bytes are hashed and counted on their way to the upload.

export interface BundleEntry extends SourceInfo {
  entryName: string;
}

export interface BundleOptions {
  /** 0 stores files as they are (fastest; most downloads are already compressed). */
  zipLevel: number;
  /** Demo throttle on source reads; 0 = off. */
  throttleBytesPerSecond: number;
  /** The read-ahead window and the reads' deadlines and retries. */
  read?: Partial<Omit<ReadAheadOptions, "signal">>;
  /** When the job must be done (ms since the epoch, MAX_JOB_SECONDS); 0 or unset = never. */
  deadlineAt?: number;
  signal: AbortSignal;
  /** Stored ZIPs only: continue a crashed run's upload (worker/stored-bundle.ts planResume). */
  resume?: ResumePlan;
  onFileStart(index: number): void;
  onBytes(index: number, bytes: number): void;
  /** `crc` is the entry's CRC-32 (stored ZIPs). */
  onFileDone(index: number, crc?: number): void;
  /** Stored ZIPs only: the upload so far, once its parts are safe (crash-resume). */
  onDurable?(state: UploadState): void;
  /**
   * Stored ZIPs only: whether a failed run leaves its multipart upload for a later run to
   * continue (default: it aborts it). Given the failure, or the abort's reason.
   */
  keepUpload?(err: unknown): boolean;
}

export interface BundleResult {
  /** The object written: the target's, or the resumed upload's. */
  key: string;
  sizeBytes: number;
  sha256: string;
  read: ReadAheadStats;
  /** Where in the archive this run began (0 unless it continued another's upload). */
  resumedAt: number;
}

/** The whole-job deadline passed; the message names the file the job was on. */
export class DeadlineExceededError extends SourceError {
  override name = "DeadlineExceededError";
}

/** Read-ahead defaults for callers that set none (the configuration's defaults). */
export const DEFAULT_READ: Omit<ReadAheadOptions, "signal"> = {
  windowBytes: 32 * 1024 * 1024,
  windowObjects: 16,
  rangeBytes: 8 * 1024 * 1024,
  stallMs: 10_000,
  attempts: 6,
  backoffMs: 100,
};

/** Counts and (optionally) paces the bytes of one source on their way into the ZIP. */
export class Meter extends Transform {
  private readonly started = Date.now();
  private seen = 0;

  constructor(
    private readonly onBytes: (n: number) => void,
    private readonly bytesPerSecond: number,
    private readonly signal: AbortSignal,
  ) {
    super();
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback): void {
    this.seen += chunk.length;
    this.onBytes(chunk.length);
    if (this.bytesPerSecond <= 0) {
      cb(null, chunk);
      return;
    }
    const dueMs = (this.seen / this.bytesPerSecond) * 1000 - (Date.now() - this.started);
    if (dueMs <= 1) {
      cb(null, chunk);
      return;
    }
    sleep(dueMs, undefined, { signal: this.signal }).then(
      () => cb(null, chunk),
      (err: unknown) => cb(err as Error),
    );
  }
}

/**
 * Hashes and counts the ZIP bytes; a real Readable for lib-storage (archiver's is not).
 * The counter must not be called `size`: lib-storage reads `Body.size` as the length.
 */
class Digest extends PassThrough {
  readonly hash = createHash("sha256");
  bytesWritten = 0;

  override _transform(chunk: Buffer, enc: BufferEncoding, cb: TransformCallback): void {
    this.hash.update(chunk);
    this.bytesWritten += chunk.length;
    super._transform(chunk, enc, cb);
  }
}

export function abortError(signal: AbortSignal): Error {
  const reason: unknown = signal.reason;
  return reason instanceof Error ? reason : new Error(String(reason ?? "aborted"));
}

export async function bundleToS3(
  storage: Storage,
  entries: readonly BundleEntry[],
  target: { key: string; fileName: string },
  opts: BundleOptions,
): Promise<BundleResult> {
  opts.signal.throwIfAborted();
  let at = 0;
  const deadline = new AbortController();
  const deadlineMs = opts.deadlineAt ? opts.deadlineAt - Date.now() : 0;
  const deadlineTimer =
    opts.deadlineAt !== undefined && opts.deadlineAt > 0
      ? setTimeout(
          () => {
            const entry = entries[at];
            const fileId = entry?.fileId ?? 0;
            deadline.abort(
              new DeadlineExceededError(
                fileId,
                "deadline_exceeded",
                false,
                `the job ran past its deadline (MAX_JOB_SECONDS) while on file ${fileId} ` +
                  `(${at + 1} of ${entries.length}): split it into smaller jobs, or raise the limit`,
              ),
            );
          },
          Math.max(0, deadlineMs),
        )
      : undefined;
  const signal = AbortSignal.any([opts.signal, deadline.signal]);
  if (opts.zipLevel === 0) {
    // Stored: the layout is known in advance, so the upload can be continued after a crash.
    try {
      return await bundleStored(storage, entries, target, {
        partBytes: storage.opts.uploadPartBytes,
        queueSize: storage.opts.uploadQueueSize,
        read: { ...DEFAULT_READ, ...opts.read },
        signal,
        throttleBytesPerSecond: opts.throttleBytesPerSecond,
        ...(opts.resume !== undefined ? { resume: opts.resume } : {}),
        onFileStart: (i) => {
          at = i;
          opts.onFileStart(i);
        },
        onBytes: opts.onBytes,
        onFileDone: opts.onFileDone,
        onDurable: (state) => opts.onDurable?.(state),
        keepUpload: (err) => opts.keepUpload?.(err) ?? false,
      });
    } catch (err) {
      if (opts.signal.aborted) throw abortError(opts.signal);
      if (deadline.signal.aborted) throw abortError(deadline.signal);
      throw err;
    } finally {
      clearTimeout(deadlineTimer);
    }
  }
  const reader = new ReadAhead(
    entries,
    (source, range, s) => storage.getSourceRange(source.key, range, s),
    { ...DEFAULT_READ, ...opts.read, signal },
  );
  const zip = new ZipArchive(
    opts.zipLevel === 0 ? { store: true } : { zlib: { level: opts.zipLevel } },
  );
  const digest = new Digest();
  zip.pipe(digest);
  const upload = storage.uploadResult(target.key, digest, target.fileName);
  // Start the upload before the ZIP is finalized, and observe its failure at once: an
  // abort otherwise surfaces as an unhandled rejection that kills the worker.
  const uploaded = upload.done();
  let uploadError: unknown;
  uploaded.catch((err: unknown) => {
    uploadError ??= err;
  });

  let zipError: Error | undefined;
  const zipFailed = rejectOnError(zip);
  zipFailed.catch((err: unknown) => {
    zipError ??= err as Error;
  });
  zip.on("warning", (err: Error) => {
    zipError ??= err;
  });

  let current: Readable | undefined;
  const onAbort = () => {
    reader.close(abortError(signal));
    current?.destroy(abortError(signal));
    zip.abort();
    digest.destroy(abortError(signal));
    upload.abort().catch(() => undefined);
  };
  signal.addEventListener("abort", onAbort, { once: true });

  try {
    reader.start();
    for (const [index, entry] of entries.entries()) {
      signal.throwIfAborted();
      at = index;
      opts.onFileStart(index);
      const body = reader.stream(index);
      const meter = new Meter((n) => opts.onBytes(index, n), opts.throttleBytesPerSecond, signal);
      current = body;
      body.on("error", (err: Error) => meter.destroy(err));
      body.pipe(meter);
      const finished = once(meter, "end");
      finished.catch(() => undefined);
      // archiver writes entries one at a time; the read-ahead keeps the next ones coming.
      const entered = once(zip, "entry");
      entered.catch(() => undefined);
      zip.append(meter, { name: entry.entryName });
      await Promise.race([entered, rejectOnError(meter), zipFailed]);
      await finished.catch(() => undefined);
      if (zipError) throw zipError;
      if (uploadError) throw uploadError;
      opts.onFileDone(index);
    }
    current = undefined;
    // archiver's finalize() never settles once zip.abort() has run (a cancel or the
    // deadline while the ZIP is being finished): without the race the bundle hangs.
    await Promise.race([zip.finalize(), zipFailed, rejectOnAbort(signal)]);
    await uploaded;
    if (zipError) throw zipError;
    return {
      key: target.key,
      sizeBytes: digest.bytesWritten,
      sha256: digest.hash.digest("hex"),
      read: reader.stats,
      resumedAt: 0,
    };
  } catch (err) {
    // A source that failed is the cause; the ZIP and upload errors it set off are not.
    const failed = reader.failed;
    const cause =
      failed instanceof SourceError
        ? failed
        : err instanceof SourceError
          ? err
          : signal.aborted
            ? abortError(signal)
            : err;
    if (!signal.aborted) onAbort();
    await uploaded.catch(() => undefined);
    if (opts.signal.aborted) throw abortError(opts.signal);
    if (deadline.signal.aborted) throw abortError(deadline.signal);
    throw cause instanceof SourceError ? cause : (uploadError ?? cause);
  } finally {
    clearTimeout(deadlineTimer);
    reader.close();
    signal.removeEventListener("abort", onAbort);
  }
}

function rejectOnAbort(signal: AbortSignal): Promise<never> {
  const aborted = new Promise<never>((_resolve, reject) => {
    if (signal.aborted) reject(abortError(signal));
    signal.addEventListener("abort", () => reject(abortError(signal)), { once: true });
  });
  aborted.catch(() => undefined);
  return aborted;
}

function rejectOnError(emitter: NodeJS.EventEmitter): Promise<never> {
  return new Promise((_resolve, reject) => {
    emitter.once("error", reject);
  });
}
