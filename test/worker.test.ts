import type { Queue } from "bullmq";
import { pino } from "pino";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import type { Config } from "../core/config.js";
import { JobService } from "../core/job-service.js";
import { JobStore } from "../core/job-store.js";
import type { JobRecord, JobStateName } from "../core/jobs.js";
import { type BundleJobData, createBundleQueue } from "../core/queue.js";
import { createRedis, type RedisClient, waitForRedis } from "../core/redis.js";
import { type RunningWorker, startWorker } from "../worker/worker.js";
import { type Services, startServices } from "./helpers/services.js";
import { spawnWorker } from "./helpers/worker-process.js";
import { readZip, sha256 } from "./helpers/zip.js";

// The worker against real Redis and a real S3 server: what lands in the result bucket,
// what the job record says, and how failures and cancels end.

const silent = pino({ level: "silent" });

interface Stack {
  cfg: Config;
  redis: RedisClient;
  store: JobStore;
  queue: Queue<BundleJobData>;
  /** Initiate and Cancel as one owner, without dedup (each Initiate a new job). */
  jobs: {
    initiate(fileIds: number[]): Promise<JobRecord>;
    cancel(jobId: string): Promise<JobRecord>;
  };
  close(): Promise<void>;
}

const OWNER = "worker-test";

async function stack(svc: Services, overrides: Record<string, string> = {}): Promise<Stack> {
  const cfg = svc.config({ PROGRESS_INTERVAL_MS: "50", JOB_BACKOFF_MS: "50", ...overrides });
  const redis = createRedis(svc.redisTarget, { role: "api" });
  const store = new JobStore(redis, { prefix: cfg.QUEUE_PREFIX, recordTtlSeconds: 3600 });
  const queue = createBundleQueue(redis, {
    prefix: cfg.QUEUE_PREFIX,
    attempts: cfg.JOB_ATTEMPTS,
    backoffMs: cfg.JOB_BACKOFF_MS,
  });
  const service = new JobService({
    store,
    queue,
    redis,
    maxFilesPerJob: cfg.MAX_FILES_PER_JOB,
    policy: { dedupInFlight: false, reuseResults: false },
  });
  const jobs = {
    initiate: async (fileIds: number[]) => (await service.initiate(OWNER, { fileIds })).job,
    cancel: (jobId: string) => service.cancel(OWNER, jobId),
  };
  return {
    cfg,
    redis,
    store,
    queue,
    jobs,
    async close() {
      await queue.close();
      redis.disconnect();
    },
  };
}

async function waitFor(
  store: JobStore,
  id: string,
  pred: (j: JobRecord) => boolean,
  timeoutMs = 60_000,
): Promise<JobRecord> {
  let last: JobRecord | undefined;
  await expect
    .poll(
      async () => {
        last = await store.get(id);
        return pred(last);
      },
      { timeout: timeoutMs, interval: 25 },
    )
    .toBe(true);
  return last as JobRecord;
}

const inState =
  (...states: JobStateName[]) =>
  (j: JobRecord) =>
    states.includes(j.state);

async function download(svc: Services, rec: JobRecord): Promise<Buffer> {
  if (rec.result === undefined) throw new Error("job has no result");
  const { url } = await svc.storage.presignResult(rec.result.key, rec.result.fileName);
  const res = await fetch(url);
  expect(res.status).toBe(200);
  expect(res.headers.get("content-disposition")).toMatch(/^attachment; filename=".+\.zip"/);
  return Buffer.from(await res.arrayBuffer());
}

function resultExists(svc: Services, jobId: string): Promise<boolean> {
  return svc.storage.resultExists(svc.storage.resultKey(jobId));
}

let svc: Services;
const sources = new Map<number, Buffer>();

beforeAll(async () => {
  svc = await startServices();
  const sizes: [number, number, string?][] = [
    [101, 1],
    [102, 300_000, "report.pdf"],
    [103, 6 * 1024 * 1024 + 17, "big.bin"],
    [104, 0],
    [105, 4 * 1024 * 1024],
  ];
  for (const [id, size, name] of sizes) sources.set(id, await svc.putSource(id, size, name));
});
afterAll(async () => {
  await svc?.stop();
});

