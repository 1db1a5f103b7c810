import { execFile } from "node:child_process";
import { join } from "node:path";
import { promisify } from "node:util";
import { timestampMs } from "@bufbuild/protobuf/wkt";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { createDownloadClient } from "../clients/lib/client.js";
import { watchJob } from "../clients/lib/watch.js";
import { fitRunModel, predictRunMs, recordRun } from "../core/forecast.js";
import { JobStore } from "../core/job-store.js";
import { type JobRecord, newJobRecord } from "../core/jobs.js";
import { type Job, JobState } from "../gen/downloads/v1/download_service_pb.js";
import { type ApiStack, startApiStack, TEST_TOKEN, testClient } from "./helpers/api.js";
import { uniquePrefix } from "./helpers/services.js";
import { readEvents } from "./helpers/sse.js";
import { spawnWorker, type WorkerProcess } from "./helpers/worker-process.js";

// Queue position and predicted times, against a real worker process that bundles real S3
// objects at a throttled rate with one slot: the first job runs, the others wait in line
// and report their place and when they should start and end. No figure of time is
// asserted (the bench measures the error); what a user checks is: the order is right,
// times come in the order the jobs will run, and positions move up as the queue drains.

let st: ApiStack;
let worker: WorkerProcess;
let client: ReturnType<typeof testClient>;
const MiB = 1024 * 1024;
const run = promisify(execFile);

beforeAll(async () => {
  st = await startApiStack();
  for (const id of [11, 12, 13, 14]) await st.svc.putSource(id, 3 * MiB);
  worker = spawnWorker({
    ...st.svc.env,
    QUEUE_PREFIX: st.cfg.QUEUE_PREFIX,
    WORKER_CONCURRENCY: "1",
    // About 3 s a job: long enough to look at the queue while one runs.
    THROTTLE_BYTES_PER_SECOND: String(MiB),
    PROGRESS_INTERVAL_MS: "100",
  });
  client = testClient(st.server.url);
});
afterAll(async () => {
  await worker?.kill("SIGTERM");
  await st?.stop();
});

async function status(jobId: string): Promise<Job> {
  const { job } = await client.getStatus({ jobId });
  if (job === undefined) throw new Error("no job");
  return job;
}

