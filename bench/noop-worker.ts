import { Worker } from "bullmq";
import { JobStore } from "../core/job-store.js";
import { type BundleJobData, QUEUE_NAME } from "../core/queue.js";
import { createRedis } from "../core/redis.js";

// The job-overhead benchmark's worker: takes our jobs from the queue and makes the same
// record writes the real processor (worker/processor.ts) makes around its work (start
// with the attempt counted, the sources' totals, the result), with no work in between
// and no S3. What is left is the cost of a job beyond the work itself.
// BENCH_RAW=1 is the baseline instead: a no-op BullMQ processor on a plain queue.
// REDIS_URL, QUEUE_PREFIX, CONCURRENCY from the environment; prints "listening 0" when ready.

const redis = createRedis(process.env.REDIS_URL ?? "redis://127.0.0.1:6379", { role: "worker", name: "bench-noop-worker" });
const prefix = process.env.QUEUE_PREFIX ?? "dj";
const concurrency = Number(process.env.CONCURRENCY ?? 50);
const raw = process.env.BENCH_RAW === "1";
const store = new JobStore(redis, { prefix, recordTtlSeconds: 3600 });

const worker = raw
  ? new Worker("raw", async () => "done", { connection: redis, prefix, concurrency })
  : new Worker<BundleJobData>(
      QUEUE_NAME,
      async (job) => {
        const { jobId } = job.data;
        const rec = await store.update(jobId, { state: "PROCESSING", startedAt: Date.now() }, { from: ["QUEUED", "PROCESSING"], addAttempts: 1 });
        await store.update(jobId, { progress: { ...rec.progress, bytesTotal: 0, filesTotal: rec.fileIds.length } }, { from: ["PROCESSING"] });
        await store.update(
          jobId,
          {
            state: "COMPLETED",
            endedAt: Date.now(),
            progress: { ...rec.progress, filesDone: rec.fileIds.length, etaSeconds: 0 },
            result: { key: `bundles/${jobId}.zip`, fileName: `download-${jobId.slice(0, 8)}.zip`, sizeBytes: 22, sha256: "0".repeat(64) },
          },
          { from: ["PROCESSING"] },
        );
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
