import { createHash } from "node:crypto";
import type { Readable } from "node:stream";
import { crc32 } from "node:zlib";
import type { UploadState } from "../core/jobs.js";
import type { Storage } from "../core/storage.js";
import { type BundleEntry, Meter } from "./bundle.js";
import {
  type OpenRange,
  ReadAhead,
  type ReadAheadOptions,
  type ReadAheadStats,
} from "./read-ahead.js";
import { StoredZipLayout } from "./stored-zip.js";

// The stored ZIP (ZIP_LEVEL=0) written part by part into a multipart upload this module
// drives itself, so that a run that takes over a crashed one can go on from the last
// part uploaded instead of from byte 0 (issue 11 item 7). The layout is known in advance
// (worker/stored-zip.ts), so the archive's bytes from any offset on follow from the
// sources and two things known at that offset: the CRC-32 of the entry being written,
// and the CRC-32s of the entries before it (the per-file state keeps them). At every
// part boundary the first is noted; once every
// part up to a boundary is uploaded, `onDurable` hands the run an UploadState to keep in
// the job record (a fenced write). A later run checks that S3 still holds those parts
// (ListParts) and that the layout is the same (names, sizes, times, ETags of the
// sources), and continues; otherwise it starts over, saying why. The archive's SHA-256
// is hashed on the way by Node's native SHA-256 (a resumable one in WebAssembly was
// several times slower, and would have bounded the throughput); a run that resumed reads
// its completed object back once to hash it whole.

/** Everything a run needs to continue an upload from the end of its durable parts. */
export interface ResumePlan {
  state: UploadState;
  /** Archive offset where the run continues (parts × part size). */
  offset: number;
  /** CRC-32 of every entry that ends before `offset`. */
  crcs: (number | undefined)[];
}

export interface StoredBundleOptions {
  partBytes: number;
  queueSize: number;
  read: Omit<ReadAheadOptions, "signal" | "from">;
  signal: AbortSignal;
  /** Demo throttle on source reads; 0 = off. */
  throttleBytesPerSecond: number;
  resume?: ResumePlan;
  onFileStart(index: number): void;
  onBytes(index: number, bytes: number): void;
  onFileDone(index: number, crc: number): void;
  /** Parts 1..n are uploaded: what a later run needs to continue after them. */
  onDurable(state: UploadState): void;
  /** Whether to leave the upload for a later run after a failure (else it is aborted). */
  keepUpload(err: unknown): boolean;
}

export interface StoredBundleResult {
  key: string;
  sizeBytes: number;
  sha256: string;
  read: ReadAheadStats;
  /** Where this run started in the archive (0 unless it resumed). */
  resumedAt: number;
}

const MiB = 1024 * 1024;
/** S3 allows at most 10,000 parts. */
const MAX_PARTS = 10_000;

/** The archive's layout for `entries`. */
export function storedLayout(entries: readonly BundleEntry[]): StoredZipLayout {
  return new StoredZipLayout(
    entries.map((e) => ({ name: e.entryName, size: e.sizeBytes, mtime: e.lastModified })),
  );
}

/** The part size for an archive: the configured one, larger where 10,000 would not do. */
export function partSizeFor(layout: StoredZipLayout, partBytes: number): number {
  const least = Math.ceil(layout.size / MAX_PARTS / MiB) * MiB;
  return Math.max(partBytes, least);
}

/** What makes two runs' archives the same byte for byte (or not). */
export function layoutDigest(entries: readonly BundleEntry[], partSize: number): string {
  const h = createHash("sha256");
  h.update(String(partSize));
  for (const e of entries) {
    h.update(`\0${e.entryName}\0${e.sizeBytes}\0${e.lastModified ?? ""}\0${e.etag ?? ""}`);
  }
  return h.digest("base64url");
}

/**
 * Whether `prior` (the upload a previous run of the job left in the record) can be
 * continued: same layout, every entry before its end has a known CRC, and S3 still holds
 * its parts with the ETags recorded. A reason when not.
 */
