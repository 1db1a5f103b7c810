import { randomUUID } from "node:crypto";
import { DeleteObjectCommand } from "@aws-sdk/client-s3";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { createJob } from "../core/job-transitions.js";
import { DownloadService, type Job, JobState } from "../gen/downloads/v1/download_service_pb.js";
import { freePort, waitUntil } from "../local/ports.js";
import { type RealisticS3, startRealisticS3 } from "../local/realistic-s3.js";
import { type ApiStack, startApiStack, withTestToken } from "./helpers/api.js";
import { STARTUP_MS } from "./helpers/deadline.js";
import { hasMetric, metricValue, type Sample, scrape } from "./helpers/prometheus.js";
import { spawnWorker, type WorkerProcess } from "./helpers/worker-process.js";

// /metrics as Prometheus scrapes it: the API in this process, a worker in another with
// its metrics on its health port, real Redis and S3. Every assertion is on a value that
// moved (and on its labels) because of calls this test made.

const INITIATE = "downloads.v1.DownloadService/Initiate";
const GET_STATUS = "downloads.v1.DownloadService/GetStatus";
const CANCEL = "downloads.v1.DownloadService/Cancel";

let st: ApiStack;
let worker: WorkerProcess;
let s3: RealisticS3;
let workerMetricsUrl: string;
let client: ReturnType<typeof createClient<typeof DownloadService>>;
const sizes = new Map<number, number>();

beforeAll(async () => {
  // Two attempts, so that a source S3 fails to serve is retried once.
  const env = { JOB_ATTEMPTS: "2", JOB_BACKOFF_MS: "100" };
  st = await startApiStack(env);
  for (const [id, size] of [
    [801, 8 * 1024 * 1024],
    [802, 1024 * 1024],
    [803, 700_000],
    [804, 3 * 1024 * 1024],
    [805, 10_000],
  ] as const) {
    await st.svc.putSource(id, size);
    sizes.set(id, size);
  }
  const healthPort = await freePort();
  workerMetricsUrl = `http://127.0.0.1:${healthPort}/metrics`;
  // The worker reaches S3 through the fixture, which can answer 500 for one source.
  s3 = await startRealisticS3(st.svc.s3.endpoint, "loopback");
  worker = spawnWorker({
    ...st.svc.env,
    ...env,
    S3_ENDPOINT: s3.endpoint,
    S3_PUBLIC_ENDPOINT: st.svc.s3.endpoint,
    S3_READ_ATTEMPTS: "2",
    QUEUE_PREFIX: st.cfg.QUEUE_PREFIX,
    // Slow enough that a cancel and a deletion land while a job runs.
    THROTTLE_BYTES_PER_SECOND: String(4 * 1024 * 1024),
    PROGRESS_INTERVAL_MS: "100",
    WORKER_HEALTH_PORT: String(healthPort),
  });
  await waitUntil(
    "the worker's /metrics",
    () => scrape(workerMetricsUrl).then(() => true),
    STARTUP_MS,
  );
  client = createClient(
    DownloadService,
    createConnectTransport({
      baseUrl: st.server.url,
      httpVersion: "1.1",
      interceptors: [withTestToken],
    }),
  );
});

afterAll(async () => {
  await worker?.kill("SIGTERM");
  await s3?.close();
  await st?.stop();
});

const apiMetrics = () => scrape(`${st.server.url}/metrics`);

async function settle(jobId: string): Promise<Job> {
  let job: Job | undefined;
  await expect
    .poll(
      async () => {
        job = (await client.getStatus({ jobId })).job;
        return [JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED].includes(
          job?.state ?? JobState.UNSPECIFIED,
        );
      },
      { interval: 100 },
    )
    .toBe(true);
  return job as Job;
}

async function whenReading(jobId: string, fileIndex: number): Promise<void> {
  await expect
    .poll(
      async () => {
        const job = (await client.getStatus({ jobId })).job;
        return job?.state === JobState.PROCESSING && (job.files[fileIndex]?.bytesDone ?? 0n) > 0n;
      },
      { interval: 50 },
    )
    .toBe(true);
}

