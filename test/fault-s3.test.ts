import { PutObjectCommand } from "@aws-sdk/client-s3";
import { createClient } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { pino } from "pino";
import { afterAll, beforeAll, expect, test } from "vitest";
import type { JobRecord } from "../core/jobs.js";
import { DownloadService } from "../gen/downloads/v1/download_service_pb.js";
import { type RealisticS3, S3_PROFILES, startRealisticS3 } from "../local/realistic-s3.js";
import { type RunningWorker, startWorker } from "../worker/worker.js";
import { type ApiStack, startApiStack, withTestToken } from "./helpers/api.js";
import { type Services, startServices } from "./helpers/services.js";
import { readZip } from "./helpers/zip.js";

// Fault: the worker reaches S3 through the realistic-S3 fixture (local/realistic-s3.ts),
// which answers 503 SlowDown, resets connections, cuts bodies and stalls them on a share
// of requests, and refuses chosen keys as S3 does. Jobs still complete with the right
// bytes; a missing, forbidden, archived or changed file fails its job at once, naming
// the file; a job past MAX_JOB_SECONDS fails with deadline_exceeded.

let svc: Services;
const stacks: { st: ApiStack; proxy: RealisticS3; worker: RunningWorker }[] = [];

beforeAll(async () => {
  svc = await startServices();
});
afterAll(async () => {
  for (const { st, proxy, worker } of stacks) {
    await worker.close();
    await proxy.close();
    await st.stop();
  }
  await svc?.stop();
});

/** An API and an in-process worker that reaches S3 only through a fixture of its own. */
async function stack(
  behaviour: Parameters<typeof startRealisticS3>[1],
  overrides: Record<string, string> = {},
) {
  const st = await startApiStack(
    { JOB_ATTEMPTS: "8", JOB_BACKOFF_MS: "100", ...overrides },
    { services: svc },
  );
  const proxy = await startRealisticS3(svc.s3.endpoint, behaviour);
  // Download URLs point at S3 itself.
  const worker = await startWorker(
    { ...st.cfg, S3_ENDPOINT: proxy.endpoint, S3_PUBLIC_ENDPOINT: svc.s3.endpoint },
    pino({ level: process.env.S3_TEST_LOG ?? "silent" }),
  );
  const entry = { st, proxy, worker };
  stacks.push(entry);
  const client = createClient(
    DownloadService,
    createConnectTransport({
      baseUrl: st.server.url,
      httpVersion: "1.1",
      interceptors: [withTestToken],
    }),
  );
  const ended = async (jobId: string): Promise<JobRecord> => {
    let rec: JobRecord | undefined;
    await expect
      .poll(async () => (rec = await st.store.get(jobId)).state, {
        timeout: 120_000,
        interval: 100,
      })
      .toMatch(/COMPLETED|FAILED|CANCELLED/);
    return rec as JobRecord;
  };
  const zipOf = async (jobId: string) => {
    const { job } = await client.getStatus({ jobId });
    const res = await fetch(job?.result?.downloadUrl ?? "");
    return readZip(Buffer.from(await res.arrayBuffer()));
  };
  const start = async (fileIds: number[]) => (await client.initiate({ fileIds })).job?.jobId ?? "";
  return { ...entry, client, ended, zipOf, start };
}

const sourcePath = (id: number) => `/download-sources/files/${id}`;

test("jobs complete through 503s, resets, cut and stalled bodies, with the right bytes", async () => {
  const jobs = [
    [601, 602],
    [602, 603],
    [603, 604],
    [604, 605],
    [605, 601],
    [601, 603, 605],
    [602, 604],
    [606],
  ];
  const sources = new Map<number, Buffer>();
  for (const id of [601, 602, 603, 604, 605, 606])
    sources.set(id, await svc.putSource(id, 2_500_000 + id * 7));
  // Small ranges: every file is read as several ranged GETs, so resumes happen mid-file.
  // Stalls more often than the profile, so that some surely happen in a run this short.
  const s = await stack(
    { ...S3_PROFILES.hostile, stall: 0.15 },
    {
      S3_STALL_MS: "1000",
      READ_RANGE_BYTES: String(1024 * 1024),
      WORKER_CONCURRENCY: "4",
    },
  );
  const ids = await Promise.all(jobs.map((fileIds) => s.start(fileIds)));
  const done = await Promise.all(ids.map(s.ended));
  const wrong: string[] = [];
  for (const [i, rec] of done.entries()) {
    if (rec.state !== "COMPLETED") {
      wrong.push(`${rec.id}: ${rec.state} ${rec.error?.message ?? ""}`);
      continue;
    }
    const entries = await s.zipOf(rec.id);
    for (const fileId of jobs[i] ?? []) {
      if (!entries.get(`file-${fileId}`)?.equals(sources.get(fileId) as Buffer))
        wrong.push(`${rec.id}: file ${fileId}`);
    }
  }
  const st = s.proxy.stats;
  console.log(
    `fault s3: ${st.requests} requests through the fixture: ${st.slowDowns} SlowDown, ${st.resets} reset, ` +
      `${st.cutBodies} bodies cut, ${st.stalls} stalled; ${done.length} jobs, ` +
      `${done.reduce((n, r) => n + r.attempts, 0)} runs; wrong: ${wrong.length}`,
  );
  expect(wrong).toEqual([]);
  // The faults really happened, stalls included.
  expect(st.slowDowns + st.resets + st.cutBodies).toBeGreaterThan(3);
  expect(st.stalls).toBeGreaterThan(0);
}, 240_000);

