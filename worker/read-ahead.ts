import { Readable } from "node:stream";
import { setTimeout as sleep } from "node:timers/promises";
import { classifyS3Error, SourceError, StallError } from "../core/s3-errors.js";
import type { SourceInfo, SourceRange } from "../core/storage.js";

// Reads the sources ahead of the ZIP, so the archive never waits for a first byte: at
// real S3 a GET answers after tens of ms, and one connection carries tens of MB/s, so
// reading one object after another leaves the link idle most of the time. Objects are
// cut into segments (whole small objects, ranges of large ones) fetched in file order,
// several at once, into a window bounded in segments and in bytes; the ZIP consumes them
// in order through one Readable per file. Memory stays bounded by the window (plus one
// slack for the segment being written) whatever the number or size of files.
//
// Each segment is read with its own deadline and retries: a body that sends nothing for
// `stallMs` is dropped and read again from the byte where it stopped (a ranged GET with
// If-Match on the ETag, so a changed object fails instead of mixing versions). A
// throttled answer (SlowDown) halves the number of segments read at once; it grows back
// by one per segment read without trouble.

export interface ReadAheadOptions {
  /** Bytes read but not yet in the ZIP, at most (the segment being written may add `HEAD_SLACK`). */
  windowBytes: number;
  /** Segments open at once, at most. */
  windowObjects: number;
  /** Objects larger than this are read as parallel ranges of this size. */
  rangeBytes: number;
  /** A body that sends nothing for this long is abandoned and resumed; 0 = never. */
  stallMs: number;
  /** Tries per segment before the job attempt fails (transient failures only). */
  attempts: number;
  /** Base of the exponential backoff between tries (full jitter). */
  backoffMs: number;
  signal: AbortSignal;
  /**
   * Where to start (a run that continues a crashed one's upload): entries before `entry`
   * are not read at all, and `entry` from byte `offset` on. Default: the first byte.
   */
  from?: { entry: number; offset: number };
  /** Something went wrong and is being retried (for logs and metrics). */
  onRetry?(info: { fileId: number; attempt: number; reason: string; throttled: boolean }): void;
}

export type OpenRange = (
  source: SourceInfo,
  range: SourceRange,
  signal: AbortSignal,
) => Promise<{ body: Readable; etag?: string }>;

/** The segment being written may buffer this much even when the window is full. */
const HEAD_SLACK = 1024 * 1024;
/** Segments read without trouble before the window grows by one again. */
const GROW_AFTER = 4;

interface Segment {
  entry: number;
  start: number;
  /** Exclusive. */
  end: number;
  chunks: Buffer[];
  buffered: number;
  done: boolean;
  error: Error | undefined;
  /** Wakes the consumer waiting for this segment. */
  notify: (() => void) | undefined;
}

export interface ReadAheadStats {
  segments: number;
  retries: number;
  throttled: number;
  stalls: number;
  resumedBytes: number;
  peakBufferedBytes: number;
  peakOpen: number;
  /** The smallest the window (in segments) became after SlowDowns. */
  smallestWindow: number;
}

export class ReadAhead {
  private readonly segments: Segment[] = [];
  /** First segment of each entry, and one past the last entry. */
  private readonly firstSegment: number[] = [];
  private started = 0;
  private consumed = 0;
  private buffered = 0;
  /** The window in segments, shrunk by SlowDown and grown back by success. */
  private limit: number;
  private sinceTrouble = 0;
  private readonly roomWaiters = new Set<() => void>();
  private readonly internal = new AbortController();
  /** The first failure; every stream fails with it. */
  private failure: Error | undefined;
  private readonly signal: AbortSignal;
  readonly stats: ReadAheadStats = {
    segments: 0,
    retries: 0,
    throttled: 0,
    stalls: 0,
    resumedBytes: 0,
    peakBufferedBytes: 0,
    peakOpen: 0,
    smallestWindow: 0,
  };

