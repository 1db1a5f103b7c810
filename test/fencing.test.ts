import http from "node:http";
import type { AddressInfo } from "node:net";
import type { Queue } from "bullmq";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import type { Config } from "../core/config.js";
import { JobService } from "../core/job-service.js";
import { decodeJob, JobStore } from "../core/job-store.js";
import type { JobRecord } from "../core/jobs.js";
import { type BundleJobData, createBundleQueue } from "../core/queue.js";
import { createRedis, type RedisClient, waitForRedis } from "../core/redis.js";
import { type Services, startServices } from "./helpers/services.js";
import { startTcpProxy } from "./helpers/tcp-proxy.js";
import { spawnWorker, type WorkerProcess } from "./helpers/worker-process.js";
import { readZip, sha256 } from "./helpers/zip.js";

// Two runs of one job (issue 10 items 1 and 8). BullMQ does not stop a run that lost its
// lock: when a worker is paused (a blocked event loop, a stopped VM) or cut off from
// Redis, stall detection hands its job to another worker while the first run goes on.
// Whatever the first run does when it comes back, the job completes once: one COMPLETED
// for watchers, one webhook, and the ZIP the record names exists with the record's
// SHA-256.

const SECRET = "webhook-secret-for-fencing-0123456789";
const OWNER = "fencing-test";
const MIB = 1024 * 1024;

let svc: Services;
let source: Buffer;
beforeAll(async () => {
  svc = await startServices();
  source = await svc.putSource(501, 3 * MIB, "big.bin");
});
afterAll(async () => {
  await svc?.stop();
});

interface Stack {
  cfg: Config;
  env: Record<string, string>;
  redis: RedisClient;
  sub: RedisClient;
  store: JobStore;
  queue: Queue<BundleJobData>;
  service: JobService;
  close(): Promise<void>;
}

async function stack(): Promise<Stack> {
  const cfg = svc.config();
  // A short lock, checked often: the second run starts within a few seconds (and a
  // busy machine still renews it in time).
  const env = {
    ...svc.env,
    QUEUE_PREFIX: cfg.QUEUE_PREFIX,
    JOB_LOCK_MS: "3000",
    JOB_STALLED_INTERVAL_MS: "1000",
    PROGRESS_INTERVAL_MS: "100",
    WEBHOOK_SECRET: SECRET,
    WEBHOOK_ALLOW_PRIVATE: "true",
    WEBHOOK_BACKOFF_MS: "100",
    LOG_LEVEL: "info",
  };
  const redis = createRedis(svc.redisTarget, { role: "api" });
  const sub = createRedis(svc.redisTarget, { role: "subscriber" });
  await Promise.all([waitForRedis(redis), waitForRedis(sub)]);
  const store = new JobStore(redis, { prefix: cfg.QUEUE_PREFIX, recordTtlSeconds: 3600 });
  const queue = createBundleQueue(redis, { prefix: cfg.QUEUE_PREFIX, attempts: 3, backoffMs: 50 });
  const service = new JobService({
    store,
    queue,
    redis,
    maxFilesPerJob: 10,
    policy: { dedupInFlight: false, reuseResults: false },
    checkCallbackUrl: async (url) => url,
  });
  return {
    cfg,
    env,
    redis,
    sub,
    store,
    queue,
    service,
    async close() {
      await queue.close();
      sub.disconnect();
      redis.disconnect();
    },
  };
}

/** What a watcher of the job is sent, in order: each version's state and result object. */
async function watch(s: Stack, jobId: string): Promise<{ state: string; result?: string }[]> {
  const seen: { state: string; result?: string }[] = [];
  await s.sub.subscribe(s.store.channel(jobId));
  s.sub.on("message", (channel: string, msg: string) => {
    if (channel !== s.store.channel(jobId)) return;
    const rec = decodeJob(JSON.parse(msg));
    seen.push({ state: rec.state, ...(rec.result ? { result: rec.result.key } : {}) });
  });
  return seen;
}

/**
 * The job completed once, as a watcher sees it: one change into COMPLETED, and every
 * later version (the webhook's delivery) names the same result.
 */
function expectCompletedOnce(seen: { state: string; result?: string }[], key: string): void {
  const into = seen.filter((v, i) => v.state === "COMPLETED" && seen[i - 1]?.state !== "COMPLETED");
  expect(into).toEqual([{ state: "COMPLETED", result: key }]);
  const completed = seen.filter((v) => v.state === "COMPLETED");
  expect(completed.every((v) => v.result === key)).toBe(true);
  expect(seen.at(-1)?.state).toBe("COMPLETED");
}

async function until(
  s: Stack,
  jobId: string,
  pred: (r: JobRecord) => boolean,
  timeout = 60_000,
): Promise<JobRecord> {
  let rec: JobRecord | undefined;
  await expect
    .poll(
      async () => {
        rec = await s.store.get(jobId);
        return pred(rec);
      },
      { timeout, interval: 50 },
    )
    .toBe(true);
  return rec as JobRecord;
}

/** What BullMQ logs in a worker whose run tried to finish a job after losing its lock. */
const runEnded = (jobId: string) => new RegExp(`(Missing lock|Lock mismatch) for job ${jobId}`);

/** The ZIP the record names, checked against the record and the source. */
async function expectResult(rec: JobRecord): Promise<void> {
  expect(rec.state).toBe("COMPLETED");
  const key = rec.result?.key ?? "";
  expect(await svc.storage.resultExists(key)).toBe(true);
  const { url } = await svc.storage.presignResult(key, rec.result?.fileName ?? "x.zip");
  const res = await fetch(url);
  expect(res.status).toBe(200);
  const zip = Buffer.from(await res.arrayBuffer());
  expect(sha256(zip)).toBe(rec.result?.sha256);
  expect(zip.length).toBe(rec.result?.sizeBytes);
  expect((await readZip(zip)).get("big.bin")?.equals(source)).toBe(true);
}

