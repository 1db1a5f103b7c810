import { createHash, type Hash } from "node:crypto";
import { createReadStream } from "node:fs";
import { link, open, readFile, rename, stat, unlink, writeFile } from "node:fs/promises";

// Saves a job's ZIP to a file, checking the bytes against the job's SHA-256. The bytes go
// to `<file>.part` next to the target first, so a failed or corrupt download never leaves
// a file under the name the user asked for. An interrupted transfer resumes where it
// stopped: the next request asks for the bytes after those already saved (Range) of the
// same object (If-Match with the ETag of the first answer), in this run after a broken
// connection, or in the next run of the command (`<file>.part.json` remembers which ZIP
// the part belongs to). A URL that expired meanwhile is replaced by a fresh one
// (freshUrl), and the SHA-256 still covers every byte: the saved part is hashed from
// disk, the rest as it arrives.

export class FileExistsError extends Error {
  override name = "FileExistsError";
}

export class DownloadError extends Error {
  override name = "DownloadError";
}

export interface DownloadOptions {
  expectedSha256: string;
  /** The ZIP's size (result.size_bytes), for progress and to tell a complete part. */
  expectedBytes?: number;
  /** Replace an existing file. Without it an existing file is never touched. */
  force: boolean;
  signal?: AbortSignal;
  onProgress?: (bytesDone: number, bytesTotal: number) => void;
  /** A fresh URL of the same ZIP, for when the one in hand has expired (403). */
  freshUrl?: () => Promise<string>;
  /** Said once per resumed or restarted transfer (for a line on stderr). */
  onNote?: (text: string) => void;
  /** Broken transfers retried in a row before giving up (default 5). */
  attempts?: number;
  /** Wait before a retry, doubled each time (default 500 ms). */
  retryDelayMs?: number;
}

/** What `<file>.part.json` says of the part next to it. */
interface PartInfo {
  sha256: string;
  etag?: string;
}

/** Why a transfer stopped early: retried from where it stopped. */
class Interrupted extends Error {}

export async function downloadToFile(
  url: string,
  path: string,
  opts: DownloadOptions,
): Promise<{ bytes: number; sha256: string; resumedFrom: number }> {
  if (!opts.force && (await exists(path))) {
    throw new FileExistsError(
      `${path} already exists: pass --force to overwrite it, or -o to choose another file`,
    );
  }
  const part = `${path}.part`;
  const infoFile = `${part}.json`;
  const want = opts.expectedSha256.toLowerCase();
  const total = opts.expectedBytes ?? 0;
  const note = opts.onNote ?? (() => undefined);

  // A part left by an earlier run of the same ZIP is kept; anything else starts over.
  const info = await readInfo(infoFile);
  let have = info?.sha256 === want ? await sizeOf(part) : 0;
  let etag = have > 0 ? info?.etag : undefined;
  let hash: Hash = createHash("sha256");
  if (have > 0) {
    hash = await hashFile(part);
    note(`resuming: ${have} bytes were saved by an earlier run`);
  } else {
    await writeFile(part, "");
  }
  const resumedFrom = have;
  const restart = async (why: string) => {
    note(`starting over: ${why}`);
    have = 0;
    etag = undefined;
    hash = createHash("sha256");
    await writeFile(part, "");
  };

  let current = url;
  let failures = 0;
  let refreshes = 0;
  const maxFailures = opts.attempts ?? 5;
  for (;;) {
    opts.signal?.throwIfAborted();
    if (total > 0 && have === total) break;
    const headers: Record<string, string> = {};
    if (have > 0) {
      headers.range = `bytes=${have}-`;
      if (etag !== undefined) headers["if-match"] = etag;
    }
    let res: Response;
    try {
      res = await fetch(current, {
        headers,
        ...(opts.signal !== undefined ? { signal: opts.signal } : {}),
      });
    } catch (err) {
      if (opts.signal?.aborted) throw err;
      failures = await retry(failures, maxFailures, opts, note, err);
      continue;
    }
    if (
      (res.status === 403 || res.status === 401) &&
      opts.freshUrl !== undefined &&
      refreshes < 3
    ) {
      // A presigned URL that expired: S3 says 403. Ask the API for a fresh one.
      await res.body?.cancel();
      refreshes += 1;
      note("the download URL expired: asking for a fresh one");
      current = await opts.freshUrl();
      continue;
    }
    if (res.status === 412) {
      await res.body?.cancel();
      await restart("the ZIP changed since the part was saved (If-Match failed)");
      continue;
    }
    if (res.status === 416 && have > 0) {
      // Nothing after what is saved: the checksum below says whether it is the ZIP.
      await res.body?.cancel();
      break;
    }
    if (!res.ok || res.body === null) {
      await res.body?.cancel();
      throw new DownloadError(
        `download failed: HTTP ${res.status}${res.status === 403 ? " (the link may have expired: run the command again for a fresh one)" : ""}`,
      );
    }
    refreshes = 0;
    const answeredEtag = res.headers.get("etag") ?? undefined;
    if (have > 0) {
      const from = /^bytes (\d+)-/.exec(res.headers.get("content-range") ?? "")?.[1];
      const sameObject = etag === undefined || answeredEtag === undefined || answeredEtag === etag;
      if (res.status !== 206 || Number(from) !== have || !sameObject) {
        await res.body.cancel();
        await restart(
          res.status !== 206
            ? "the server sent the whole ZIP instead of the rest"
            : "the server sent another object or range",
        );
        continue;
      }
      note(`resuming at byte ${have}`);
    }
    etag ??= answeredEtag;
    await writeFile(
      infoFile,
      JSON.stringify({ sha256: want, ...(etag !== undefined ? { etag } : {}) }),
    );
    try {
      await appendBody(res.body, part, hash, (n) => {
        // Each chunk is on disk before it counts, so a break leaves exactly `have` saved.
        have += n;
        opts.onProgress?.(have, total);
      });
      // The whole answer arrived (fetch fails one shorter than its Content-Length): what
      // is saved is the object, and the checksum says whether it is the ZIP.
      break;
    } catch (err) {
      if (opts.signal?.aborted) throw err;
      failures = await retry(failures, maxFailures, opts, note, err);
    }
  }

  const sha256 = hash.digest("hex");
  if (sha256 !== want) {
    await unlink(part).catch(() => undefined);
    await unlink(infoFile).catch(() => undefined);
    throw new DownloadError(
      `checksum mismatch: got sha256 ${sha256}, the job says ${opts.expectedSha256}; nothing was saved`,
    );
  }
  if (opts.force) {
    await rename(part, path);
  } else {
    // link() fails if the name was taken meanwhile: never clobber without --force.
    await link(part, path).catch((err: NodeJS.ErrnoException) => {
      if (err.code === "EEXIST")
        throw new FileExistsError(
          `${path} appeared during the download: pass --force to overwrite it`,
        );
      throw err;
    });
    await unlink(part);
  }
  await unlink(infoFile).catch(() => undefined);
  return { bytes: have, sha256, resumedFrom };
}