export async function planResume(
  storage: Storage,
  entries: readonly BundleEntry[],
  prior: UploadState | undefined,
  crcs: readonly (number | undefined)[],
  partBytes: number,
): Promise<ResumePlan | { reason: string }> {
  if (prior === undefined || prior.parts.length === 0) return { reason: "no part uploaded yet" };
  const layout = storedLayout(entries);
  const partSize = partSizeFor(layout, partBytes);
  if (prior.partSize !== partSize || prior.layout !== layoutDigest(entries, partSize)) {
    return { reason: "the sources or the part size changed since the upload began" };
  }
  const offset = prior.parts.length * partSize;
  if (offset >= layout.size) return { reason: "the recorded parts cover the whole archive" };
  const at = layout.locate(offset);
  const before = Math.min(at.entry, entries.length);
  const known: (number | undefined)[] = [];
  for (let i = 0; i < before; i++) {
    if (crcs[i] === undefined) return { reason: `the CRC-32 of entry ${i} was not recorded` };
    known.push(crcs[i]);
  }
  let held: Map<number, string>;
  try {
    held = await storage.listResultParts(prior.key, prior.uploadId);
  } catch (err) {
    return { reason: `S3 no longer has the upload: ${(err as Error).message}` };
  }
  for (const [i, etag] of prior.parts.entries()) {
    if (held.get(i + 1) !== etag) return { reason: `part ${i + 1} is missing or was replaced` };
  }
  return { state: prior, offset, crcs: known };
}

async function sha256Of(body: Readable): Promise<string> {
  const h = createHash("sha256");
  for await (const chunk of body) h.update(chunk as Buffer);
  return h.digest("hex");
}