describe("worker", () => {
  let s: Stack;
  let worker: RunningWorker;
  beforeAll(async () => {
    s = await stack(svc);
    worker = await startWorker(s.cfg, silent);
  });
  afterAll(async () => {
    await worker?.close();
    await s?.close();
  });

  test("bundles every source into a ZIP whose entries match the sources byte for byte", async () => {
    const ids = [101, 102, 103, 104];
    const job = await s.jobs.initiate(ids);
    expect(job.state).toBe("QUEUED");
    const done = await waitFor(s.store, job.id, inState("COMPLETED", "FAILED"));
    expect(done.state).toBe("COMPLETED");
    const zip = await download(svc, done);
    expect(done.result?.sizeBytes).toBe(zip.length);
    expect(done.result?.sha256).toBe(sha256(zip));
    const entries = await readZip(zip);
    expect([...entries.keys()]).toEqual(["file-101", "report.pdf", "big.bin", "file-104"]);
    for (const [i, id] of ids.entries()) {
      expect(entries.get(done.files[i]?.entryName ?? "")?.equals(sources.get(id) as Buffer)).toBe(
        true,
      );
    }
    const total = ids.reduce((n, id) => n + (sources.get(id)?.length ?? 0), 0);
    expect(done.progress).toMatchObject({
      filesDone: 4,
      filesTotal: 4,
      bytesDone: total,
      bytesTotal: total,
    });
    expect(done.files.every((f) => f.state === "DONE")).toBe(true);
    expect(done.attempts).toBe(1);
    expect(done.startedAt).toBeGreaterThanOrEqual(done.createdAt);
    expect(done.endedAt).toBeGreaterThanOrEqual(done.startedAt ?? 0);
  });

  test("a missing source fails the job at once with not_found naming every missing id", async () => {
    const job = await s.jobs.initiate([101, 999_001, 102, 999_002]);
    const done = await waitFor(s.store, job.id, inState("COMPLETED", "FAILED"));
    expect(done.state).toBe("FAILED");
    expect(done.error).toMatchObject({
      code: "not_found",
      retryable: false,
      missingFileIds: [999_001, 999_002],
    });
    expect(done.error?.message).toContain("999001");
    expect(done.attempts).toBe(1);
    // The record turns FAILED inside the run, just before BullMQ fails the job.
    await expect.poll(() => s.queue.getJobState(job.id)).toBe("failed");
    expect((await s.queue.getJob(job.id))?.attemptsMade).toBe(1);
    expect(done.files.filter((f) => f.state === "FAILED").map((f) => f.fileId)).toEqual([
      999_001, 999_002,
    ]);
  });

  test("progress reaches Redis at most about five times a second", async () => {
    const throttled = await stack(svc, {
      THROTTLE_BYTES_PER_SECOND: String(2 * 1024 * 1024),
      PROGRESS_INTERVAL_MS: "200",
    });
    const w = await startWorker(throttled.cfg, silent);
    const sub = createRedis(svc.redisTarget, { role: "subscriber" });
    try {
      // SUBSCRIBE sent before ioredis's ready check has finished breaks that check (INFO
      // is refused in subscriber mode) and the subscription with it.
      await waitForRedis(sub);
      const job = await throttled.jobs.initiate([105]);
      const versions: JobRecord[] = [];
      await sub.subscribe(throttled.store.channel(job.id));
      sub.on("message", (_c: string, m: string) => versions.push(JSON.parse(m)));
      const done = await waitFor(throttled.store, job.id, inState("COMPLETED", "FAILED"));
      expect(done.state).toBe("COMPLETED");
      const processing = versions.filter((v) => v.state === "PROCESSING");
      expect(processing.length).toBeGreaterThan(3);
      // The worker's own write times (updatedAt), not when this busy process read the
      // messages: a loaded machine spreads the writes out, it never bunches them up.
      const writtenAt = processing.map((v) => Number(v.updatedAt));
      const spanS = ((writtenAt.at(-1) ?? 0) - (writtenAt[0] ?? 0)) / 1000;
      expect(processing.length - 1).toBeLessThanOrEqual(Math.ceil(spanS * 5) + 2);
      const etas = processing.map((v) => JSON.parse(v.progress as unknown as string).etaSeconds);
      expect(etas.some((e) => typeof e === "number" && e > 0)).toBe(true);
    } finally {
      sub.disconnect();
      await w.close();
      await throttled.close();
    }
  });

  test("cancel of a running job stops it, aborts the upload and leaves no result object", async () => {
    const slow = await stack(svc, { THROTTLE_BYTES_PER_SECOND: String(1024 * 1024) });
    const w = await startWorker(slow.cfg, silent);
    try {
      const job = await slow.jobs.initiate([103, 105]);
      await waitFor(
        slow.store,
        job.id,
        (j) => j.state === "PROCESSING" && j.progress.bytesDone > 0,
      );
      const cancelled = await slow.jobs.cancel(job.id);
      expect(cancelled.state).toBe("CANCELLED");
      await expect.poll(() => w.running(), { interval: 10 }).toEqual([]);
      const bull = await slow.queue.getJob(job.id);
      await expect.poll(async () => bull?.getState()).toBe("failed");
      expect(await resultExists(svc, job.id)).toBe(false);
      const after = await slow.store.get(job.id);
      expect(after.state).toBe("CANCELLED");
      expect(after.result).toBeUndefined();
      expect(bull?.attemptsMade).toBeLessThanOrEqual(1);
    } finally {
      await w.close();
      await slow.close();
    }
  });

  test("cancel of a queued job: it becomes CANCELLED at once and never runs", async () => {
    const idle = await stack(svc);
    const job = await idle.jobs.initiate([101]);
    const cancelled = await idle.jobs.cancel(job.id);
    expect(cancelled.state).toBe("CANCELLED");
    expect(await idle.queue.getJob(job.id)).toBeUndefined();
    const w = await startWorker(idle.cfg, silent);
    try {
      const next = await idle.jobs.initiate([101]);
      await waitFor(idle.store, next.id, inState("COMPLETED"));
      const rec = await idle.store.get(job.id);
      expect(rec).toMatchObject({ state: "CANCELLED", attempts: 0 });
      expect(await resultExists(svc, job.id)).toBe(false);
    } finally {
      await w.close();
      await idle.close();
    }
  });

  test("transient storage errors are retried with backoff, then FAILED with retryable", async () => {
    const broken = await stack(svc, {
      S3_ENDPOINT: "http://127.0.0.1:9",
      JOB_ATTEMPTS: "3",
      JOB_BACKOFF_MS: "20",
    });
    const w = await startWorker(broken.cfg, silent);
    try {
      const job = await broken.jobs.initiate([101]);
      const done = await waitFor(broken.store, job.id, inState("COMPLETED", "FAILED"));
      expect(done.state).toBe("FAILED");
      expect(done.error).toMatchObject({ code: "unavailable", retryable: true });
      expect(done.attempts).toBe(3);
      // The record turns FAILED inside the last attempt, just before BullMQ counts it.
      await expect.poll(async () => (await broken.queue.getJob(job.id))?.attemptsMade).toBe(3);
    } finally {
      await w.close();
      await broken.close();
    }
  });
});

