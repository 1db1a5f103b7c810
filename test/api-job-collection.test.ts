import { createHash } from "node:crypto";
import { timestampFromMs, timestampMs } from "@bufbuild/protobuf/wkt";
import {
  type Client,
  Code,
  ConnectError,
  createClient,
  type Interceptor,
  type Transport,
} from "@connectrpc/connect";
import {
  createConnectTransport,
  createGrpcTransport,
  createGrpcWebTransport,
  Http2SessionManager,
} from "@connectrpc/connect-node";
import { Worker } from "bullmq";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { listScanBudget } from "../core/job-index.js";
import { markFailed, markProcessing } from "../core/job-transitions.js";
import { newJobId } from "../core/jobs.js";
import { MAX_LABELS } from "../core/labels.js";
import { QUEUE_NAME } from "../core/queue.js";
import { createRedis } from "../core/redis.js";
import {
  DownloadService,
  InitiateOutcome,
  type Job,
  JobState,
} from "../gen/downloads/v1/download_service_pb.js";
import { RetryInfoSchema } from "../gen/google/rpc/error_details_pb.js";
import { type ApiStack, startApiStack, TEST_AUTH_HEADER, TEST_TOKEN } from "./helpers/api.js";
import { type Services, startServices, TEST_SERVER_ENV } from "./helpers/services.js";
import { tamper } from "./helpers/tamper.js";

// Jobs as a collection, as their owner sees it through the real API over real Redis and
// S3: labels on every answer, ListJobs pages and filters (and the tokens it refuses),
// DeleteJob forgetting a job everywhere, RetryJob running a failed job again under its id,
// over every protocol and plain JSON.

const OTHER_TOKEN = "other-token-5e1d3c7b9a2f4e6d8c0b1a3f5e7d9c2b";
const OTHER_OWNER = "other-owner";
const sha = (t: string) => createHash("sha256").update(t).digest("hex");
const ENV = {
  AUTH_TOKENS: `${TEST_SERVER_ENV.AUTH_TOKENS},${OTHER_OWNER}:${sha(OTHER_TOKEN)}`,
  MAX_ACTIVE_JOBS_PER_OWNER: "0",
  INITIATE_RATE_PER_MINUTE: "0",
  // Dedup and result reuse on: DeleteJob must take the job out of both.
  DEDUP_IN_FLIGHT: "true",
  REUSE_RESULTS: "true",
};

let svc: Services;
let st: ApiStack;
let twin: ApiStack;
const sessions: Http2SessionManager[] = [];

const bearer =
  (token: string): Interceptor =>
  (next) =>
  (req) => {
    req.header.set("authorization", `Bearer ${token}`);
    return next(req);
  };
const connect = (stack: ApiStack, token = TEST_TOKEN) =>
  createClient(
    DownloadService,
    createConnectTransport({
      baseUrl: stack.server.url,
      httpVersion: "1.1",
      interceptors: [bearer(token)],
    }),
  );
let mine: Client<typeof DownloadService>;
let theirs: Client<typeof DownloadService>;

beforeAll(async () => {
  svc = await startServices();
  st = await startApiStack(ENV, { services: svc });
  // A second API instance of the same deployment: page tokens are good on both.
  twin = await startApiStack({ ...ENV, QUEUE_PREFIX: st.cfg.QUEUE_PREFIX }, { services: svc });
  mine = connect(st);
  theirs = connect(st, OTHER_TOKEN);
});
afterAll(async () => {
  for (const s of sessions) s.abort();
  await twin?.stop();
  await st?.stop();
  await svc?.stop();
});

const failure = async (p: Promise<unknown>) => {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  if (err === undefined) throw new Error("the call succeeded; a failure was expected");
  return ConnectError.from(err);
};

/** Every job of the caller that ListJobs lists for `filter`, page by page. */
async function listAll(
  client: Client<typeof DownloadService>,
  filter: Parameters<Client<typeof DownloadService>["listJobs"]>[0] = {},
): Promise<Job[]> {
  const jobs: Job[] = [];
  let pageToken = "";
  for (let pages = 0; pages < 1000; pages++) {
    const page = await client.listJobs({ ...filter, pageToken });
    jobs.push(...page.jobs);
    if (page.nextPageToken === "") return jobs;
    pageToken = page.nextPageToken;
  }
  throw new Error("ListJobs never ended");
}

