import { Worker } from "bullmq";
import { Redis } from "ioredis";
import { JobStore } from "../core/job-store.js";
import { markCompleted, markProcessing } from "../core/job-transitions.js";
import { type BundleJobData, QUEUE_NAME } from "../core/queue.js";
import { createRedis } from "../core/redis.js";

// The job-overhead benchmark's worker: takes our jobs from the queue and makes the same
// Redis writes the real processor (worker/processor.ts) makes around its work (the
// start with the attempt and the sources' totals, the result with its expiry),
// with no work in between and no S3. What is left is the cost of a job beyond the work.
// BENCH_RAW=1 is the baseline instead: a no-op BullMQ processor on a plain queue.
// JOB_MS > 0 makes each of our jobs take that long between its two writes (a job slot the
// fairness benchmark can count in).
// REDIS_URL, QUEUE_PREFIX, CONCURRENCY from the environment; prints "listening 0" when ready.

const url = process.env.REDIS_URL ?? "redis://127.0.0.1:6379";
const prefix = process.env.QUEUE_PREFIX ?? "dj";
const concurrency = Number(process.env.CONCURRENCY ?? 50);
const raw = process.env.BENCH_RAW === "1";
const jobMs = Number(process.env.JOB_MS ?? 0);
// The baseline is BullMQ as anyone would set it up: a plain ioredis connection, without
// what core/redis.ts adds.
const redis = raw
  ? new Redis(url, { maxRetriesPerRequest: null })
  : createRedis(url, { role: "worker", name: "bench-noop-worker" });
const store = new JobStore(redis, { prefix, recordTtlSeconds: 3600 });

const worker = raw
  ? new Worker("raw", async () => "done", { connection: redis, prefix, concurrency })
  : new Worker<BundleJobData>(
      QUEUE_NAME,
      async (job, token) => {
        const { jobId, fileIds } = job.data;
        const run = { jobId, token: token ?? "", checkLock: true };
        const startedAt = Date.now();
        const files = fileIds.map((fileId) => ({
          fileId,
          state: "PENDING" as const,
          sizeBytes: 0,
          bytesDone: 0,
          entryName: `file-${fileId}`,
        }));
        const progress = {
          filesDone: 0,
          filesTotal: fileIds.length,
          bytesDone: 0,
          bytesTotal: 0,
          bytesPerSecond: 0,
        };
        await markProcessing(store, run, { progress, files, startedAt });
        if (jobMs > 0) await new Promise((ok) => setTimeout(ok, jobMs));
        const endedAt = Date.now();
        const expiresAt = endedAt + 24 * 3600 * 1000;
        await markCompleted(store, run, {
          endedAt,
          progress: { ...progress, filesDone: fileIds.length, etaSeconds: 0 },
          files: files.map((f) => ({ ...f, state: "DONE" as const })),
          result: {
            key: `bundles/${jobId}.zip`,
            fileName: `download-${jobId.slice(0, 8)}.zip`,
            sizeBytes: 22,
            sha256: "0".repeat(64),
            expiresAt,
          },
        });
        return "completed";
      },
      { connection: redis, prefix, concurrency },
    );
worker.on("error", () => undefined);
await worker.waitUntilReady();
process.stdout.write("listening 0\n");
process.on("SIGTERM", () => {
  worker.close().then(
    () => process.exit(0),
    () => process.exit(1),
  );
});