/** Counts a broken transfer; throws once too many broke in a row, else waits and returns. */
async function retry(
  failures: number,
  max: number,
  opts: DownloadOptions,
  note: (text: string) => void,
  err: unknown,
): Promise<number> {
  const n = failures + 1;
  const why =
    err instanceof Error && !(err instanceof Interrupted) && err.cause instanceof Error
      ? err.cause.message
      : err instanceof Error
        ? err.message
        : String(err);
  if (n >= max) {
    throw new DownloadError(
      `download interrupted ${n} times (last: ${why}); run the command again to resume where it stopped`,
    );
  }
  note(`transfer interrupted (${why}); retrying`);
  await new Promise((r) => setTimeout(r, (opts.retryDelayMs ?? 500) * 2 ** (n - 1)));
  return n;
}

/** Appends the body to the part, hashing as it goes; `saved` is told of each chunk on disk. */
async function appendBody(
  body: ReadableStream<Uint8Array>,
  part: string,
  hash: Hash,
  saved: (bytes: number) => void,
): Promise<void> {
  const fh = await open(part, "a");
  let n = 0;
  try {
    for await (const chunk of body as unknown as AsyncIterable<Uint8Array>) {
      await fh.write(chunk);
      hash.update(chunk);
      n += chunk.length;
      saved(chunk.length);
    }
  } catch (err) {
    throw new Interrupted(`connection broke after ${n} bytes of this answer`, { cause: err });
  } finally {
    await fh.close();
  }
}

async function hashFile(path: string): Promise<Hash> {
  const hash = createHash("sha256");
  for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer);
  return hash;
}

async function readInfo(path: string): Promise<PartInfo | undefined> {
  try {
    const v = JSON.parse(await readFile(path, "utf8")) as PartInfo;
    return typeof v.sha256 === "string" ? v : undefined;
  } catch {
    return undefined;
  }
}

async function sizeOf(path: string): Promise<number> {
  try {
    return (await stat(path)).size;
  } catch {
    return 0;
  }
}

async function exists(path: string): Promise<boolean> {
  try {
    await stat(path);
    return true;
  } catch {
    return false;
  }
}