describe("labels", () => {
  test("Initiate keeps them on the job and every RPC returns them", async () => {
    const labels = { order: "ORD-1234", team: "data-eng" };
    const init = await mine.initiate({ fileIds: [301], labels });
    expect(init.job?.labels).toEqual(labels);
    const jobId = init.job?.jobId ?? "";
    expect((await mine.getStatus({ jobId })).job?.labels).toEqual(labels);
    for await (const msg of mine.watchJob({ jobId })) {
      expect(msg.event.case === "job" && msg.event.value.labels).toEqual(labels);
      break;
    }
    expect((await mine.cancel({ jobId })).job?.labels).toEqual(labels);
    // Plain JSON (as curl sees it): a JSON object under "labels".
    const res = await fetch(`${st.server.url}/downloads.v1.DownloadService/GetStatus`, {
      method: "POST",
      headers: { ...TEST_AUTH_HEADER, "content-type": "application/json" },
      body: JSON.stringify({ jobId }),
    });
    expect(((await res.json()) as { job: { labels: unknown } }).job.labels).toEqual(labels);
  });

  test("are part of what makes two Initiate calls the same request", async () => {
    const a = await mine.initiate({ fileIds: [302], labels: { order: "a" } });
    const b = await mine.initiate({ fileIds: [302], labels: { order: "b" } });
    expect(b.outcome).toBe(InitiateOutcome.CREATED);
    expect(b.job?.jobId).not.toBe(a.job?.jobId);
    const again = await mine.initiate({ fileIds: [302], labels: { order: "a" } });
    expect(again.outcome).toBe(InitiateOutcome.IN_FLIGHT);
    expect(again.job?.jobId).toBe(a.job?.jobId);
    const keyed = await mine.initiate({ fileIds: [303], requestId: "labels-key-1" });
    const err = await failure(
      mine.initiate({ fileIds: [303], requestId: "labels-key-1", labels: { x: "y" } }),
    );
    expect(err.code).toBe(Code.InvalidArgument);
    expect(keyed.job?.labels).toEqual({});
  });

  test.each([
    [
      "too many",
      Object.fromEntries(Array.from({ length: MAX_LABELS + 1 }, (_, i) => [`k${i}`, "v"])),
      /at most 16/,
    ],
    ["an upper-case key", { Team: "a" }, /key "Team"/],
    ["a key starting with a digit", { "1team": "a" }, /key "1team"/],
    ["a key too long", { [`k${"x".repeat(63)}`]: "a" }, /1 to 63/],
    ["a value with a space", { team: "data eng" }, /labels\[team\]/],
    ["a value too long", { team: "x".repeat(129) }, /labels\[team\].*at most 128/],
  ])("refuses %s with INVALID_ARGUMENT naming the label", async (_name, labels, message) => {
    const err = await failure(mine.initiate({ fileIds: [304], labels }));
    expect(err.code).toBe(Code.InvalidArgument);
    expect(err.rawMessage).toMatch(message);
  });
});

