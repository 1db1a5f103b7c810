import { createHash } from "node:crypto";
import { crc32 } from "node:zlib";
import { afterAll, afterEach, beforeAll, expect, test } from "vitest";
import type { Config } from "../core/config.js";
import { JobService } from "../core/job-service.js";
import { JobStore } from "../core/job-store.js";
import type { JobRecord } from "../core/jobs.js";
import { createBundleQueue } from "../core/queue.js";
import { createRedis, type RedisClient } from "../core/redis.js";
import { type RealisticS3, S3_PROFILES, startRealisticS3 } from "../local/realistic-s3.js";
import { sampleStream } from "../local/samples.js";
import { type Services, startServices, uniquePrefix } from "./helpers/services.js";
import { spawnWorker, type WorkerProcess } from "./helpers/worker-process.js";
import { readZip } from "./helpers/zip.js";

// Crash-resume (issue 11 item 7): a worker SIGKILLed at about 70 % of a stored ZIP's
// upload; the run that takes the job over continues the same multipart upload from its
// last part instead of from byte 0. What a user checks: the job completes, the ZIP is
// byte for byte the one an uninterrupted run makes (and its SHA-256 is the one the job
// reports), and the second run read only what was left (bytes of source GETs counted at
// the realistic-S3 fixture). An upload that is gone (aborted) is started over, cleanly.

const MiB = 1024 * 1024;
const FILES = 40;
const FILE_BYTES = MiB + 12_345;
const TOTAL = FILES * FILE_BYTES;

let svc: Services;
let s3: RealisticS3;
let cfg: Config;
let redis: RedisClient;
let store: JobStore;
let jobs: JobService;
let close: () => Promise<void>;
const workers: WorkerProcess[] = [];

beforeAll(async () => {
  svc = await startServices();
  const base = svc.config();
  // Sources made up by the fixture (ids 1..FILES), paced so a run lasts seconds.
  s3 = await startRealisticS3(
    svc.s3.endpoint,
    { ...S3_PROFILES.loopback, firstByteMs: 2, aggregateBytesPerSecond: 6 * MiB },
    7,
    {
      bucket: base.SOURCE_BUCKET,
      prefix: base.SOURCE_PREFIX,
      sizeOf: (id) => (id >= 1 && id <= FILES ? FILE_BYTES : undefined),
    },
  );
  cfg = svc.config({ QUEUE_PREFIX: uniquePrefix("resume"), S3_ENDPOINT: s3.endpoint });
  redis = createRedis(svc.redisTarget, { role: "api" });
  store = new JobStore(redis, { prefix: cfg.QUEUE_PREFIX, recordTtlSeconds: 3600 });
  const queue = createBundleQueue(redis, { prefix: cfg.QUEUE_PREFIX, attempts: 20, backoffMs: 50 });
  jobs = new JobService({
    store,
    queue,
    redis,
    maxFilesPerJob: 1000,
    policy: { dedupInFlight: false, reuseResults: false },
  });
  close = async () => {
    await queue.close();
    redis.disconnect();
  };
}, 60_000);

afterEach(async () => {
  for (const w of workers.splice(0)) await w.kill("SIGKILL");
});

afterAll(async () => {
  await close?.();
  await s3?.close();
  await svc?.stop();
});

function worker(): WorkerProcess {
  const w = spawnWorker({
    ...svc.env,
    S3_ENDPOINT: s3.endpoint,
    QUEUE_PREFIX: cfg.QUEUE_PREFIX,
    ZIP_LEVEL: "0",
    UPLOAD_PART_BYTES: String(5 * MiB),
    PROGRESS_INTERVAL_MS: "100",
    // A dead worker's job moves on within seconds (and a loaded machine's slow lock
    // renewals do not count as deaths too soon).
    JOB_LOCK_MS: "5000",
    JOB_STALLED_INTERVAL_MS: "2500",
    JOB_MAX_STALLED: "20",
    LOG_LEVEL: "info",
  });
  workers.push(w);
  return w;
}

async function until(
  jobId: string,
  pred: (r: JobRecord) => boolean,
  what: string,
): Promise<JobRecord> {
  let rec: JobRecord | undefined;
  await expect
    .poll(async () => pred((rec = await store.get(jobId))), {
      timeout: 180_000,
      interval: 25,
      message: what,
    })
    .toBe(true);
  return rec as JobRecord;
}

const ended = (r: JobRecord) => r.state !== "QUEUED" && r.state !== "PROCESSING";

async function zipOf(rec: JobRecord): Promise<Buffer> {
  const key = rec.result?.key ?? "";
  const { url } = await svc.storage.presignResult(key, rec.result?.fileName ?? "x.zip");
  return Buffer.from(await (await fetch(url)).arrayBuffer());
}

