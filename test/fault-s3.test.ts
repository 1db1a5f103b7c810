import { createClient } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { pino } from "pino";
import { afterAll, beforeAll, expect, test } from "vitest";
import type { JobRecord } from "../core/jobs.js";
import { DownloadService } from "../gen/downloads/v1/download_service_pb.js";
import { type RunningWorker, startWorker } from "../worker/worker.js";
import { type ApiStack, startApiStack, withTestToken } from "./helpers/api.js";
import { type S3FaultProxy, startS3FaultProxy } from "./helpers/s3-fault-proxy.js";
import { readZip } from "./helpers/zip.js";

// Fault: the worker reaches S3 through a proxy that answers 503 SlowDown, resets
// connections and cuts downloads half-way, on a share of requests. Jobs still complete
// with the right bytes (the SDK's and the queue's retries absorb it); a file that does
// not exist fails its job at once, and nothing retries it.

const RATES = { slowDown: 0.12, reset: 0.06, cutBody: 0.08 };
const JOBS: number[][] = [
  [601, 602],
  [602, 603],
  [603, 604],
  [604, 605],
  [605, 601],
  [601, 603, 605],
  [602, 604],
  [606],
];

let st: ApiStack;
let proxy: S3FaultProxy;
let worker: RunningWorker;
const sources = new Map<number, Buffer>();

beforeAll(async () => {
  st = await startApiStack({ JOB_ATTEMPTS: "8", JOB_BACKOFF_MS: "100" });
  for (const id of [601, 602, 603, 604, 605, 606])
    sources.set(id, await st.svc.putSource(id, 200_000 + id * 7));
  proxy = await startS3FaultProxy(st.svc.s3.endpoint, RATES);
  // The worker talks to S3 only through the proxy; download URLs point at S3 itself.
  worker = await startWorker(
    {
      ...st.cfg,
      S3_ENDPOINT: proxy.endpoint,
      S3_PUBLIC_ENDPOINT: st.svc.s3.endpoint,
      WORKER_CONCURRENCY: 4,
    },
    pino({ level: "silent" }),
  );
});
afterAll(async () => {
  await worker?.close();
  await proxy?.close();
  await st?.stop();
});

const client = () =>
  createClient(
    DownloadService,
    createConnectTransport({
      baseUrl: st.server.url,
      httpVersion: "1.1",
      interceptors: [withTestToken],
    }),
  );

async function ended(jobId: string): Promise<JobRecord> {
  let rec: JobRecord | undefined;
  await expect
    .poll(async () => (rec = await st.store.get(jobId)).state, { timeout: 90_000, interval: 100 })
    .toMatch(/COMPLETED|FAILED|CANCELLED/);
  return rec as JobRecord;
}

test("jobs complete through 503s, connection resets and cut downloads, with the right bytes", async () => {
  const ids = await Promise.all(
    JOBS.map(async (fileIds) => (await client().initiate({ fileIds })).job?.jobId ?? ""),
  );
  const done = await Promise.all(ids.map(ended));
  const wrong: string[] = [];
  for (const [i, rec] of done.entries()) {
    if (rec.state !== "COMPLETED") {
      wrong.push(`${rec.id}: ${rec.state} ${rec.error?.message ?? ""}`);
      continue;
    }
    const { job } = await client().getStatus({ jobId: rec.id });
    const entries = await readZip(
      Buffer.from(await (await fetch(job?.result?.downloadUrl ?? "")).arrayBuffer()),
    );
    for (const fileId of JOBS[i] ?? []) {
      if (!entries.get(`file-${fileId}`)?.equals(sources.get(fileId) as Buffer))
        wrong.push(`${rec.id}: file ${fileId}`);
    }
  }
  const runs = done.reduce((n, r) => n + r.attempts, 0);
  const s = proxy.stats;
  console.log(
    `fault s3: ${s.requests} S3 requests through the fault proxy, ${s.slowDowns} answered 503, ${s.resets} reset, ` +
      `${s.cutBodies} downloads cut; ${done.length} jobs, ${runs} runs in all, ` +
      `${done.filter((r) => r.state === "COMPLETED").length} completed byte-identical; lost: ${wrong.length}`,
  );
  expect(wrong).toEqual([]);
  // The faults really happened.
  expect(s.slowDowns + s.resets + s.cutBodies).toBeGreaterThan(3);
}, 180_000);

test("a file that does not exist fails its job at once with not_found, and nothing retries it", async () => {
  const started = Date.now();
  const jobId = (await client().initiate({ fileIds: [601, 999_601] })).job?.jobId ?? "";
  const rec = await ended(jobId);
  const tookMs = Date.now() - started;
  expect(rec.state).toBe("FAILED");
  expect(rec.error).toMatchObject({
    code: "not_found",
    retryable: false,
    missingFileIds: [999_601],
  });
  const bull = await st.queue.getJob(jobId);
  await expect.poll(() => bull?.getState()).toBe("failed");
  const headsBefore =
    proxy.stats.byKey.get(`HEAD /${st.cfg.SOURCE_BUCKET}/${st.cfg.SOURCE_PREFIX}999601`) ?? 0;
  // Several backoff periods later: no new attempt, no new look at the missing file.
  await new Promise((r) => setTimeout(r, 1500));
  const after = await st.store.get(jobId);
  expect(after.version).toBe(rec.version);
  expect(
    proxy.stats.byKey.get(`HEAD /${st.cfg.SOURCE_BUCKET}/${st.cfg.SOURCE_PREFIX}999601`) ?? 0,
  ).toBe(headsBefore);
  console.log(
    `fault s3: a missing file failed its job in ${tookMs} ms (attempts ${rec.attempts}, ${headsBefore} HEADs of it ` +
      `including the SDK's own retries of injected faults), then nothing retried it`,
  );
});