  constructor(
    private readonly sources: readonly SourceInfo[],
    private readonly open: OpenRange,
    private readonly opts: ReadAheadOptions,
  ) {
    this.limit = Math.max(1, opts.windowObjects);
    this.stats.smallestWindow = this.limit;
    this.signal = AbortSignal.any([opts.signal, this.internal.signal]);
    const range = Math.max(1, opts.rangeBytes);
    const from = opts.from ?? { entry: 0, offset: 0 };
    for (const [entry, s] of sources.entries()) {
      this.firstSegment.push(this.segments.length);
      if (entry < from.entry) continue;
      const first = entry === from.entry ? Math.min(from.offset, s.sizeBytes) : 0;
      const size = s.sizeBytes - first;
      if (size === 0) continue;
      // Small objects in one GET; large ones in ranges (the last may be up to 2x range).
      const pieces = size <= 2 * range ? 1 : Math.floor(size / range);
      for (let i = 0; i < pieces; i++) {
        this.segments.push({
          entry,
          start: first + i * range,
          end: i === pieces - 1 ? s.sizeBytes : first + (i + 1) * range,
          chunks: [],
          buffered: 0,
          done: false,
          error: undefined,
          notify: undefined,
        });
      }
    }
    this.firstSegment.push(this.segments.length);
    this.stats.segments = this.segments.length;
  }

  /** Starts reading; call once, before the first `stream()`. */
  start(): void {
    this.pump();
  }

  /** Why the read stopped, if a source failed. */
  get failed(): Error | undefined {
    return this.failure;
  }

  private fail(err: Error): void {
    this.failure ??= err;
    this.internal.abort(err);
    for (const s of this.segments) s.notify?.();
  }

  /** Stops every read in flight and frees what is buffered. */
  close(reason?: Error): void {
    this.internal.abort(reason ?? new Error("read-ahead closed"));
    for (const s of this.segments) {
      s.chunks = [];
      s.buffered = 0;
    }
    this.buffered = 0;
    for (const wake of this.roomWaiters) wake();
  }

  /** The bytes of entry `index`, in order. Entries must be consumed in order. */
  stream(index: number): Readable {
    let seg = this.firstSegment[index] as number;
    const last = this.firstSegment[index + 1] as number;
    // Node calls read() once and not again until something is pushed: a pull that finds
    // nothing leaves `wanted` set, and the segment's notify pulls again.
    let wanted = false;
    const pull = () => {
      while (wanted) {
        if (seg >= last) {
          wanted = false;
          out.push(null);
          return;
        }
        const s = this.segments[seg] as Segment;
        const error = this.failure ?? s.error;
        if (error !== undefined) {
          wanted = false;
          out.destroy(error);
          return;
        }
        const chunk = s.chunks.shift();
        if (chunk !== undefined) {
          s.buffered -= chunk.length;
          this.buffered -= chunk.length;
          wanted = out.push(chunk);
          this.wakeRoom();
          continue;
        }
        if (s.done) {
          seg += 1;
          this.consumed += 1;
          this.pump();
          continue;
        }
        s.notify = () => {
          s.notify = undefined;
          pull();
        };
        return;
      }
    };
    const out = new Readable({
      highWaterMark: 64 * 1024,
      read: () => {
        wanted = true;
        pull();
      },
    });
    return out;
  }

  private pump(): void {
    while (this.started < this.segments.length && !this.signal.aborted) {
      const open = this.started - this.consumed;
      // The segment the ZIP is waiting for always starts, whatever the window says.
      if (open > 0 && (open >= this.limit || this.buffered >= this.opts.windowBytes)) return;
      const index = this.started++;
      this.stats.peakOpen = Math.max(this.stats.peakOpen, open + 1);
      void this.read(index);
    }
  }

  private wakeRoom(): void {
    for (const wake of this.roomWaiters) wake();
    this.roomWaiters.clear();
    this.pump();
  }

  private hasRoom(index: number, s: Segment): boolean {
    if (this.buffered < this.opts.windowBytes) return true;
    return index === this.consumed && s.buffered < HEAD_SLACK;
  }

  private async waitForRoom(index: number, s: Segment): Promise<void> {
    while (!this.hasRoom(index, s) && !this.signal.aborted) {
      await new Promise<void>((ok) => this.roomWaiters.add(ok));
    }
  }