describe("/metrics", () => {
  test("the API counts RPCs by procedure and code, with a latency histogram, and nothing else as an RPC", async () => {
    const before = await apiMetrics();
    const missing = await client.getStatus({ jobId: randomUUID() }).catch((e: unknown) => e);
    expect(ConnectError.from(missing).code).toBe(Code.NotFound);
    const invalid = await client.initiate({ fileIds: [] }).catch((e: unknown) => e);
    expect(ConnectError.from(invalid).code).toBe(Code.InvalidArgument);
    const { job } = await client.initiate({ fileIds: [803] });
    await settle(job?.jobId ?? "");
    expect((await fetch(`${st.server.url}/healthz`)).status).toBe(200);
    expect(
      (await fetch(`${st.server.url}/downloads.v1.NoSuchService/Nothing`, { method: "POST" }))
        .status,
    ).toBe(404);

    const after = await apiMetrics();
    const delta = (name: string, labels: Record<string, string>) =>
      metricValue(after, name, labels) - metricValue(before, name, labels);
    expect(delta("rpc_requests_total", { method: GET_STATUS, code: "not_found" })).toBe(1);
    expect(delta("rpc_requests_total", { method: INITIATE, code: "invalid_argument" })).toBe(1);
    expect(delta("rpc_requests_total", { method: INITIATE, code: "ok" })).toBe(1);
    expect(delta("rpc_requests_total", { method: GET_STATUS, code: "ok" })).toBeGreaterThanOrEqual(
      1,
    );
    expect(delta("rpc_requests_total", { method: "unknown" })).toBe(1);
    expect(delta("rpc_duration_seconds_count", { method: INITIATE })).toBe(2);
    expect(
      metricValue(after, "rpc_duration_seconds_bucket", { method: INITIATE, le: "+Inf" }),
    ).toBe(metricValue(after, "rpc_duration_seconds_count", { method: INITIATE }));
    expect(metricValue(after, "rpc_duration_seconds_sum", { method: INITIATE })).toBeGreaterThan(0);
    // Probes, pages and /metrics itself are not RPCs: no series carries their paths.
    const methods = new Set(
      after.filter((s) => s.name === "rpc_requests_total").map((s) => s.labels.method),
    );
    expect(
      [...methods].every(
        (m) => m === "unknown" || m?.startsWith("downloads.v1.") || m?.startsWith("grpc."),
      ),
    ).toBe(true);
    // Node's own process metrics come along.
    expect(metricValue(after, "process_resident_memory_bytes")).toBeGreaterThan(0);
    expect(hasMetric(after, "nodejs_eventloop_lag_seconds")).toBe(true);
  });

  test("watch_streams_open follows the WatchJob streams open on this API", async () => {
    // A job that no worker will take, so the stream stays open until the client leaves.
    const jobId = randomUUID();
    await createJob(st.store, jobId, [1], st.owner);
    const streams = async () => metricValue(await apiMetrics(), "watch_streams_open");
    expect(await streams()).toBe(0);
    const canceled = async () =>
      metricValue(await apiMetrics(), "rpc_requests_total", {
        method: "downloads.v1.DownloadService/WatchJob",
        code: "canceled",
      });
    const canceledBefore = await canceled();
    const ctl = new AbortController();
    const watching = (async () => {
      for await (const _ of client.watchJob({ jobId }, { signal: ctl.signal })) {
        // only holding the stream open
      }
    })().catch(() => undefined);
    await expect.poll(streams, { interval: 50 }).toBe(1);
    ctl.abort();
    await watching;
    await expect.poll(streams, { interval: 50 }).toBe(0);
    // The client hung up: the call counts as canceled, not ok.
    expect(await canceled()).toBe(canceledBefore + 1);
  });

  test("the worker counts completed, cancelled, retried and failed runs, bytes and cancel latency", async () => {
    const before = await scrape(workerMetricsUrl);
    const apiBefore = await apiMetrics();

    const done = await client.initiate({ fileIds: [802, 803] });
    expect((await settle(done.job?.jobId ?? "")).state).toBe(JobState.COMPLETED);

    const running = await client.initiate({ fileIds: [801] });
    const runningId = running.job?.jobId ?? "";
    await whenReading(runningId, 0);
    // While it runs: one run in progress in this worker, and how old it is (the
    // stuck-job alert reads the age).
    const during = await scrape(workerMetricsUrl);
    expect(metricValue(during, "jobs_running")).toBe(1);
    expect(metricValue(during, "job_oldest_run_seconds")).toBeGreaterThan(0);
    expect(metricValue(during, "readiness_ok")).toBe(1);
    expect((await client.cancel({ jobId: runningId })).job?.state).toBe(JobState.CANCELLED);

    // S3 answers 500 for the second source's GET (transient: the attempt fails and is
    // retried), and the source is deleted once the first attempt has asked for it: the
    // retry's HEAD finds it missing and fails the job with not_found. The first GET is
    // the signal, not the first file's progress: the worker reads ahead, so the 500 may
    // end the attempt before any progress is written.
    const path805 = `/${st.cfg.SOURCE_BUCKET}/${st.svc.storage.sourceKey(805)}`;
    s3.failKey(path805, { status: 500, code: "InternalError", methods: ["GET"] });
    const flaky = await client.initiate({ fileIds: [804, 805] });
    const flakyId = flaky.job?.jobId ?? "";
    await expect.poll(() => s3.stats.byKey.get(`GET ${path805}`) ?? 0).toBeGreaterThan(0);
    await st.svc.storage.client.send(
      new DeleteObjectCommand({ Bucket: st.cfg.SOURCE_BUCKET, Key: st.svc.storage.sourceKey(805) }),
    );
    const failed = await settle(flakyId);
    expect(failed.state).toBe(JobState.FAILED);
    expect(failed.error?.code).toBe("not_found");
    expect(failed.attempts).toBe(2);

    let after: Sample[] = [];
    const delta = (name: string, labels: Record<string, string> = {}) =>
      metricValue(after, name, labels) - metricValue(before, name, labels);
    // A run is reported once the worker has let go of it, a moment after the job's
    // record shows its end: poll until every run is in.
    await expect
      .poll(
        async () => {
          after = await scrape(workerMetricsUrl);
          return {
            completed: delta("job_duration_seconds_count", { outcome: "completed" }),
            cancelled: delta("job_duration_seconds_count", { outcome: "cancelled" }),
            retry: delta("job_duration_seconds_count", { outcome: "retry" }),
            failed: delta("job_duration_seconds_count", { outcome: "failed" }),
            retries: delta("job_retries_total"),
            notFound: delta("job_failures_total", { code: "not_found" }),
            cancelLatencies: delta("cancel_latency_seconds_count"),
          };
        },
        { interval: 100 },
      )
      .toEqual({
        completed: 1,
        cancelled: 1,
        retry: 1,
        failed: 1,
        retries: 1,
        notFound: 1,
        cancelLatencies: 1,
      });
    expect(delta("cancel_latency_seconds_sum")).toBeGreaterThan(0);
    await expect
      .poll(async () => {
        const s = await scrape(workerMetricsUrl);
        return [metricValue(s, "jobs_running"), metricValue(s, "job_oldest_run_seconds")];
      })
      .toEqual([0, 0]);
    // Everything of the completed job, and some of the cancelled and the retried ones.
    const completedBytes = (sizes.get(802) ?? 0) + (sizes.get(803) ?? 0);
    expect(delta("job_bytes_total")).toBeGreaterThan(completedBytes);
    expect(metricValue(after, "process_resident_memory_bytes")).toBeGreaterThan(0);

    const apiAfter = await apiMetrics();
    expect(
      metricValue(apiAfter, "rpc_requests_total", { method: CANCEL, code: "ok" }) -
        metricValue(apiBefore, "rpc_requests_total", { method: CANCEL, code: "ok" }),
    ).toBe(1);
    // BullMQ keeps the cancelled and the failed job as failed, the completed as completed
    // (the gauge is read from Redis at most every 2 s).
    await expect
      .poll(
        async () => {
          const s = await apiMetrics();
          return [
            metricValue(s, "queue_jobs", { state: "completed" }) >= 2,
            metricValue(s, "queue_jobs", { state: "failed" }) >= 2,
          ];
        },
        { interval: 200 },
      )
      .toEqual([true, true]);
  });
});