export async function bundleStored(
  storage: Storage,
  entries: readonly BundleEntry[],
  target: { key: string; fileName: string },
  opts: StoredBundleOptions,
): Promise<StoredBundleResult> {
  const { signal } = opts;
  signal.throwIfAborted();
  const layout = storedLayout(entries);
  const partSize = partSizeFor(layout, opts.partBytes);
  const digest = layoutDigest(entries, partSize);
  const resume = opts.resume;
  // A resumed run cannot hash bytes it did not write: it hashes the object at the end.
  const hash = resume === undefined ? createHash("sha256") : undefined;
  const key = resume?.state.key ?? target.key;
  const uploadId =
    resume?.state.uploadId ?? (await storage.createResultUpload(key, target.fileName));
  const etags: string[] = resume ? [...resume.state.parts] : [];
  const startAt = resume?.offset ?? 0;
  const crcs: (number | undefined)[] = resume ? [...resume.crcs] : [];
  const pos = layout.locate(startAt);

  const readFrom =
    pos.part === "header"
      ? { entry: pos.entry, offset: 0 }
      : pos.part === "data"
        ? { entry: pos.entry, offset: pos.within }
        : { entry: pos.entry + 1, offset: 0 };
  const open: OpenRange = (source, range, s) => storage.getSourceRange(source.key, range, s);
  const reader = new ReadAhead(entries, open, { ...opts.read, signal, from: readFrom });

  // The part being filled, the parts in flight, and what is known at each boundary. A
  // part is copied into a buffer of its own, reused once its upload is over: at most
  // queueSize + 1 of them ever exist, and the sources' chunks are free at once (slices
  // kept until a part is full would hold their sockets' larger buffers, and each part's
  // concatenation would be 8 MiB of garbage).
  const spare: Buffer[] = [];
  let part: Buffer | undefined;
  let fill = 0;
  let offset = startAt;
  let crc = 0;
  let durable = etags.length;
  const boundaries = new Map<number, { crc: number }>();
  const inFlight = new Set<Promise<void>>();
  let uploadFailure: unknown;

  const sendPart = (n: number, buffer: Buffer, length: number) => {
    const body = length === buffer.length ? buffer : buffer.subarray(0, length);
    const p = storage.uploadResultPart(key, uploadId, n, body, signal).then(
      (etag) => {
        etags[n - 1] = etag;
        // Durable: parts 1..k all uploaded. Report the furthest such boundary.
        let moved = false;
        while (etags[durable] !== undefined) {
          durable += 1;
          moved = true;
        }
        if (moved && durable < Math.ceil(layout.size / partSize)) {
          const b = boundaries.get(durable);
          if (b !== undefined) {
            opts.onDurable({
              key,
              uploadId,
              partSize,
              parts: etags.slice(0, durable),
              crc: b.crc,
              layout: digest,
            });
          }
        }
        for (const n2 of boundaries.keys()) if (n2 < durable) boundaries.delete(n2);
      },
      (err: unknown) => {
        uploadFailure ??= err;
      },
    );
    const tracked = p.finally(() => {
      inFlight.delete(tracked);
      spare.push(buffer);
    });
    inFlight.add(tracked);
  };

  /** Ends the part being filled (its number follows from the offset). */
  const endPart = async () => {
    const n = Math.ceil(offset / partSize);
    const buffer = part as Buffer;
    const length = fill;
    part = undefined;
    fill = 0;
    if (offset % partSize === 0) {
      boundaries.set(n, { crc });
    }
    sendPart(n, buffer, length);
    while (inFlight.size >= opts.queueSize) await Promise.race(inFlight);
    if (uploadFailure !== undefined) throw uploadFailure;
    signal.throwIfAborted();
  };

  /** Appends archive bytes; `data` bytes count into the entry's CRC-32. */
  const emit = async (buf: Buffer, data: boolean) => {
    let rest = buf;
    while (rest.length > 0) {
      const take = Math.min(partSize - fill, rest.length);
      const slice = take === rest.length ? rest : rest.subarray(0, take);
      rest = rest.subarray(take);
      if (data) crc = crc32(slice, crc);
      hash?.update(slice);
      part ??= spare.pop() ?? Buffer.allocUnsafeSlow(partSize);
      slice.copy(part, fill);
      fill += take;
      offset += take;
      if (fill === partSize) await endPart();
    }
  };

  try {
    reader.start();
    for (let i = pos.entry; i < entries.length; i++) {
      const resumedHere = i === pos.entry && startAt > 0;
      crc = resumedHere && pos.part !== "header" ? (resume?.state.crc ?? 0) : 0;
      const header = layout.localHeader(i);
      if (!resumedHere || pos.part === "header") {
        await emit(resumedHere ? header.subarray(pos.within) : header, false);
      }
      opts.onFileStart(i);
      if (!resumedHere || pos.part !== "descriptor") {
        const body = reader.stream(i);
        const meter = new Meter((n) => opts.onBytes(i, n), opts.throttleBytesPerSecond, signal);
        body.on("error", (err: Error) => meter.destroy(err));
        body.pipe(meter);
        for await (const chunk of meter) await emit(chunk as Buffer, true);
      }
      if (offset !== layout.descriptorStart(i) && !(resumedHere && pos.part === "descriptor")) {
        throw new Error(`entry ${i} ended at ${offset}, expected ${layout.descriptorStart(i)}`);
      }
      const descriptor = layout.descriptor(i, crc);
      await emit(
        resumedHere && pos.part === "descriptor" ? descriptor.subarray(pos.within) : descriptor,
        false,
      );
      crcs[i] = crc;
      opts.onFileDone(i, crc);
    }
    let skip = pos.part === "end" ? pos.within : 0;
    for (const slice of layout.end((i) => crcs[i] as number)) {
      const out = skip >= slice.length ? Buffer.alloc(0) : slice.subarray(skip);
      skip = Math.max(0, skip - slice.length);
      if (out.length > 0) await emit(out, false);
    }
    if (offset !== layout.size)
      throw new Error(`archive ended at ${offset}, expected ${layout.size}`);
    if (fill > 0) await endPart();
    while (inFlight.size > 0) await Promise.race(inFlight);
    if (uploadFailure !== undefined) throw uploadFailure;
    signal.throwIfAborted();
    await storage.completeResultUpload(key, uploadId, etags);
    return {
      key,
      sizeBytes: layout.size,
      sha256: hash?.digest("hex") ?? (await sha256Of(await storage.openResult(key, signal))),
      read: reader.stats,
      resumedAt: startAt,
    };
  } catch (err) {
    reader.close(err instanceof Error ? err : new Error(String(err)));
    await Promise.allSettled([...inFlight]);
    const cause = signal.aborted ? signal.reason : (reader.failed ?? err);
    if (!opts.keepUpload(cause)) {
      await storage.abortResultUpload(key, uploadId).catch(() => undefined);
    }
    throw reader.failed ?? err;
  } finally {
    reader.close();
  }
}
