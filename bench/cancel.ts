import { Agent, request } from "node:http";
import { PutObjectCommand } from "@aws-sdk/client-s3";
import { QueueEvents } from "bullmq";
import { loadConfig } from "../core/config.js";
import { QUEUE_NAME } from "../core/queue.js";
import { createRedis } from "../core/redis.js";
import { Storage, storageOptionsFrom } from "../core/storage.js";
import { startRedis } from "../local/redis-server.js";
import { startS3 } from "../local/s3-server.js";
import { fmt, percentile, type Row, serviceEnv, startNodeServer } from "./lib.js";

// Cancel latency across processes: the API in one process, a real worker
// (worker/main.ts) in another, the job bundling a throttled source so that it is
// mid-stream when cancelled. Measured from Cancel returning to the processor having
// stopped, which BullMQ reports as the job's "failed" event (the processor throws
// UnrecoverableError on cancel), received here through QueueEvents. The route it takes:
// API record update + PUBLISH -> the worker's subscriber aborts the job's signal -> the
// source read and the upload are torn down -> the processor throws.

export async function benchCancel(
  opts: { quick?: boolean } = {},
): Promise<{ rows: Row[]; data: unknown }> {
  const runs = opts.quick ? 10 : 40;
  const redis = await startRedis();
  const s3 = await startS3({ buckets: ["download-sources", "download-results"] });
  const prefix = "benchcancel";
  const env = serviceEnv(redis.url, s3.endpoint, prefix);
  const storage = new Storage(storageOptionsFrom(loadConfig(env)));
  const servers: { stop(): Promise<void> }[] = [];
  const eventsConn = createRedis(redis.url, { role: "worker", name: "bench-events" });
  eventsConn.on("error", () => undefined);
  const agent = new Agent({ keepAlive: true });
  try {
    await storage.client.send(
      new PutObjectCommand({
        Bucket: storage.opts.sourceBucket,
        Key: storage.sourceKey(1),
        Body: Buffer.alloc(32 * 1024 * 1024, 7),
      }),
    );
    const [api, worker] = await Promise.all([
      startNodeServer("bench/api-server.ts", { ...env, PORT: "0" }),
      // 4 MiB/s: a 32 MiB source keeps the job streaming for 8 s, far longer than we wait.
      startNodeServer(
        "worker/main.ts",
        {
          ...env,
          LOG_LEVEL: "info",
          THROTTLE_BYTES_PER_SECOND: "4194304",
          WORKER_CONCURRENCY: "1",
        },
        { ready: "worker ready" },
      ),
    ]);
    servers.push(api, worker);
    const events = new QueueEvents(QUEUE_NAME, { connection: eventsConn, prefix });
    await events.waitUntilReady();
    const failedAt = new Map<string, number>();
    events.on("failed", ({ jobId }) => failedAt.set(jobId, performance.now()));

    const call = (method: string, body: unknown) =>
      new Promise<Record<string, any>>((resolve, reject) => {
        const req = request(
          `http://127.0.0.1:${api.port}/downloads.v1.DownloadService/${method}`,
          { method: "POST", agent, headers: { "content-type": "application/json" } },
          (res) => {
            let text = "";
            res.setEncoding("utf8");
            res.on("data", (d: string) => (text += d));
            res.on("end", () =>
              res.statusCode === 200
                ? resolve(JSON.parse(text) as Record<string, any>)
                : reject(new Error(`${method}: ${text}`)),
            );
          },
        );
        req.on("error", reject);
        req.end(JSON.stringify(body));
      });

    const latencies: number[] = [];
    const cancelCalls: number[] = [];
    for (let i = 0; i < runs; i++) {
      const jobId = (await call("Initiate", { fileIds: [1] })).job.jobId as string;
      // Mid-stream: processing, with bytes already read.
      for (;;) {
        const { job } = await call("GetStatus", { jobId });
        if (job.state === "JOB_STATE_PROCESSING" && Number(job.progress?.bytesDone ?? 0) > 0) break;
        await new Promise((r) => setTimeout(r, 20));
      }
      const t0 = performance.now();
      const cancelled = await call("Cancel", { jobId });
      const returned = performance.now();
      if (cancelled.job.state !== "JOB_STATE_CANCELLED")
        throw new Error(`Cancel left the job ${cancelled.job.state}`);
      const deadline = returned + 10_000;
      while (!failedAt.has(jobId) && performance.now() < deadline)
        await new Promise((r) => setTimeout(r, 1));
      const stopped = failedAt.get(jobId);
      if (stopped === undefined)
        throw new Error(`the processor of ${jobId} did not stop within 10 s`);
      cancelCalls.push(returned - t0);
      latencies.push(Math.max(0, stopped - returned));
    }
    await events.close();
    const p50 = percentile(latencies, 50);
    const p99 = percentile(latencies, 99);
    const rows: Row[] = [
      {
        scenario: `cancel x${runs}`,
        metric: "Cancel call ms p50",
        value: fmt(percentile(cancelCalls, 50)),
      },
      {
        scenario: `cancel x${runs}`,
        metric: "Cancel returned -> processor stopped p50 ms",
        value: fmt(p50),
      },
      {
        scenario: `cancel x${runs}`,
        metric: "Cancel returned -> processor stopped p99 ms",
        value: fmt(p99),
        target: "<= 250",
        ok: p99 <= 250,
      },
    ];
    return { rows, data: { runs, latencies, cancelCalls, p50, p99 } };
  } finally {
    agent.destroy();
    for (const s of servers) await s.stop();
    eventsConn.disconnect();
    storage.destroy();
    await s3.stop();
    await redis.stop();
  }
}