describe("worker crash", () => {
  test("a worker killed mid-job has its job finished by another worker with a correct result", async () => {
    const s = await stack(svc);
    const env = {
      ...svc.env,
      QUEUE_PREFIX: s.cfg.QUEUE_PREFIX,
      THROTTLE_BYTES_PER_SECOND: String(2 * 1024 * 1024),
      PROGRESS_INTERVAL_MS: "100",
    };
    const first = spawnWorker(env);
    let second: ReturnType<typeof spawnWorker> | undefined;
    try {
      const job = await s.jobs.initiate([103, 102]);
      await waitFor(
        s.store,
        job.id,
        (j) => j.state === "PROCESSING" && j.progress.bytesDone > 1024 * 1024,
      );
      await first.kill("SIGKILL");
      second = spawnWorker({ ...env, THROTTLE_BYTES_PER_SECOND: "0" });
      // The stalled job comes back after the lock expires (≈ 10 s idle); how soon is a
      // figure for the benchmarks, that it comes back at all is the behaviour.
      const done = await waitFor(s.store, job.id, inState("COMPLETED", "FAILED"), 120_000);
      expect(done.state).toBe("COMPLETED");
      expect(done.attempts).toBe(2);
      const entries = await readZip(await download(svc, done));
      expect(entries.get("big.bin")?.equals(sources.get(103) as Buffer)).toBe(true);
      expect(entries.get("report.pdf")?.equals(sources.get(102) as Buffer)).toBe(true);
    } finally {
      await first.kill("SIGKILL");
      await second?.kill("SIGTERM");
      await s.close();
    }
  });
});