async function waitFor(jobId: string, ok: (job: Job) => boolean, what: string): Promise<Job> {
  const deadline = Date.now() + 90_000;
  for (;;) {
    const job = await status(jobId);
    if (ok(job)) return job;
    if (Date.now() > deadline) throw new Error(`job ${jobId} never ${what}; last ${job.state}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

const ms = (t: Parameters<typeof timestampMs>[0] | undefined) =>
  t === undefined ? Number.NaN : timestampMs(t);

describe("queue position and predicted times", () => {
  test("waiting jobs report their place and times in the order they will run", async () => {
    // Nothing measured yet: a job gets no predicted times (they come from measurements).
    const first = (await client.initiate({ fileIds: [11] })).job as Job;
    expect(first.estimate?.predictedEndTime).toBeUndefined();
    await waitFor(first.jobId, (j) => j.state === JobState.COMPLETED, "completed");

    const [a, b, c] = await Promise.all(
      [[12], [13], [14]].map(async (fileIds) => (await client.initiate({ fileIds })).job as Job),
    );
    const [running, next, last] = [a, b, c].map((j) => j?.jobId as string) as [
      string,
      string,
      string,
    ];
    const r = await waitFor(
      running,
      (j) => j.state === JobState.PROCESSING && j.estimate?.predictedEndTime !== undefined,
      "ran with a predicted end",
    );
    expect(r.estimate?.position).toBe(0);
    expect(r.estimate?.samples).toBeGreaterThanOrEqual(1);
    expect(r.estimate?.runningJobs).toBe(1);
    expect(r.estimate?.bytesPerSecond).toBeGreaterThan(0n);

    const [n, l] = await Promise.all([status(next), status(last)]);
    expect(n.state).toBe(JobState.QUEUED);
    expect(l.state).toBe(JobState.QUEUED);
    expect(n.estimate?.position).toBe(1);
    expect(l.estimate?.position).toBe(2);
    // One slot: the next job starts before the last one, and each ends after it starts.
    const nStart = ms(n.estimate?.predictedStartTime);
    const nEnd = ms(n.estimate?.predictedEndTime);
    const lStart = ms(l.estimate?.predictedStartTime);
    const lEnd = ms(l.estimate?.predictedEndTime);
    expect(nStart).toBeGreaterThan(Date.now() - 60_000);
    expect(nEnd).toBeGreaterThan(nStart);
    expect(lStart).toBeGreaterThan(nStart);
    expect(lEnd).toBeGreaterThan(lStart);

    // The queue drains: the last job moves up to the front, then runs, then ends.
    await waitFor(last, (j) => j.estimate?.position === 1, "moved to position 1");
    await waitFor(last, (j) => j.state === JobState.COMPLETED, "completed");
    const done = await status(last);
    expect(done.estimate).toBeUndefined();
  });
});

describe("following a queued job", () => {
  test("its watchers see its place move up with no new version: WatchJob, watchJob and SSE", async () => {
    // Two jobs ahead, about 3 s each; a queued job's heartbeat comes every 2 s
    // (WATCH_QUEUED_HEARTBEAT_MS) with its estimate, so each place is seen at least once.
    await client.initiate({ fileIds: [12] });
    await client.initiate({ fileIds: [14] });
    const mine = (await client.initiate({ fileIds: [13] })).job as Job;
    expect(mine.state).toBe(JobState.QUEUED);

    // The raw stream: heartbeats of the job's own version, carrying the estimate.
    const ctl = new AbortController();
    const beats: { version: number; position: number }[] = [];
    const raw = (async () => {
      for await (const m of client.watchJob({ jobId: mine.jobId }, { signal: ctl.signal })) {
        if (m.event.case === "heartbeat" && m.event.value.estimate !== undefined)
          beats.push({ version: m.event.value.version, position: m.event.value.estimate.position });
        if (m.event.case === "job" && m.event.value.state !== JobState.QUEUED) return;
      }
    })();
    // Server-sent events: the same heartbeats as `event: estimate`.
    const sse = readEvents(`${st.server.url}/v1/jobs/${mine.jobId}/events`, {
      authorization: `Bearer ${TEST_TOKEN}`,
    });
    // The client library: the queued snapshot again with each fresher estimate.
    const lib = createDownloadClient({ baseUrl: st.server.url, token: TEST_TOKEN });
    const seen: Job[] = [];
    for await (const job of watchJob(lib, mine.jobId, { queueEstimates: true })) {
      seen.push(job);
      if (job.state !== JobState.QUEUED) break;
    }
    await raw;
    sse.abort();

    const queued = seen.filter((j) => j.state === JobState.QUEUED);
    const positions = queued.map((j) => j.estimate?.position ?? 0);
    expect(new Set(queued.map((j) => j.version))).toEqual(new Set([mine.version]));
    expect(positions.at(-1)).toBe(1);
    expect(Math.max(...positions), `positions ${positions}`).toBeGreaterThan(1);
    // Never back down the queue.
    expect(positions).toEqual([...positions].sort((a, b) => b - a));
    expect(seen.at(-1)?.state).not.toBe(JobState.QUEUED);

    expect(beats.map((b) => b.version).every((v) => v === mine.version)).toBe(true);
    expect(beats.map((b) => b.position)).toContain(1);

    const estimates = sse.events
      .filter((e) => e.event === "estimate")
      .map(
        (e) =>
          JSON.parse(e.data ?? "{}") as {
            heartbeat: { version: number; estimate: { position: number } };
          },
      );
    expect(estimates.length).toBeGreaterThan(0);
    expect(estimates.every((e) => e.heartbeat.version === mine.version)).toBe(true);
    expect(estimates.map((e) => e.heartbeat.estimate.position)).toContain(1);
    await waitFor(mine.jobId, (j) => j.state === JobState.COMPLETED, "completed");
  });
});

describe("the CLI", () => {
  test("initiate --watch shows the job's place in the queue while it waits", async () => {
    // Two jobs ahead (about 6 s of work): the CLI's job waits even if it starts slowly.
    const running = (await client.initiate({ fileIds: [12] })).job as Job;
    await client.initiate({ fileIds: [14] });
    await waitFor(running.jobId, (j) => j.state === JobState.PROCESSING, "ran");
    const { stdout, stderr } = await run(
      process.execPath,
      [join(import.meta.dirname, "..", "bin", "download-jobs.js"), "initiate", "13", "--watch"],
      {
        env: {
          ...process.env,
          DOWNLOAD_JOBS_URL: st.server.url,
          DOWNLOAD_JOBS_TOKEN: TEST_TOKEN,
        },
      },
    );
    const queued = stdout.split("\n").filter((l) => l.startsWith("QUEUED"));
    expect(queued.length, stderr).toBeGreaterThan(0);
    expect(queued[0]).toMatch(/#[12] in queue/);
    // Runs have been measured by now (the test above), so the times are there too.
    expect(queued[0]).toMatch(/starts ~\d\d:\d\d:\d\d, ready ~\d\d:\d\d:\d\d/);
    expect(stdout).toMatch(/^COMPLETED/m);
  });
});

describe("sizing a new job", () => {
  test("Initiate asks S3 for the sizes of files no worker has seen, for the job's first estimate", async () => {
    await st.svc.putSource(21, 1 * MiB);
    await st.svc.putSource(22, 5 * MiB);
    const sizes = () => st.redis.hmget(st.store.keys.fileSizes, "21", "22");
    expect(await sizes()).toEqual([null, null]);
    const job = (await client.initiate({ fileIds: [21, 22] })).job as Job;
    // Cancelled at once: no run completes, so no worker records these sizes.
    await client.cancel({ jobId: job.jobId });
    // Initiate waits a moment for them; on a slow machine they land just after.
    await expect.poll(sizes, { timeout: 30_000 }).toEqual([String(MiB), String(5 * MiB)]);
  });
});

describe("run measurements", () => {
  test("the fit recovers how run time grows with files and bytes", async () => {
    // Runs as a worker records them, made up so the truth is known:
    // seconds = 0.4 + 0.05 per file + 0.02 per MB.
    const store = new JobStore(st.redis, {
      prefix: uniquePrefix("fit"),
      recordTtlSeconds: 60,
    });
    const truth = (files: number, bytes: number) => 0.4 + 0.05 * files + 0.02 * (bytes / 1e6);
    let fileId = 1000;
    for (const [files, mb] of [
      [1, 1],
      [5, 200],
      [20, 20],
      [2, 500],
      [50, 50],
      [3, 3],
      [10, 300],
    ] as const) {
      const rec: JobRecord = newJobRecord(
        `00000000-0000-4000-8000-${String(fileId).padStart(12, "0")}`,
        "o",
        Array.from({ length: files }, () => fileId++),
        Date.now(),
      );
      for (const f of rec.files) f.sizeBytes = (mb * 1e6) / files;
      await recordRun(store, rec, truth(files, mb * 1e6) * 1000);
    }
    const model = fitRunModel(await st.redis.hgetall(store.keys.runStats));
    expect(model?.samples).toBe(7);
    const m = model as NonNullable<typeof model>;
    for (const [files, bytes] of [
      [1, 1e6],
      [30, 400e6],
      [7, 70e6],
    ] as const) {
      expect(predictRunMs(m, files, bytes) / 1000).toBeCloseTo(truth(files, bytes), 2);
    }
    // The sizes seen are kept for sizing queued jobs of the same files.
    expect(Number(await st.redis.hget(store.keys.fileSizes, "1000"))).toBe(1e6);
  });
});