async function expectRightEntries(zip: Buffer): Promise<void> {
  const entries = await readZip(zip);
  expect(entries.size).toBe(FILES);
  for (let id = 1; id <= FILES; id++) {
    const got = entries.get(`generated-${id}.bin`);
    let want = 0;
    for await (const c of sampleStream(id, FILE_BYTES)) want = crc32(c as Buffer, want);
    expect(got?.length, `entry ${id}`).toBe(FILE_BYTES);
    expect(crc32(got as Buffer), `entry ${id}`).toBe(want);
  }
}

const ids = Array.from({ length: FILES }, (_, i) => i + 1);

test("a worker killed at ~70 % is resumed from its last part: the second run reads at most 40 % and the ZIP is byte-identical", async () => {
  // The reference: one uninterrupted run.
  let w = worker();
  const first = (await jobs.initiate("owner", { fileIds: ids })).job;
  const whole = await until(first.id, ended, "the uninterrupted job ends");
  expect(whole.state).toBe("COMPLETED");
  const reference = await zipOf(whole);
  expect(createHash("sha256").update(reference).digest("hex")).toBe(whole.result?.sha256);
  await expectRightEntries(reference);
  await w.kill("SIGTERM");

  // The same files again; the worker dies once the upload is about 70 % through.
  w = worker();
  const job = (await jobs.initiate("owner", { fileIds: ids })).job;
  const at = await until(
    job.id,
    (r) =>
      r.state === "PROCESSING" &&
      (r.upload?.parts.length ?? 0) * (r.upload?.partSize ?? 0) >= 0.7 * reference.length,
    "the upload passes 70 %",
  );
  await w.kill("SIGKILL");
  const readBefore = s3.stats.generatedBytes;
  const uploaded = (at.upload?.parts.length ?? 0) * (at.upload?.partSize ?? 0);

  w = worker();
  const done = await until(job.id, ended, "the resumed job ends");
  const reread = s3.stats.generatedBytes - readBefore;
  expect(done.state).toBe("COMPLETED");
  expect(done.attempts).toBeGreaterThanOrEqual(2);
  // The first run's upload, continued.
  expect(done.result?.key).toBe(at.upload?.key);
  expect(w.output()).toMatch(/job resumed from the last uploaded part/);
  const zip = await zipOf(done);
  expect(zip.equals(reference)).toBe(true);
  expect(done.result?.sha256).toBe(whole.result?.sha256);
  expect(done.result?.sizeBytes).toBe(reference.length);
  expect(reread).toBeLessThanOrEqual(0.4 * TOTAL);
  expect(done.files.every((f) => f.state === "DONE" && f.bytesDone === FILE_BYTES)).toBe(true);
  expect(done.progress).toMatchObject({ filesDone: FILES, bytesDone: TOTAL });
  await w.kill("SIGTERM");
  console.log(
    `resume: killed at ${Math.round((uploaded * 100) / reference.length)} % of ${reference.length} ZIP bytes; ` +
      `the second run re-read ${reread} of ${TOTAL} source bytes (${Math.round((reread * 100) / TOTAL)} %); ZIP byte-identical`,
  );
}, 600_000);

test("an upload that is gone (aborted) is started over from byte 0 and still right", async () => {
  let w = worker();
  const job = (await jobs.initiate("owner", { fileIds: ids })).job;
  const at = await until(
    job.id,
    (r) => r.state === "PROCESSING" && (r.upload?.parts.length ?? 0) >= 2,
    "two parts uploaded",
  );
  await w.kill("SIGKILL");
  // As S3 would after an AbortMultipartUpload (or a lifecycle rule): the upload is gone.
  await fetch(
    `${s3.endpoint}/${cfg.RESULT_BUCKET}/${at.upload?.key}?uploadId=${at.upload?.uploadId}`,
    { method: "DELETE" },
  );
  const readBefore = s3.stats.generatedBytes;
  w = worker();
  const done = await until(job.id, ended, "the job ends");
  expect(done.state).toBe("COMPLETED");
  expect(w.output()).toMatch(/starting over from byte 0: S3 no longer has the upload/);
  expect(done.result?.key).not.toBe(at.upload?.key);
  expect(s3.stats.generatedBytes - readBefore).toBeGreaterThanOrEqual(TOTAL);
  const zip = await zipOf(done);
  expect(createHash("sha256").update(zip).digest("hex")).toBe(done.result?.sha256);
  await expectRightEntries(zip);
  await w.kill("SIGTERM");
}, 600_000);