  private async read(index: number): Promise<void> {
    const s = this.segments[index] as Segment;
    const source = this.sources[s.entry] as SourceInfo;
    let at = s.start;
    let attempt = 0;
    let trouble = false;
    try {
      while (at < s.end) {
        this.signal.throwIfAborted();
        attempt += 1;
        if (at > s.start) this.stats.resumedBytes += s.end - at;
        try {
          const { body } = await this.open(
            source,
            { start: at, end: s.end - 1, etag: source.etag },
            this.signal,
          );
          for await (const chunk of this.watch(body)) {
            const buf = chunk as Buffer;
            if (at >= s.end) continue;
            // A server that sends more than asked would shift every later byte.
            const part = at + buf.length > s.end ? buf.subarray(0, s.end - at) : buf;
            s.chunks.push(part);
            s.buffered += part.length;
            this.buffered += part.length;
            this.stats.peakBufferedBytes = Math.max(this.stats.peakBufferedBytes, this.buffered);
            at += part.length;
            s.notify?.();
            if (at < s.end && !this.hasRoom(index, s)) await this.waitForRoom(index, s);
            this.signal.throwIfAborted();
          }
          if (at < s.end)
            throw Object.assign(new Error("body ended early"), { code: "ECONNRESET" });
        } catch (err) {
          if (this.signal.aborted) throw err;
          const failure = classifyS3Error(err);
          if (failure.permanent) {
            throw new SourceError(
              source.fileId,
              failure.code,
              false,
              `source file ${source.fileId} ${failure.reason}`,
              { cause: err },
            );
          }
          trouble = true;
          if (err instanceof StallError) this.stats.stalls += 1;
          if (failure.throttled) {
            this.stats.throttled += 1;
            this.limit = Math.max(1, Math.floor(this.limit / 2));
            this.stats.smallestWindow = Math.min(this.stats.smallestWindow, this.limit);
            this.sinceTrouble = 0;
          }
          if (attempt >= this.opts.attempts) {
            throw new SourceError(
              source.fileId,
              "unavailable",
              true,
              `source file ${source.fileId} could not be read after ${attempt} tries: ${failure.reason}`,
              { cause: err },
            );
          }
          this.stats.retries += 1;
          this.opts.onRetry?.({
            fileId: source.fileId,
            attempt,
            reason: failure.reason,
            throttled: failure.throttled,
          });
          // Full jitter: many readers throttled together must not come back together.
          const cap = this.opts.backoffMs * 2 ** Math.min(attempt - 1, 6);
          await sleep(Math.random() * cap, undefined, { signal: this.signal });
        }
      }
      s.done = true;
      if (!trouble && ++this.sinceTrouble >= GROW_AFTER && this.limit < this.opts.windowObjects) {
        this.limit += 1;
        this.sinceTrouble = 0;
      }
    } catch (err) {
      s.error = err instanceof Error ? err : new Error(String(err));
      // A failed segment ends the whole read: nothing after it can enter the ZIP.
      if (!this.signal.aborted) this.fail(s.error);
    }
    s.notify?.();
    this.pump();
  }

  /** The body's chunks, failing with StallError when none comes for `stallMs`. */
  private async *watch(body: Readable): AsyncGenerator<unknown> {
    const stallMs = this.opts.stallMs;
    let timer: NodeJS.Timeout | undefined;
    const arm = () => {
      if (stallMs <= 0) return;
      clearTimeout(timer);
      timer = setTimeout(
        () => body.destroy(new StallError(`no byte for ${stallMs} ms (S3_STALL_MS)`)),
        stallMs,
      );
    };
    const onAbort = () => body.destroy(this.signal.reason as Error);
    this.signal.addEventListener("abort", onAbort, { once: true });
    try {
      arm();
      for await (const chunk of body) {
        // Time spent waiting for room in the window is not the server's stall.
        clearTimeout(timer);
        yield chunk;
        arm();
      }
    } finally {
      clearTimeout(timer);
      this.signal.removeEventListener("abort", onAbort);
      if (!body.readableEnded) body.destroy();
    }
  }
}