describe("ListJobs", () => {
  /** The jobs this block made, newest first, with how each ended. */
  const made: { id: string; state: JobState; team: string }[] = [];
  let from = 0;

  beforeAll(async () => {
    // A fresh owner index: the label tests' jobs are listed too, so count from here.
    from = Date.now() + 1;
    await new Promise((r) => setTimeout(r, 5));
    for (let i = 0; i < 23; i++) {
      const team = i % 3 === 0 ? "red" : "blue";
      const { job } = await mine.initiate({ fileIds: [400 + i], labels: { team, n: String(i) } });
      const id = job?.jobId ?? "";
      let state = JobState.QUEUED;
      if (i % 4 === 1) {
        await st.startJob(id);
        await st.fail(id);
        state = JobState.FAILED;
      } else if (i % 4 === 2) {
        await st.startJob(id);
        await st.complete(id, Buffer.from(`zip ${i}`));
        state = JobState.COMPLETED;
      } else if (i % 4 === 3) {
        await mine.cancel({ jobId: id });
        state = JobState.CANCELLED;
      }
      made.unshift({ id, state, team });
    }
    await theirs.initiate({ fileIds: [499], labels: { team: "red" } });
  });

  test("pages through the caller's jobs, newest first, each once, with the full job", async () => {
    const jobs = await listAll(mine, { pageSize: 4, createTimeStart: timestampFromMs(from) });
    expect(jobs.map((j) => j.jobId)).toEqual(made.map((m) => m.id));
    expect(jobs.map((j) => j.state)).toEqual(made.map((m) => m.state));
    const times = jobs.map((j) => timestampMs(j.createTime ?? timestampFromMs(0)));
    expect([...times].sort((a, b) => b - a)).toEqual(times);
    const completed = jobs.find((j) => j.state === JobState.COMPLETED);
    expect(completed?.result?.downloadUrl).toMatch(/^http/);
    expect(jobs.every((j) => j.labels.team !== undefined)).toBe(true);
    // The other owner sees only their own job.
    const theirsListed = await listAll(theirs);
    expect(theirsListed.map((j) => j.labels)).toEqual([{ team: "red" }]);
  });

  test("filters by state, label and creation time", async () => {
    const since = { createTimeStart: timestampFromMs(from) };
    const failedOrCancelled = await listAll(mine, {
      ...since,
      states: [JobState.FAILED, JobState.CANCELLED],
    });
    expect(failedOrCancelled.map((j) => j.jobId)).toEqual(
      made
        .filter((m) => m.state === JobState.FAILED || m.state === JobState.CANCELLED)
        .map((m) => m.id),
    );
    const red = await listAll(mine, { ...since, labels: { team: "red" }, pageSize: 2 });
    expect(red.map((j) => j.jobId)).toEqual(made.filter((m) => m.team === "red").map((m) => m.id));
    const one = await listAll(mine, { labels: { team: "blue", n: "5" } });
    expect(one.map((j) => j.jobId)).toEqual([made[23 - 1 - 5]?.id]);
    // A window: the middle jobs by their own creation times.
    const all = await listAll(mine, since);
    const t = (j: Job | undefined) => timestampMs(j?.createTime ?? timestampFromMs(0));
    const window = await listAll(mine, {
      createTimeStart: timestampFromMs(t(all[15])),
      createTimeEnd: timestampFromMs(t(all[5])),
    });
    const want = all.filter((j) => t(j) >= t(all[15]) && t(j) < t(all[5]));
    expect(window.map((j) => j.jobId)).toEqual(want.map((j) => j.jobId));
  });

  test("a token is good on every API instance, for the same filter and caller only", async () => {
    const filter = { pageSize: 5, createTimeStart: timestampFromMs(from) };
    const first = await mine.listJobs(filter);
    expect(first.jobs).toHaveLength(5);
    const second = await connect(twin).listJobs({ ...filter, pageToken: first.nextPageToken });
    expect(second.jobs.map((j) => j.jobId)).toEqual(made.slice(5, 10).map((m) => m.id));

    const refusals = await Promise.all([
      failure(
        mine.listJobs({ ...filter, states: [JobState.FAILED], pageToken: first.nextPageToken }),
      ),
      failure(
        mine.listJobs({ ...filter, labels: { team: "red" }, pageToken: first.nextPageToken }),
      ),
      failure(theirs.listJobs({ ...filter, pageToken: first.nextPageToken })),
      failure(mine.listJobs({ ...filter, pageToken: tamper(first.nextPageToken) })),
      failure(mine.listJobs({ ...filter, pageToken: "not-a-token" })),
    ]);
    for (const err of refusals) {
      expect(err.code).toBe(Code.InvalidArgument);
      expect(err.rawMessage).toMatch(/page_token .*same states, create_time range and labels/);
    }
  });

  test("bad page sizes, ranges, states and label filters are INVALID_ARGUMENT saying what to fix", async () => {
    const cases: [Parameters<typeof mine.listJobs>[0], RegExp][] = [
      [{ pageSize: -1 }, /page_size/],
      [
        { createTimeStart: timestampFromMs(2000), createTimeEnd: timestampFromMs(1000) },
        /create_time_end must be after create_time_start/,
      ],
      [{ states: [9 as JobState] }, /states: 9 is not a job state/],
      [{ labels: { "Bad Key": "x" } }, /labels filter: key "Bad Key"/],
    ];
    for (const [req, message] of cases) {
      const err = await failure(mine.listJobs(req));
      expect(err.code, String(message)).toBe(Code.InvalidArgument);
      expect(err.rawMessage).toMatch(message);
    }
    // More than the maximum is read as the maximum, not refused.
    expect((await mine.listJobs({ pageSize: 100_000 })).jobs.length).toBeGreaterThan(0);
  });

  test("a job whose record expired drops out of the list and out of the index", async () => {
    const { job } = await mine.initiate({ fileIds: [498] });
    const id = job?.jobId ?? "";
    expect((await mine.listJobs({ pageSize: 1 })).jobs[0]?.jobId).toBe(id);
    await st.redis.del(st.store.key(id)); // what the record's TTL does
    expect((await mine.listJobs({ pageSize: 1 })).jobs[0]?.jobId).not.toBe(id);
    expect(await st.redis.zscore(st.store.keys.ownerJobs(st.owner), id)).toBeNull();
  });

  test("a page reads a bounded number of records, however many jobs the owner has", async () => {
    // 3,000 jobs of one owner written straight into Redis as Initiate stores them.
    const owner = "bulk-owner";
    const now = Date.now();
    const pipe = st.redis.pipeline();
    for (let i = 0; i < 3000; i++) {
      const id = newJobId();
      pipe.hset(st.store.key(id), {
        id,
        owner,
        state: i % 10 === 0 ? "FAILED" : "COMPLETED",
        fileIds: "[1]",
        version: "1",
        attempts: "1",
        createdAt: String(now - i),
        updatedAt: String(now - i),
        progress: JSON.stringify({
          filesDone: 1,
          filesTotal: 1,
          bytesDone: 0,
          bytesTotal: 0,
          bytesPerSecond: 0,
        }),
        files: "[]",
      });
      pipe.zadd(st.store.keys.ownerJobs(owner), now - i, id);
    }
    await pipe.exec();
    const { JobIndex } = await import("../core/job-index.js");
    const index = new JobIndex(st.store);
    const calls = async () => {
      const info = await st.redis.info("commandstats");
      const count = (cmd: string) =>
        Number(new RegExp(`cmdstat_${cmd}:calls=(\\d+)`).exec(info)?.[1] ?? 0);
      return { hmget: count("hmget"), hgetall: count("hgetall") };
    };
    for (const states of [[], ["FAILED" as const]]) {
      const before = await calls();
      const page = await index.list(owner, { pageSize: 10, pageToken: "", states, labels: {} });
      const after = await calls();
      expect(page.jobs).toHaveLength(10);
      expect(page.nextPageToken).not.toBe("");
      // Other clients of this Redis add a few calls of their own meanwhile at most.
      expect(after.hmget - before.hmget).toBeLessThanOrEqual(listScanBudget(10) + 20);
      expect(after.hgetall - before.hgetall).toBeLessThanOrEqual(10 + 20);
    }
  });
});

