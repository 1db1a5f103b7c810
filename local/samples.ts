import { createCipheriv, createHash } from "node:crypto";
import { Readable } from "node:stream";
import { PutObjectCommand } from "@aws-sdk/client-s3";
import type { Storage } from "../core/storage.js";
import { SAMPLE_FILE_IDS, SAMPLE_FILES, type SampleFile } from "./sample-files.js";

// Sample source files for the embedded default, tests and benchmarks: ten file ids with
// sizes from 1 MB to 50 MB. The bytes are a pure function of (file id, size), so a test
// can recompute any of them, and they are made as a stream: a 50 MB sample never sits in
// memory, neither here nor in the upload.

export { SAMPLE_FILE_IDS, SAMPLE_FILES, type SampleFile } from "./sample-files.js";

const CHUNK_BYTES = 64 * 1024;

/**
 * The deterministic bytes of a sample (from byte `start` to `sizeBytes`): an AES-256-CTR
 * keystream keyed by the file id.
 * Fast (hundreds of MB/s), incompressible like real media, and different per file.
 */
export function sampleStream(fileId: number, sizeBytes: number, start = 0): Readable {
  const key = createHash("sha256").update(`download-jobs sample ${fileId}`).digest();
  // CTR mode: the keystream at any offset is the counter of its 16-byte block, so a
  // range (from `start`) costs no more than its own bytes.
  const iv = Buffer.alloc(16);
  iv.writeBigUInt64BE(BigInt(Math.floor(start / 16)), 8);
  const cipher = createCipheriv("aes-256-ctr", key, iv);
  cipher.update(Buffer.alloc(start % 16));
  const zeros = Buffer.alloc(CHUNK_BYTES);
  let left = sizeBytes - start;
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

/** The samples up to 21 MB, and the three of 30 MB and more that make a job last seconds. */
const SMALL_SAMPLES = SAMPLE_FILE_IDS.slice(0, 7);
const LARGE_SAMPLES = SAMPLE_FILE_IDS.slice(7);
/** Ordered pairs of distinct small samples: the runs before example lists repeat. */
export const EXAMPLE_RUNS = SMALL_SAMPLES.length * (SMALL_SAMPLES.length - 1);

/**
 * The file id lists of the three examples `npm start` prints on its `run`-th start: two
 * small samples, then one of the large ones, so that the job lasts long enough (seconds,
 * at the demo throttle) to watch its progress. An owner asking again for a list it has
 * asked for gets its earlier job back (in flight, or its reused result), so no two lists
 * repeat within EXAMPLE_RUNS starts: each example starts a job of its own.
 */
export function exampleFileSets(run: number): number[][] {
  const n = ((run % EXAMPLE_RUNS) + EXAMPLE_RUNS) % EXAMPLE_RUNS;
  const first = n % SMALL_SAMPLES.length;
  const second = (first + 1 + Math.floor(n / SMALL_SAMPLES.length)) % SMALL_SAMPLES.length;
  return LARGE_SAMPLES.map((large) => [
    SMALL_SAMPLES[first] ?? 0,
    SMALL_SAMPLES[second] ?? 0,
    large,
  ]);
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
