import { execFile } from "node:child_process";
import { createHash, randomUUID } from "node:crypto";
import { promisify } from "node:util";
import { timestampFromMs, timestampMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { pino } from "pino";
import { afterAll, beforeAll, expect, test } from "vitest";
import { HistoryDb } from "../core/history.js";
import { createRedis, type RedisClient, waitForRedis } from "../core/redis.js";
import {
  DownloadService,
  JobState,
  StatisticsInterval,
} from "../gen/downloads/v1/download_service_pb.js";
import { waitUntil } from "../local/ports.js";
import { type LocalPostgres, startPostgres } from "../local/postgres-server.js";
import { type HistoryWriter, startHistoryWriter } from "../worker/history-writer.js";
import { type ApiStack, startApiStack, TEST_OWNER, TEST_TOKEN } from "./helpers/api.js";
import { type Services, startServices, TEST_SERVER_ENV } from "./helpers/services.js";

// Reading the job history through the API: real PostgreSQL (Debian's), the real history
// writer draining the real outbox that the transitions append to, the real API server,
// and the generated Connect client (plus one curl call). What a user checks: every job
// once across pages, filters, refused tokens, owners kept apart, totals that match the
// jobs run, and a clear FAILED_PRECONDITION when the server has no history.

const OTHER_TOKEN = "other-token-9d2b7c4e1a3f5b6c8d0e2f4a6b8c0d1e";
const OTHER_OWNER = "other-owner";
const sha = (t: string) => createHash("sha256").update(t).digest("hex");

let svc: Services;
let pgServer: LocalPostgres;
let db: HistoryDb;
let st: ApiStack;
let off: ApiStack;
let twin: ApiStack;
let keyed: ApiStack;
let writerRedis: RedisClient;
let writer: HistoryWriter;

const bearer =
  (token: string): Interceptor =>
  (next) =>
  (req) => {
    req.header.set("authorization", `Bearer ${token}`);
    return next(req);
  };
const clientFor = (stack: () => ApiStack, token: string) =>
  createClient(
    DownloadService,
    createConnectTransport({
      baseUrl: stack().server.url,
      httpVersion: "1.1",
      interceptors: [bearer(token)],
    }),
  );
let mine: ReturnType<typeof clientFor>;
let theirs: ReturnType<typeof clientFor>;

/** What each of the test owner's jobs ended as, by job id. */
const ran = new Map<string, { state: JobState; zip: number; code: string }>();
const theirJobs: string[] = [];
/** Jobs of the test owner created in the same millisecond, days ago: the tie-break. */
const ties: string[] = [];

beforeAll(async () => {
  svc = await startServices();
  pgServer = await startPostgres();
  db = new HistoryDb(pgServer.url);
  await db.migrate();
  const env = {
    AUTH_TOKENS: `${TEST_SERVER_ENV.AUTH_TOKENS},${OTHER_OWNER}:${sha(OTHER_TOKEN)}`,
  };
  // st and twin: two API instances of one deployment (the token key derives from the
  // database URL); keyed has a HISTORY_PAGE_TOKEN_SECRET of its own.
  st = await startApiStack({ ...env, HISTORY_DATABASE_URL: pgServer.url }, { services: svc });
  twin = await startApiStack({ ...env, HISTORY_DATABASE_URL: pgServer.url }, { services: svc });
  keyed = await startApiStack(
    {
      ...env,
      HISTORY_DATABASE_URL: pgServer.url,
      HISTORY_PAGE_TOKEN_SECRET: "a-secret-for-the-history-rpc-test-0123456789",
    },
    { services: svc },
  );
  off = await startApiStack(env, { services: svc });
  mine = clientFor(() => st, TEST_TOKEN);
  theirs = clientFor(() => st, OTHER_TOKEN);

  writerRedis = createRedis(svc.redisTarget, { role: "worker" });
  await waitForRedis(writerRedis);
  writer = startHistoryWriter({
    redis: writerRedis,
    stream: st.store.keys.historyOutbox,
    db,
    log: pino({ level: "silent" }),
  });
  await waitUntil(
    "the history outbox",
    async () => (await st.redis.exists(st.store.keys.historyOutbox)) === 1,
  );

  // 23 jobs of the test owner: completed (ZIPs of different sizes), failed, cancelled.
  for (let i = 0; i < 23; i++) {
    const { job } = await mine.initiate({
      fileIds: [1 + (i % 4), 10 + i],
      labels: { n: String(i) },
    });
    const id = job?.jobId ?? "";
    if (i % 5 === 3) {
      await mine.cancel({ jobId: id });
      ran.set(id, { state: JobState.CANCELLED, zip: 0, code: "" });
    } else if (i % 5 === 1) {
      await st.startJob(id);
      await st.fail(id);
      ran.set(id, { state: JobState.FAILED, zip: 0, code: "not_found" });
    } else {
      await st.startJob(id);
      await st.complete(id, Buffer.alloc(100 + i));
      ran.set(id, { state: JobState.COMPLETED, zip: 100 + i, code: "" });
    }
  }
  for (let i = 0; i < 3; i++) {
    const { job } = await theirs.initiate({ fileIds: [7] });
    await theirs.cancel({ jobId: job?.jobId ?? "" });
    theirJobs.push(job?.jobId ?? "");
  }
  // Written the way the writer writes (HistoryDb.apply), since jobs run here cannot share
  // a creation time on purpose.
  const at = Date.now() - 3 * 86_400_000;
  for (let i = 0; i < 7; i++) ties.push(randomUUID());
  await db.apply(
    ties.map((jobId) => ({
      jobId,
      owner: TEST_OWNER,
      state: "COMPLETED",
      version: 4,
      attempts: 1,
      createdAt: at,
      updatedAt: at + 2000,
      startedAt: at + 1000,
      endedAt: at + 2000,
      fileIds: [1],
      totalBytes: 10,
      zipBytes: 50,
    })),
  );
  await waitUntil(
    "every job in the history",
    async () =>
      Number((await db.pool.query("SELECT count(*) AS n FROM download_jobs")).rows[0].n) ===
      ran.size + theirJobs.length + ties.length,
    60_000,
  );
}, 180_000);

afterAll(async () => {
  await writer?.stop();
  writerRedis?.disconnect();
  await st?.stop();
  await off?.stop();
  await twin?.stop();
  await keyed?.stop();
  await db?.close().catch(() => undefined);
  await pgServer?.destroy();
  await svc?.stop();
});

async function listAll(
  req: Parameters<typeof mine.listJobHistory>[0],
  client = mine,
): Promise<{ ids: string[]; pages: number; jobs: { createTime?: unknown }[] }> {
  const ids: string[] = [];
  const jobs = [];
  let pageToken = "";
  let pages = 0;
  do {
    const res = await client.listJobHistory({ ...req, pageToken });
    pages += 1;
    ids.push(...res.jobs.map((j) => j.jobId));
    jobs.push(...res.jobs);
    pageToken = res.nextPageToken;
  } while (pageToken !== "" && pages < 100);
  return { ids, pages, jobs };
}

test("pages cover each of the caller's jobs exactly once, newest first, with their fields", async () => {
  // 30 jobs in pages of 3: the 7 that share a creation time straddle three pages.
  const { ids, pages, jobs } = await listAll({ pageSize: 3 });
  expect(pages).toBe(10);
  expect(new Set(ids).size).toBe(ids.length);
  expect(new Set(ids)).toEqual(new Set([...ran.keys(), ...ties]));
  const times = jobs.map((j) => timestampMs(j.createTime as never));
  expect(times).toEqual([...times].sort((a, b) => b - a));
  expect(ids.slice(-7)).toEqual([...ties].sort().reverse());

  const all = (await mine.listJobHistory({ pageSize: 1000 })).jobs;
  expect(all.map((j) => j.jobId)).toEqual(ids);
  for (const j of all.filter((x) => !ties.includes(x.jobId))) {
    const want = ran.get(j.jobId);
    expect(j.state).toBe(want?.state);
    expect(j.fileIds).toHaveLength(2);
    expect(j.errorCode).toBe(want?.code);
    expect(j.labels.n).toMatch(/^\d+$/);
    if (want?.state === JobState.COMPLETED) {
      expect(j.zipSizeBytes).toBe(BigInt(want.zip));
      expect(j.attempts).toBe(1);
      expect(j.endTime).toBeDefined();
      expect(timestampMs(j.endTime as never)).toBeGreaterThanOrEqual(
        timestampMs(j.startTime as never),
      );
    }
    if (want?.state === JobState.FAILED) expect(j.errorMessage).toMatch(/do not exist/);
  }
});

test("filters by state and creation time, and pages within the filter", async () => {
  const failed = [...ran].filter(([, v]) => v.state === JobState.FAILED).map(([k]) => k);
  const { ids } = await listAll({ pageSize: 2, states: [JobState.FAILED] });
  expect(new Set(ids)).toEqual(new Set(failed));
  expect(ids).toHaveLength(failed.length);

  const both = await listAll({ pageSize: 3, states: [JobState.FAILED, JobState.CANCELLED] });
  expect(both.ids).toHaveLength(
    [...ran.values()].filter((v) => v.state !== JobState.COMPLETED).length,
  );

  const all = (await mine.listJobHistory({ pageSize: 1000 })).jobs;
  const times = all.map((j) => timestampMs(j.createTime as never)).sort((a, b) => a - b);
  const from = times[5] as number;
  const to = times[15] as number;
  const { ids: ranged } = await listAll({
    pageSize: 3,
    createTimeStart: timestampFromMs(from),
    createTimeEnd: timestampFromMs(to),
  });
  const want = all
    .filter((j) => {
      const t = timestampMs(j.createTime as never);
      return t >= from && t < to;
    })
    .map((j) => j.jobId);
  expect(ranged).toEqual(want);
});

test("a tampered token, or one from another filter or owner, is INVALID_ARGUMENT", async () => {
  const first = await mine.listJobHistory({ pageSize: 2 });
  const token = first.nextPageToken;
  expect(token).not.toBe("");
  const refuse = async (p: Promise<unknown>) => {
    const err = await p.then(
      () => undefined,
      (e: unknown) => ConnectError.from(e),
    );
    expect(err?.code).toBe(Code.InvalidArgument);
    expect(err?.rawMessage).toMatch(/page_token/);
  };
  const [payload, sig] = token.split(".") as [string, string];
  const forged = Buffer.from(
    JSON.stringify({ ...JSON.parse(Buffer.from(payload, "base64url").toString()), i: "z" }),
  ).toString("base64url");
  await refuse(mine.listJobHistory({ pageSize: 2, pageToken: `${forged}.${sig}` }));
  await refuse(mine.listJobHistory({ pageSize: 2, pageToken: `${payload}.${sig.slice(1)}A` }));
  await refuse(mine.listJobHistory({ pageSize: 2, pageToken: "not-a-token" }));
  await refuse(mine.listJobHistory({ pageSize: 2, pageToken: token, states: [JobState.FAILED] }));
  await refuse(theirs.listJobHistory({ pageSize: 2, pageToken: token }));
  // Another instance of the deployment takes it; a server with another key does not.
  const second = await clientFor(() => twin, TEST_TOKEN).listJobHistory({ pageToken: token });
  expect(second.jobs[0]?.jobId).toBe((await mine.listJobHistory({ pageSize: 3 })).jobs[2]?.jobId);
  await refuse(clientFor(() => keyed, TEST_TOKEN).listJobHistory({ pageToken: token }));
  // The same token, unchanged, still works (a different page size is allowed).
  expect((await mine.listJobHistory({ pageSize: 5, pageToken: token })).jobs).toHaveLength(5);
  await expect(mine.listJobHistory({ pageSize: -1 })).rejects.toMatchObject({
    code: Code.InvalidArgument,
  });
});

test("owners see only their own history and statistics", async () => {
  const { ids } = await listAll({ pageSize: 2 }, theirs);
  expect(new Set(ids)).toEqual(new Set(theirJobs));
  const now = Date.now();
  const stats = await theirs.getJobStatistics({
    interval: StatisticsInterval.DAILY,
    startTime: timestampFromMs(now - 2 * 86_400_000),
    endTime: timestampFromMs(now + 86_400_000),
  });
  const sum = (k: "jobs" | "cancelled" | "completed") =>
    stats.buckets.reduce((n, b) => n + Number(b[k]), 0);
  expect(sum("jobs")).toBe(3);
  expect(sum("cancelled")).toBe(3);
  expect(sum("completed")).toBe(0);
});

test("statistics match the jobs run, hourly and daily", async () => {
  const now = Date.now();
  const count = (s: JobState) => [...ran.values()].filter((v) => v.state === s).length;
  for (const interval of [StatisticsInterval.HOURLY, StatisticsInterval.DAILY]) {
    const { buckets } = await mine.getJobStatistics({
      interval,
      startTime: timestampFromMs(now - 86_400_000),
      endTime: timestampFromMs(now + 3_600_000),
    });
    const sum = (f: (b: (typeof buckets)[number]) => bigint | number) =>
      buckets.reduce((n, b) => n + Number(f(b)), 0);
    expect(sum((b) => b.jobs)).toBe(ran.size);
    expect(sum((b) => b.completed)).toBe(count(JobState.COMPLETED));
    expect(sum((b) => b.failed)).toBe(count(JobState.FAILED));
    expect(sum((b) => b.cancelled)).toBe(count(JobState.CANCELLED));
    expect(sum((b) => b.zipSizeBytes)).toBe([...ran.values()].reduce((n, v) => n + v.zip, 0));
    expect(
      buckets.flatMap((b) => b.failures.map((f) => [f.errorCode, Number(f.count)] as const)),
    ).toEqual(
      // Jobs run within the same hour here, except when the hour turned during the run.
      buckets.length === 1 ? [["not_found", count(JobState.FAILED)]] : expect.anything(),
    );
    // The per-owner views the RPC reads agree with 002's views, bucket by bucket.
    const view =
      interval === StatisticsInterval.HOURLY ? "job_history_hourly" : "job_history_daily";
    const { rows } = await db.pool.query(
      `SELECT bucket, jobs, failed, duration_p95_ms FROM ${view}
       WHERE owner = $1 AND bucket >= now() - interval '2 days' ORDER BY bucket`,
      [TEST_OWNER],
    );
    expect(
      buckets.map((b) => [
        timestampMs(b.startTime as never),
        Number(b.jobs),
        Number(b.failed),
        b.durationP95 === undefined
          ? null
          : Number(b.durationP95.seconds) * 1000 + b.durationP95.nanos / 1e6,
      ]),
    ).toEqual(
      rows.map((r) => [
        r.bucket.getTime(),
        Number(r.jobs),
        Number(r.failed),
        expect.closeTo(r.duration_p95_ms, 3),
      ]),
    );
    for (const b of buckets.filter((x) => x.completed > 0n)) {
      expect(b.durationP50).toBeDefined();
      expect(b.durationP95).toBeDefined();
      expect(b.queueWaitP95).toBeDefined();
    }
  }
  await expect(
    mine.getJobStatistics({
      interval: StatisticsInterval.HOURLY,
      startTime: timestampFromMs(now - 40 * 86_400_000),
      endTime: timestampFromMs(now),
    }),
  ).rejects.toMatchObject({ code: Code.InvalidArgument });
  await expect(
    mine.getJobStatistics({
      startTime: timestampFromMs(now - 1000),
      endTime: timestampFromMs(now),
    }),
  ).rejects.toMatchObject({ code: Code.InvalidArgument });
});

test("curl: Connect JSON, int64 fields as strings", async () => {
  const { stdout } = await promisify(execFile)("curl", [
    "-sS",
    "--fail-with-body",
    "-H",
    "content-type: application/json",
    "-H",
    `authorization: Bearer ${TEST_TOKEN}`,
    "--data",
    JSON.stringify({ pageSize: 3, states: ["JOB_STATE_COMPLETED"] }),
    `${st.server.url}/downloads.v1.DownloadService/ListJobHistory`,
  ]);
  const out = JSON.parse(stdout) as {
    jobs: { jobId: string; state: string; zipSizeBytes: string }[];
    nextPageToken: string;
  };
  expect(out.jobs).toHaveLength(3);
  for (const j of out.jobs) {
    expect(j.state).toBe("JOB_STATE_COMPLETED");
    expect(j.zipSizeBytes).toBe(String(ran.get(j.jobId)?.zip));
  }
  expect(out.nextPageToken).not.toBe("");
});

test("without history, both RPCs are FAILED_PRECONDITION saying how to turn it on", async () => {
  const client = clientFor(() => off, TEST_TOKEN);
  for (const call of [
    () => client.listJobHistory({}),
    () =>
      client.getJobStatistics({
        interval: StatisticsInterval.DAILY,
        startTime: timestampFromMs(Date.now() - 1000),
        endTime: timestampFromMs(Date.now()),
      }),
  ]) {
    const err = await call().then(
      () => undefined,
      (e: unknown) => ConnectError.from(e),
    );
    expect(err?.code).toBe(Code.FailedPrecondition);
    expect(err?.rawMessage).toMatch(/HISTORY_DATABASE_URL/);
  }
});

test("PostgreSQL down is UNAVAILABLE, and the job path still answers", async () => {
  // The last test: the server stays stopped (afterAll removes it).
  await pgServer.stop();
  await expect(mine.listJobHistory({})).rejects.toMatchObject({ code: Code.Unavailable });
  const { job } = await mine.initiate({ fileIds: [3] });
  expect((await mine.getStatus({ jobId: job?.jobId ?? "" })).job?.state).toBe(JobState.QUEUED);
});