describe("DeleteJob", () => {
  test("forgets a completed job everywhere and deletes its ZIP at once", async () => {
    const requestId = "delete-me-key";
    const { job } = await mine.initiate({ fileIds: [501, 502], requestId, labels: { d: "1" } });
    const jobId = job?.jobId ?? "";
    await st.startJob(jobId);
    const done = await st.complete(jobId, Buffer.from("the zip bytes"));
    const key = done.result?.key ?? "";
    expect(await svc.storage.resultExists(key)).toBe(true);

    expect(await mine.deleteJob({ jobId })).toBeDefined();

    expect(await svc.storage.resultExists(key)).toBe(false);
    for (const call of [
      mine.getStatus({ jobId }),
      mine.cancel({ jobId }),
      mine.deleteJob({ jobId }),
      mine.retryJob({ jobId }),
      (async () => {
        for await (const _ of mine.watchJob({ jobId })) break;
      })(),
    ]) {
      expect((await failure(call)).code).toBe(Code.NotFound);
    }
    expect((await listAll(mine)).map((j) => j.jobId)).not.toContain(jobId);
    // Neither the result reuse nor the idempotency key hands it out again.
    const again = await mine.initiate({ fileIds: [501, 502], labels: { d: "1" } });
    expect(again.outcome).toBe(InitiateOutcome.CREATED);
    expect(again.job?.jobId).not.toBe(jobId);
    const keyed = await mine.initiate({ fileIds: [503], requestId });
    expect(keyed.outcome).toBe(InitiateOutcome.CREATED);
    expect(keyed.job?.jobId).not.toBe(jobId);
  });

  test("refuses a queued or running job with FAILED_PRECONDITION: cancel first", async () => {
    const { job } = await mine.initiate({ fileIds: [511] });
    const jobId = job?.jobId ?? "";
    let err = await failure(mine.deleteJob({ jobId }));
    expect(err.code).toBe(Code.FailedPrecondition);
    expect(err.rawMessage).toMatch(/cancel it first/);
    await st.startJob(jobId);
    err = await failure(mine.deleteJob({ jobId }));
    expect(err.code).toBe(Code.FailedPrecondition);
    await mine.cancel({ jobId });
    await mine.deleteJob({ jobId });
    expect((await failure(mine.getStatus({ jobId }))).code).toBe(Code.NotFound);
  });

  test("unknown and other owners' jobs are NOT_FOUND, malformed ids INVALID_ARGUMENT", async () => {
    const { job } = await mine.initiate({ fileIds: [521] });
    await mine.cancel({ jobId: job?.jobId ?? "" });
    expect((await failure(theirs.deleteJob({ jobId: job?.jobId ?? "" }))).code).toBe(Code.NotFound);
    expect((await mine.getStatus({ jobId: job?.jobId ?? "" })).job?.state).toBe(JobState.CANCELLED);
    expect((await failure(mine.deleteJob({ jobId: newJobId() }))).code).toBe(Code.NotFound);
    expect((await failure(mine.deleteJob({ jobId: "nope" }))).code).toBe(Code.InvalidArgument);
  });
});