test("at realistic latency the sources are read several at a time, in file order in the ZIP", async () => {
  const ids = Array.from({ length: 40 }, (_, i) => 700 + i);
  const sources = new Map<number, Buffer>();
  for (const id of ids) sources.set(id, await svc.putSource(id, 20_000 + id));
  const s = await stack("realistic", { READ_AHEAD_OBJECTS: "8" });
  const jobId = await s.start(ids);
  const rec = await s.ended(jobId);
  expect(rec.state).toBe("COMPLETED");
  expect(rec.files.map((f) => [f.fileId, f.state, f.bytesDone])).toEqual(
    ids.map((id) => [id, "DONE", sources.get(id)?.length]),
  );
  const entries = await s.zipOf(jobId);
  expect([...entries.keys()]).toEqual(ids.map((id) => `file-${id}`));
  for (const id of ids)
    expect(entries.get(`file-${id}`)?.equals(sources.get(id) as Buffer)).toBe(true);
  // More than one GET in flight at once, never more than the window.
  expect(s.proxy.stats.peakConcurrentGets).toBeGreaterThan(1);
  expect(s.proxy.stats.peakConcurrentGets).toBeLessThanOrEqual(8);
}, 120_000);

test("a missing, forbidden or archived file fails its job at once, naming it, and nothing retries it", async () => {
  await svc.putSource(801, 10_000);
  await svc.putSource(802, 10_000);
  await svc.putSource(803, 10_000);
  const s = await stack("loopback");
  s.proxy.failKey(sourcePath(802), { status: 403, code: "AccessDenied" });
  s.proxy.failKey(sourcePath(803), { status: 403, code: "InvalidObjectState", methods: ["GET"] });
  const cases = [
    { fileIds: [801, 999_801], code: "not_found", names: "999801" },
    { fileIds: [801, 802], code: "permission_denied", names: "802" },
    { fileIds: [801, 803], code: "failed_precondition", names: "803" },
  ];
  for (const c of cases) {
    const jobId = await s.start(c.fileIds);
    const rec = await s.ended(jobId);
    expect(rec.state).toBe("FAILED");
    expect(rec.error?.code).toBe(c.code);
    expect(rec.error?.retryable).toBe(false);
    expect(rec.error?.message).toContain(c.names);
    expect(rec.attempts).toBe(1);
    const bull = await s.st.queue.getJob(jobId);
    await expect.poll(() => bull?.getState()).toBe("failed");
  }
  const requestsBefore = s.proxy.stats.requests;
  // Several backoff periods later: no new attempt touched S3.
  await new Promise((r) => setTimeout(r, 1500));
  expect(s.proxy.stats.requests).toBe(requestsBefore);
}, 120_000);

test("an object that changes while it is read fails the job instead of mixing versions", async () => {
  await svc.putSource(811, 600_000);
  // Every body is cut part-way, so the file is only ever read by resuming.
  const s = await stack({ ...S3_PROFILES.loopback, cutBody: 1 }, { S3_READ_ATTEMPTS: "100" });
  const jobId = await s.start([811]);
  await expect.poll(() => s.proxy.stats.cutBodies, { timeout: 30_000 }).toBeGreaterThan(0);
  await svc.storage.client.send(
    new PutObjectCommand({
      Bucket: "download-sources",
      Key: "files/811",
      Body: Buffer.alloc(600_000, 7),
    }),
  );
  const rec = await s.ended(jobId);
  expect(rec.state).toBe("FAILED");
  expect(rec.error).toMatchObject({ code: "failed_precondition", retryable: false });
  expect(rec.error?.message).toContain("811");
  expect(s.proxy.stats.preconditionFailed).toBeGreaterThan(0);
}, 120_000);

test("a job past MAX_JOB_SECONDS fails with deadline_exceeded, naming the file it was on", async () => {
  await svc.putSource(821, 10_000);
  await svc.putSource(822, 4_000_000);
  // 200 KB/s: the second file would take 20 s.
  const s = await stack(
    { ...S3_PROFILES.loopback, aggregateBytesPerSecond: 200_000 },
    { MAX_JOB_SECONDS: "2", READ_AHEAD_OBJECTS: "1" },
  );
  const jobId = await s.start([821, 822]);
  const rec = await s.ended(jobId);
  expect(rec.state).toBe("FAILED");
  expect(rec.error).toMatchObject({ code: "deadline_exceeded", retryable: false });
  expect(rec.error?.message).toContain("822");
  const bull = await s.st.queue.getJob(jobId);
  await expect.poll(() => bull?.getState()).toBe("failed");
}, 120_000);
