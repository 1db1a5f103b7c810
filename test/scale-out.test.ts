import { HeadObjectCommand } from "@aws-sdk/client-s3";
import { createClient } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import type { Queue } from "bullmq";
import type { Redis } from "ioredis";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { type BundleJobData, createBundleQueue } from "../core/queue.js";
import { createRedis } from "../core/redis.js";
import { DownloadService, type Job, JobState } from "../gen/downloads/v1/download_service_pb.js";
import { waitUntil } from "../local/ports.js";
import { withTestToken } from "./helpers/api.js";
import { type EntryProcess, startEntry, untilLogged } from "./helpers/entry-process.js";
import { type Services, startServices, uniquePrefix } from "./helpers/services.js";

// The scaled-out shape on one Redis: two API processes and two worker processes, all
// started from their real entry points, none of them this test's process. Which worker
// runs a job is BullMQ's choice; the test finds out from the workers' own log lines.

type Proc = EntryProcess;

let svc: Services;
let queue: Queue<BundleJobData>;
let conn: Redis;
const apis: (Proc & { url: string })[] = [];
// api-a and api-b, in the order they were started.
const workers: Proc[] = [];

beforeAll(async () => {
  svc = await startServices();
  await svc.putSource(601, 6 * 1024 * 1024);
  await svc.putSource(602, 2 * 1024 * 1024);
  const env = {
    ...svc.env,
    QUEUE_PREFIX: uniquePrefix("scale"),
    HOST: "127.0.0.1",
    PORT: "0",
    LOG_LEVEL: "info",
    LOG_FORMAT: "json",
    WATCH_HEARTBEAT_MS: "1000",
    // Slow enough that progress shows and a cancel lands while the job runs.
    THROTTLE_BYTES_PER_SECOND: String(3 * 1024 * 1024),
    PROGRESS_INTERVAL_MS: "100",
  };
  // All four start at once; each is waited for by what it logs when it is ready.
  const ready = untilLogged;
  const start = startEntry;
  const starting = [
    ...["api-a", "api-b"].map(async (name) => {
      const p = start(name, "server/main.ts", env);
      apis.push({ ...p, url: "" });
      await ready(name, p, "api listening (HTTP/1.1 and h2c)");
      return p;
    }),
    ...["worker-1", "worker-2"].map(async (name) => {
      const p = start(name, "worker/main.ts", env);
      workers.push(p);
      await ready(name, p, "worker ready");
    }),
  ];
  await Promise.all(starting);
  for (const api of apis) api.url = String(api.lines.find((l) => l.url !== undefined)?.url);
  conn = createRedis(svc.redis.url, { role: "api" });
  queue = createBundleQueue(conn, { prefix: env.QUEUE_PREFIX, attempts: 1, backoffMs: 0 });
});

afterAll(async () => {
  await Promise.all([...apis, ...workers].map((p) => p.proc.stop(10_000)));
  await queue?.close();
  conn?.disconnect();
  await svc?.stop();
});

function client(api: { url: string }) {
  return createClient(
    DownloadService,
    createConnectTransport({ baseUrl: api.url, httpVersion: "1.1", interceptors: [withTestToken] }),
  );
}

/** The worker process whose log says it started `jobId`. */
async function workerRunning(jobId: string): Promise<Proc> {
  let found: Proc | undefined;
  await waitUntil(`a worker running ${jobId}`, async () => {
    found = workers.find((w) => w.lines.some((l) => l.msg === "job started" && l.jobId === jobId));
    return found !== undefined;
  });
  return found as Proc;
}

describe("several API and worker processes on one Redis", () => {
  test("a watch on API A streams the progress a worker in another process makes, to COMPLETED", async () => {
    const a = client(apis[0] as { url: string });
    const { job } = await a.initiate({ fileIds: [602, 601] });
    const jobId = job?.jobId ?? "";
    const seen: Job[] = [];
    for await (const msg of a.watchJob({ jobId })) {
      if (msg.event.case === "job") seen.push(msg.event.value);
    }
    const runner = await workerRunning(jobId);
    expect(runner.proc.pid).not.toBe(apis[0]?.proc.pid);
    // The worker logs after its completing write returns, so the line may follow the
    // watcher's COMPLETED by a moment.
    await waitUntil(`the worker's log of ${jobId} completed`, async () =>
      runner.lines.some((l) => l.msg === "job completed" && l.jobId === jobId),
    );
    // Several distinct progress steps arrived through A, though A never ran the job.
    const processing = seen.filter((j) => j.state === JobState.PROCESSING);
    const steps = new Set(processing.map((j) => j.progress?.bytesDone ?? 0n));
    expect(steps.size).toBeGreaterThanOrEqual(3);
    expect(seen.at(-1)?.state).toBe(JobState.COMPLETED);
    expect(seen.at(-1)?.progress?.percent).toBe(100);
  });

  test("a Cancel through API B stops the job in the worker process that runs it, leaving no result", async () => {
    const a = client(apis[0] as { url: string });
    const b = client(apis[1] as { url: string });
    const { job } = await a.initiate({ fileIds: [601] });
    const jobId = job?.jobId ?? "";
    await expect
      .poll(
        async () => {
          const j = (await a.getStatus({ jobId })).job;
          return j?.state === JobState.PROCESSING && (j.progress?.bytesDone ?? 0n) > 0n;
        },
        { interval: 50 },
      )
      .toBe(true);
    const runner = await workerRunning(jobId);
    const watched: Job[] = [];
    const watching = (async () => {
      for await (const msg of a.watchJob({ jobId }))
        if (msg.event.case === "job") watched.push(msg.event.value);
    })();

    const cancelAt = Date.now();
    expect((await b.cancel({ jobId })).job?.state).toBe(JobState.CANCELLED);

    // The worker heard the cancel through Redis (not only through a failed progress
    // write) and stopped; BullMQ ends the job failed, without a return value.
    await waitUntil("the worker to stop the job", async () =>
      runner.lines.some((l) => l.msg === "job cancelled" && l.jobId === jobId),
    );
    expect(runner.lines.some((l) => l.msg === "cancel received" && l.jobId === jobId)).toBe(true);
    const stopped = runner.lines.find((l) => l.msg === "job cancelled" && l.jobId === jobId);
    const stopMs = Number(stopped?.time) - cancelAt;
    console.info(
      `cancel through API B -> job stopped in worker pid ${runner.proc.pid}: ${stopMs} ms`,
    );
    await expect.poll(() => queue.getJobState(jobId)).toBe("failed");
    const bull = await queue.getJob(jobId);
    expect(bull?.failedReason).toBe("cancelled");
    expect(bull?.returnvalue ?? null).toBeNull();
    const head = await svc.storage.client
      .send(
        new HeadObjectCommand({
          Bucket: svc.storage.opts.resultBucket,
          Key: svc.storage.resultKey(jobId),
        }),
      )
      .then(
        () => "exists",
        (err: { name?: string }) => err.name,
      );
    expect(head).toBe("NotFound");

    await watching;
    expect(watched.at(-1)?.state).toBe(JobState.CANCELLED);
    expect((await a.getStatus({ jobId })).job?.state).toBe(JobState.CANCELLED);
  });
});