describe("RetryJob", () => {
  test("runs a failed job again under its id, keeping labels, history and counting attempts", async () => {
    const { job } = await mine.initiate({ fileIds: [601], labels: { order: "r-1" } });
    const jobId = job?.jobId ?? "";
    await st.startJob(jobId);
    await st.fail(jobId);
    const failed = (await mine.getStatus({ jobId })).job;
    expect(failed?.state).toBe(JobState.FAILED);
    expect(failed?.attempts).toBe(1);

    const retried = await mine.retryJob({ jobId });
    expect(retried.replayed).toBe(false);
    expect(retried.job).toMatchObject({
      jobId,
      state: JobState.QUEUED,
      labels: { order: "r-1" },
      attempts: 1,
      createTime: failed?.createTime,
      startTime: failed?.startTime,
    });
    expect(retried.job?.error).toBeUndefined();
    expect(retried.job?.endTime).toBeUndefined();
    expect(retried.job?.version).toBeGreaterThan(failed?.version ?? 0);
    // Queued for the workers again, and alive until it ends (no record expiry).
    // (BullMQ's prioritized set: fair turns place every queued job, core/queue.ts.)
    expect(await st.queue.getJobState(jobId)).toBe("prioritized");
    expect(await st.redis.ttl(st.store.key(jobId))).toBe(-1);

    // The next run (a new BullMQ lock token) takes the job: the second attempt.
    const secondRun = { jobId, token: "second-run", checkLock: false };
    const rec = await st.store.get(jobId);
    const running = await markProcessing(st.store, secondRun, {
      progress: rec.progress,
      files: rec.files,
      startedAt: Date.now(),
    });
    expect(running.attempts).toBe(2);
    await markFailed(st.store, secondRun, {
      claimed: true,
      error: { code: "unavailable", message: "storage trouble", retryable: true },
    });
    const twice = (await mine.getStatus({ jobId })).job;
    expect(twice).toMatchObject({
      state: JobState.FAILED,
      attempts: 2,
      startTime: failed?.startTime,
    });
    expect((await mine.retryJob({ jobId })).job?.state).toBe(JobState.QUEUED);
    await st.startJob(jobId);
    await st.complete(jobId, Buffer.from("third time lucky"));
    const done = (await mine.getStatus({ jobId })).job;
    expect(done).toMatchObject({
      state: JobState.COMPLETED,
      attempts: 3,
      labels: { order: "r-1" },
    });
    const err = await failure(mine.retryJob({ jobId }));
    expect(err.code).toBe(Code.FailedPrecondition);
    expect(err.rawMessage).toMatch(/Initiate the same files/);
  });

  test("retries a cancelled job; refuses a queued one; an idempotency key replays", async () => {
    const { job } = await mine.initiate({ fileIds: [611] });
    const jobId = job?.jobId ?? "";
    const queued = await failure(mine.retryJob({ jobId }));
    expect(queued.code).toBe(Code.FailedPrecondition);
    expect(queued.rawMessage).toMatch(/only failed or cancelled jobs can be retried/);
    await mine.cancel({ jobId });
    const first = await mine.retryJob({ jobId, requestId: "retry-key-1" });
    expect(first).toMatchObject({ replayed: false, job: { state: JobState.QUEUED } });
    const replay = await mine.retryJob({ jobId, requestId: "retry-key-1" });
    expect(replay.replayed).toBe(true);
    expect(replay.job?.version).toBe(first.job?.version);
    // The same key on another job, or on an Initiate, is another request.
    const { job: other } = await mine.initiate({ fileIds: [612] });
    await mine.cancel({ jobId: other?.jobId ?? "" });
    expect(
      (await failure(mine.retryJob({ jobId: other?.jobId ?? "", requestId: "retry-key-1" }))).code,
    ).toBe(Code.InvalidArgument);
    expect((await failure(theirs.retryJob({ jobId }))).code).toBe(Code.NotFound);
  });

  test("right after a cancel, while the run still holds the job, is unavailable with a retry delay", async () => {
    const busy = await startApiStack(ENV, { services: svc });
    // A worker of our own that takes the run and has not let go of it yet.
    const conn = createRedis(svc.redis.url, { role: "worker" });
    const worker = new Worker(QUEUE_NAME, null, {
      connection: conn,
      prefix: busy.cfg.QUEUE_PREFIX,
    });
    try {
      const client = connect(busy);
      const { job } = await client.initiate({ fileIds: [631] });
      const jobId = job?.jobId ?? "";
      const taken = await worker.getNextJob("run-1");
      expect(taken?.id).toBe(jobId);
      await client.cancel({ jobId });

      const err = await failure(client.retryJob({ jobId }));
      expect(err.code).toBe(Code.Unavailable);
      expect(err.rawMessage).toMatch(/still stopping/);
      const info = err.findDetails(RetryInfoSchema)[0];
      expect(Number(info?.retryDelay?.seconds ?? 0)).toBe(1);
      expect((await client.getStatus({ jobId })).job?.state).toBe(JobState.CANCELLED);

      // The run lets go: the same call now runs the job again.
      await taken?.moveToFailed(new Error("cancelled"), "run-1");
      expect((await client.retryJob({ jobId })).job?.state).toBe(JobState.QUEUED);
    } finally {
      await worker.close();
      conn.disconnect();
      await busy.stop();
    }
  });

  test("is admitted like Initiate: the owner's active-job limit applies", async () => {
    const limited = await startApiStack(
      { ...ENV, MAX_ACTIVE_JOBS_PER_OWNER: "1" },
      { services: svc },
    );
    try {
      const client = connect(limited);
      const { job } = await client.initiate({ fileIds: [621] });
      const jobId = job?.jobId ?? "";
      await limited.startJob(jobId);
      await limited.fail(jobId);
      await client.initiate({ fileIds: [622] });
      const err = await failure(client.retryJob({ jobId }));
      expect(err.code).toBe(Code.ResourceExhausted);
      expect((await client.getStatus({ jobId })).job?.state).toBe(JobState.FAILED);
    } finally {
      await limited.stop();
    }
  });
});

