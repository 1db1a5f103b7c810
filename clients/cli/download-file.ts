import { createHash } from "node:crypto";
import { createWriteStream } from "node:fs";
import { link, rename, stat, unlink } from "node:fs/promises";
import { Readable, Transform } from "node:stream";
import { pipeline } from "node:stream/promises";
import type { ReadableStream as WebReadableStream } from "node:stream/web";

// Saves a presigned URL to a file, checking the bytes against the job's SHA-256. The
// bytes go to a temporary file next to the target first, so a failed or corrupt
// download never leaves a file under the name the user asked for.

export class FileExistsError extends Error {
  override name = "FileExistsError";
}

export class DownloadError extends Error {
  override name = "DownloadError";
}

export interface DownloadOptions {
  expectedSha256: string;
  /** Replace an existing file. Without it an existing file is never touched. */
  force: boolean;
  signal?: AbortSignal;
  onProgress?: (bytesDone: number, bytesTotal: number) => void;
}

export async function downloadToFile(
  url: string,
  path: string,
  opts: DownloadOptions,
): Promise<{ bytes: number; sha256: string }> {
  if (!opts.force && (await exists(path))) {
    throw new FileExistsError(
      `${path} already exists: pass --force to overwrite it, or -o to choose another file`,
    );
  }
  const res = await fetch(url, opts.signal !== undefined ? { signal: opts.signal } : {});
  if (!res.ok || res.body === null) {
    throw new DownloadError(
      `download failed: HTTP ${res.status}${res.status === 403 ? " (the link may have expired: run the command again for a fresh one)" : ""}`,
    );
  }
  const total = Number(res.headers.get("content-length") ?? 0);
  const hash = createHash("sha256");
  let bytes = 0;
  const meter = new Transform({
    transform(chunk: Buffer, _enc, done) {
      hash.update(chunk);
      bytes += chunk.length;
      opts.onProgress?.(bytes, total);
      done(null, chunk);
    },
  });
  const part = `${path}.part-${process.pid}`;
  try {
    await pipeline(
      Readable.fromWeb(res.body as WebReadableStream<Uint8Array>),
      meter,
      createWriteStream(part, { flags: "wx" }),
    );
    const sha256 = hash.digest("hex");
    if (sha256 !== opts.expectedSha256.toLowerCase()) {
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
    return { bytes, sha256 };
  } catch (err) {
    await unlink(part).catch(() => undefined);
    throw err;
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
