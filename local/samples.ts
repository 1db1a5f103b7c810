import { createCipheriv, createHash } from "node:crypto";
import { Readable } from "node:stream";
import { PutObjectCommand } from "@aws-sdk/client-s3";
import type { Storage } from "../core/storage.js";
import { SAMPLE_FILES, type SampleFile } from "./sample-files.js";

// Sample source files for the embedded default, tests and benchmarks: ten file ids with
// sizes from 1 MB to 50 MB. The bytes are a pure function of (file id, size), so a test
// can recompute any of them, and they are made as a stream: a 50 MB sample never sits in
// memory, neither here nor in the upload.

export { SAMPLE_FILE_IDS, SAMPLE_FILES, type SampleFile } from "./sample-files.js";

const CHUNK_BYTES = 64 * 1024;

/**
 * The deterministic bytes of a sample: an AES-256-CTR keystream keyed by the file id.
 * Fast (hundreds of MB/s), incompressible like real media, and different per file.
 */
export function sampleStream(fileId: number, sizeBytes: number): Readable {
  const key = createHash("sha256").update(`download-jobs sample ${fileId}`).digest();
  const cipher = createCipheriv("aes-256-ctr", key, Buffer.alloc(16));
  const zeros = Buffer.alloc(CHUNK_BYTES);
  let left = sizeBytes;
  return new Readable({
    highWaterMark: CHUNK_BYTES,
    read() {
      if (left <= 0) {
        this.push(null);
        return;
      }
      const n = Math.min(left, CHUNK_BYTES);
      left -= n;
      this.push(cipher.update(n === CHUNK_BYTES ? zeros : zeros.subarray(0, n)));
    },
  });
}

/** SHA-256 (hex) of a sample's bytes, computed from the stream. */
export async function sampleSha256(fileId: number, sizeBytes: number): Promise<string> {
  const hash = createHash("sha256");
  for await (const chunk of sampleStream(fileId, sizeBytes)) hash.update(chunk as Buffer);
  return hash.digest("hex");
}

export interface SeedResult {
  uploaded: number[];
  /** Already present with the right size. */
  skipped: number[];
}

/**
 * Puts each sample into the source bucket unless an object of the right size is already
 * there (a restart on the same data folder costs nothing).
 */
export async function seedSamples(
  storage: Storage,
  opts: { files?: readonly SampleFile[]; signal?: AbortSignal; log?: (line: string) => void } = {},
): Promise<SeedResult> {
  const result: SeedResult = { uploaded: [], skipped: [] };
  for (const file of opts.files ?? SAMPLE_FILES) {
    opts.signal?.throwIfAborted();
    const head = await storage.headSource(file.fileId, opts.signal);
    if (head !== undefined && head.sizeBytes === file.sizeBytes) {
      result.skipped.push(file.fileId);
      continue;
    }
    opts.log?.(
      `seeding file ${file.fileId} (${file.fileName}, ${(file.sizeBytes / 1e6).toFixed(0)} MB)`,
    );
    await storage.client.send(
      new PutObjectCommand({
        Bucket: storage.opts.sourceBucket,
        Key: storage.sourceKey(file.fileId),
        Body: sampleStream(file.fileId, file.sizeBytes),
        // A stream body needs its length up front: S3 PutObject has no chunked upload.
        ContentLength: file.sizeBytes,
        ContentType: "application/octet-stream",
        Metadata: { filename: file.fileName },
      }),
      opts.signal ? { abortSignal: opts.signal } : {},
    );
    result.uploaded.push(file.fileId);
  }
  return result;
}