describe.each<[string, () => Transport]>([
  [
    "Connect binary over h2c",
    () => {
      const sessionManager = new Http2SessionManager(st.server.url);
      sessions.push(sessionManager);
      return createConnectTransport({
        baseUrl: st.server.url,
        httpVersion: "2",
        useBinaryFormat: true,
        sessionManager,
        interceptors: [bearer(TEST_TOKEN)],
      });
    },
  ],
  [
    "gRPC over h2c",
    () => {
      const sessionManager = new Http2SessionManager(st.server.url);
      sessions.push(sessionManager);
      return createGrpcTransport({
        baseUrl: st.server.url,
        sessionManager,
        interceptors: [bearer(TEST_TOKEN)],
      });
    },
  ],
  [
    "gRPC-Web over HTTP/1.1",
    () =>
      createGrpcWebTransport({
        baseUrl: st.server.url,
        httpVersion: "1.1",
        interceptors: [bearer(TEST_TOKEN)],
      }),
  ],
])("%s", (_name, transport) => {
  test("lists with a label filter, retries and deletes", async () => {
    const client = createClient(DownloadService, transport());
    const tag = newJobId().slice(0, 8);
    const { job } = await client.initiate({ fileIds: [701], labels: { run: `p${tag}` } });
    const jobId = job?.jobId ?? "";
    const listed = await client.listJobs({ labels: { run: `p${tag}` } });
    expect(listed.jobs.map((j) => j.jobId)).toEqual([jobId]);
    expect(listed.nextPageToken).toBe("");
    await client.cancel({ jobId });
    expect((await client.retryJob({ jobId })).job?.state).toBe(JobState.QUEUED);
    expect((await failure(client.deleteJob({ jobId }))).code).toBe(Code.FailedPrecondition);
    await client.cancel({ jobId });
    await client.deleteJob({ jobId });
    expect((await client.listJobs({ labels: { run: `p${tag}` } })).jobs).toEqual([]);
  });
});