/** A loopback webhook receiver that counts the deliveries of each job. */
async function receiver(): Promise<{
  url: string;
  count(jobId: string): number;
  close(): Promise<void>;
}> {
  const seen = new Map<string, number>();
  const server = http.createServer((req, res) => {
    let body = "";
    req.on("data", (d: Buffer) => (body += d.toString()));
    req.on("end", () => {
      const jobId = (JSON.parse(body) as { job?: { jobId?: string } }).job?.jobId ?? "";
      seen.set(jobId, (seen.get(jobId) ?? 0) + 1);
      res.writeHead(200).end();
    });
  });
  await new Promise<void>((ok) => server.listen(0, "127.0.0.1", ok));
  return {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/hook`,
    count: (jobId) => seen.get(jobId) ?? 0,
    close: () => new Promise<void>((ok) => server.close(() => ok())),
  };
}

describe("a run that lost its lock", () => {
  test("paused mid-job while a second run takes over: the COMPLETED job keeps its ZIP", async () => {
    const s = await stack();
    const workers: WorkerProcess[] = [];
    try {
      const first = spawnWorker({ ...s.env, THROTTLE_BYTES_PER_SECOND: String(MIB) });
      workers.push(first);
      const job = (await s.service.initiate(OWNER, { fileIds: [501] })).job;
      const states = await watch(s, job.id);
      await until(s, job.id, (r) => r.state === "PROCESSING" && r.progress.bytesDone > 1.5 * MIB);
      // The first run stops dead, as under a long GC pause or a stopped VM: its lock
      // runs out and stall detection gives the job to the second worker.
      first.child.kill("SIGSTOP");
      const second = spawnWorker({ ...s.env, THROTTLE_BYTES_PER_SECOND: String(MIB / 4) });
      workers.push(second);
      await until(s, job.id, (r) => r.attempts >= 2);
      // The first run comes back with its upload nearly done and races to finish, while
      // the second is still bundling.
      first.child.kill("SIGCONT");
      // Both runs are over: BullMQ has finished the job, and told the first run (when it
      // tried to finish it too) that its lock is gone.
      await expect
        .poll(() => s.queue.getJobState(job.id), { timeout: 60_000, interval: 100 })
        .toMatch(/^(completed|failed)$/);
      await expect.poll(() => first.output(), { timeout: 30_000 }).toMatch(runEnded(job.id));
      const done = await s.store.get(job.id);
      await expectResult(done);
      expect(done.attempts).toBeGreaterThanOrEqual(2);
      expectCompletedOnce(states, done.result?.key ?? "");
      expect(await s.queue.getJobState(job.id)).toBe("completed");
      // The first run was stopped by its lost lease, not by luck.
      expect(first.output()).toContain("another run owns the job now");
    } finally {
      for (const w of workers) {
        w.child.kill("SIGCONT");
        await w.kill("SIGKILL");
      }
      await s.close();
    }
  }, 120_000);

  test.each([
    ["stops forwarding", "pause"],
    ["resets every connection", "drop"],
  ] as const)(
    "cut off from Redis mid-job (the network %s): the job completes once, one COMPLETED, one webhook",
    async (_how, mode) => {
      const s = await stack();
      const hook = await receiver();
      const proxy = await startTcpProxy({ port: svc.redis.port });
      const workers: WorkerProcess[] = [];
      try {
        const cut = spawnWorker({
          ...s.env,
          REDIS_URL: `redis://127.0.0.1:${proxy.port}`,
          THROTTLE_BYTES_PER_SECOND: String(MIB),
        });
        workers.push(cut);
        const job = (await s.service.initiate(OWNER, { fileIds: [501], callbackUrl: hook.url }))
          .job;
        const states = await watch(s, job.id);
        await until(s, job.id, (r) => r.state === "PROCESSING" && r.progress.bytesDone > MIB);
        // Nothing reaches Redis or comes back; the worker's S3 traffic goes on, so its run
        // finishes its upload and waits for Redis to answer its COMPLETED.
        proxy[mode]();
        const other = spawnWorker({ ...s.env, THROTTLE_BYTES_PER_SECOND: "0" });
        workers.push(other);
        const done = await until(s, job.id, (r) => r.state === "COMPLETED");
        await expect.poll(() => hook.count(job.id), { timeout: 30_000 }).toBe(1);
        proxy.resume();
        // The cut-off run hears that it lost the job and stops; its late writes change
        // nothing, and it leaves the winner's object alone.
        await expect.poll(() => cut.output(), { timeout: 30_000 }).toMatch(runEnded(job.id));
        // Its worker is back in business: nothing it owes is left to deliver.
        await expect
          .poll(async () => s.redis.zcard(s.store.webhookOutboxKey), { timeout: 30_000 })
          .toBe(0);
        const after = await s.store.get(job.id);
        expect(after.result).toEqual(done.result);
        await expectResult(after);
        expectCompletedOnce(states, after.result?.key ?? "");
        expect(hook.count(job.id)).toBe(1);
        expect(after.webhook).toMatchObject({ state: "DELIVERED", attempts: 1 });
        expect(cut.output()).toContain("another run owns the job now");
      } finally {
        proxy.resume();
        for (const w of workers) await w.kill("SIGKILL");
        await proxy.close();
        await hook.close();
        await s.close();
      }
    },
    120_000,
  );
});