test("plain JSON over HTTP (curl): ListJobs with filters, RetryJob, DeleteJob", async () => {
  const call = (method: string, body: unknown) =>
    fetch(`${st.server.url}/downloads.v1.DownloadService/${method}`, {
      method: "POST",
      headers: { ...TEST_AUTH_HEADER, "content-type": "application/json" },
      body: JSON.stringify(body),
    });
  const { job } = await mine.initiate({ fileIds: [801], labels: { via: "curl" } });
  const jobId = job?.jobId ?? "";
  await mine.cancel({ jobId });
  const list = await call("ListJobs", {
    pageSize: 10,
    states: ["JOB_STATE_CANCELLED"],
    labels: { via: "curl" },
  });
  expect(list.status).toBe(200);
  const body = (await list.json()) as { jobs: { jobId: string; labels: unknown; state: string }[] };
  expect(body.jobs).toEqual([
    expect.objectContaining({ jobId, labels: { via: "curl" }, state: "JOB_STATE_CANCELLED" }),
  ]);
  // Connect GET works for ListJobs (NO_SIDE_EFFECTS).
  const message = encodeURIComponent(JSON.stringify({ labels: { via: "curl" } }));
  const get = await fetch(
    `${st.server.url}/downloads.v1.DownloadService/ListJobs?encoding=json&message=${message}`,
    { headers: TEST_AUTH_HEADER },
  );
  expect(((await get.json()) as { jobs: unknown[] }).jobs).toHaveLength(1);
  const retry = await call("RetryJob", { jobId, requestId: "curl-retry" });
  expect(((await retry.json()) as { job: { state: string } }).job.state).toBe("JOB_STATE_QUEUED");
  await mine.cancel({ jobId });
  const del = await call("DeleteJob", { jobId });
  expect(del.status).toBe(200);
  expect(await del.json()).toEqual({});
  const bad = await call("ListJobs", { pageToken: "x.y" });
  expect(bad.status).toBe(400);
  expect(((await bad.json()) as { code: string }).code).toBe("invalid_argument");
});
