import { timestampMs } from "@bufbuild/protobuf/wkt";
import { type Client, Code, ConnectError, createClient } from "@connectrpc/connect";
import {
  createConnectTransport,
  createGrpcTransport,
  Http2SessionManager,
} from "@connectrpc/connect-node";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { JobStore } from "../core/job-store.js";
import {
  createJob,
  markCancelled,
  markProcessing,
  recordProgress,
} from "../core/job-transitions.js";
import { newJobId } from "../core/jobs.js";
import { createLogger } from "../core/logger.js";
import { createRedis, waitForRedis } from "../core/redis.js";
import {
  DownloadService,
  type Job,
  JobState,
  type WatchJobResponse,
} from "../gen/downloads/v1/download_service_pb.js";
import { type WatchEvent, WatchHub } from "../server/watch-hub.js";
import {
  type ApiStack,
  startApiStack,
  TEST_CONNECTION_NAME,
  withTestToken,
} from "./helpers/api.js";

// WatchJob as a client sees it, and the one-subscription fan-out as Redis sees it.

const HEARTBEAT_MS = 250;

let st: ApiStack;
let client: Client<typeof DownloadService>;
let h2Client: Client<typeof DownloadService>;
const sessions: Http2SessionManager[] = [];

beforeAll(async () => {
  st = await startApiStack({ WATCH_HEARTBEAT_MS: String(HEARTBEAT_MS) });
  client = createClient(
    DownloadService,
    createConnectTransport({
      baseUrl: st.server.url,
      httpVersion: "1.1",
      interceptors: [withTestToken],
    }),
  );
  const m = new Http2SessionManager(st.server.url);
  sessions.push(m);
  h2Client = createClient(
    DownloadService,
    createGrpcTransport({
      baseUrl: st.server.url,
      sessionManager: m,
      interceptors: [withTestToken],
    }),
  );
});
afterAll(async () => {
  for (const s of sessions) s.abort();
  await st?.stop();
});

/** Reads a watch in the background; `messages` fills as they arrive. */
function follow(c: Client<typeof DownloadService>, jobId: string, afterVersion = 0) {
  const abort = new AbortController();
  const messages: WatchJobResponse[] = [];
  const done = (async () => {
    for await (const msg of c.watchJob({ jobId, afterVersion }, { signal: abort.signal }))
      messages.push(msg);
  })().then(
    () => ({ ended: true as const, error: undefined }),
    (error: unknown) => ({ ended: true as const, error: ConnectError.from(error) }),
  );
  return {
    messages,
    jobs: () => messages.flatMap((m) => (m.event.case === "job" ? [m.event.value] : [])),
    heartbeats: () =>
      messages.flatMap((m) => (m.event.case === "heartbeat" ? [m.event.value] : [])),
    done,
    hangUp: () => abort.abort(),
  };
}

async function newJob(): Promise<string> {
  return (await client.initiate({ fileIds: [1, 2, 3] })).job?.jobId ?? "";
}

const numsub = async (jobId: string) => {
  const reply = (await st.redis.pubsub("NUMSUB", st.store.channel(jobId))) as [string, number];
  return Number(reply[1]);
};

describe("WatchJob", () => {
  test("sends the snapshot first, then each change in order, and ends right after the terminal state", async () => {
    const jobId = await newJob();
    const w = follow(client, jobId);
    await expect.poll(() => w.jobs().length).toBe(1);
    expect(w.messages[0]?.event.case).toBe("job");

    await st.startJob(jobId);
    await expect.poll(() => w.jobs().at(-1)?.state).toBe(JobState.PROCESSING);
    await st.progress(jobId, 100, 1000);
    await expect.poll(() => w.jobs().at(-1)?.progress?.percent).toBe(10);
    await st.progress(jobId, 600, 1000);
    await expect.poll(() => w.jobs().at(-1)?.progress?.percent).toBe(60);
    await st.complete(jobId, Buffer.from("zip"));

    const end = await w.done;
    expect(end.error).toBeUndefined();
    const jobs = w.jobs();
    expect(jobs.map((j) => j.state)).toEqual([
      JobState.QUEUED,
      JobState.PROCESSING,
      JobState.PROCESSING,
      JobState.PROCESSING,
      JobState.COMPLETED,
    ]);
    expect(jobs.map((j) => j.version)).toEqual([1, 2, 3, 4, 5]);
    expect(jobs.at(-1)?.result?.downloadUrl).toMatch(/^http/);
  });

  test("sends heartbeats with the current version while nothing changes", async () => {
    const jobId = await newJob();
    await st.startJob(jobId);
    const w = follow(h2Client, jobId);
    await expect.poll(() => w.heartbeats().length).toBeGreaterThanOrEqual(3);
    w.hangUp();
    await w.done;
    expect(w.messages[0]?.event.case).toBe("job");
    const beats = w.heartbeats();
    expect(beats.every((b) => b.version === 2)).toBe(true);
    // No heartbeat before the interval has passed since the previous message.
    const times = beats.map((b) => timestampMs(b.time ?? ({ seconds: 0n, nanos: 0 } as never)));
    for (let i = 1; i < times.length; i++) {
      expect((times[i] ?? 0) - (times[i - 1] ?? 0)).toBeGreaterThanOrEqual(HEARTBEAT_MS - 5);
    }
  });

  test("a resumed watch (after_version) gets no duplicate and misses no state", async () => {
    const jobId = await newJob();
    const first = follow(client, jobId);
    await st.startJob(jobId);
    await expect.poll(() => first.jobs().at(-1)?.version).toBe(2);
    first.hangUp();
    await first.done;
    const seen = first.jobs().at(-1)?.version ?? 0;

    // Changes while the client is away.
    await st.progress(jobId, 10, 100);
    await st.progress(jobId, 20, 100);
    const resumed = follow(client, jobId, seen);
    await expect.poll(() => resumed.jobs().length).toBeGreaterThan(0);
    await st.complete(jobId, Buffer.from("zip"));
    await resumed.done;

    const versions = resumed.jobs().map((j) => j.version);
    expect(versions.every((v) => v > seen)).toBe(true);
    expect(versions).toEqual([...new Set(versions)].sort((a, b) => a - b));
    expect(resumed.jobs()[0]?.progress?.percent).toBe(20);
    expect(resumed.jobs().at(-1)?.state).toBe(JobState.COMPLETED);
  });

  test("a watch that has already seen the current version gets a heartbeat at once", async () => {
    const jobId = await newJob();
    await st.startJob(jobId);
    const w = follow(client, jobId, 2);
    await expect.poll(() => w.messages.length).toBeGreaterThan(0);
    expect(w.messages[0]?.event.case).toBe("heartbeat");
    expect(w.heartbeats()[0]?.version).toBe(2);
    await st.fail(jobId);
    const end = await w.done;
    expect(end.error).toBeUndefined();
    const last = w.jobs().at(-1) as Job;
    expect(last.state).toBe(JobState.FAILED);
    expect(last.error).toMatchObject({ code: "not_found", retryable: false, missingFileIds: [9] });
  });

  test("fails with NOT_FOUND for an unknown job and INVALID_ARGUMENT for a malformed id", async () => {
    const unknown = await follow(client, newJobId()).done;
    expect(unknown.error?.code).toBe(Code.NotFound);
    const malformed = await follow(h2Client, "12345").done;
    expect(malformed.error?.code).toBe(Code.InvalidArgument);
  });

  test("200 watchers of one job share one Redis subscription, and hung-up clients release it", async () => {
    const jobId = await newJob();
    const watchers = Array.from({ length: 200 }, (_, i) =>
      follow(i % 2 === 0 ? client : h2Client, jobId),
    );
    await expect.poll(() => watchers.every((w) => w.jobs().length === 1)).toBe(true);

    // The API process holds at most 4 connections to Redis (here: commands + events).
    const list = (await st.redis.client("LIST")) as string;
    const apiConnections = list
      .trim()
      .split("\n")
      .filter((line) => !line.includes(`name=${TEST_CONNECTION_NAME} `));
    expect(apiConnections.length).toBeGreaterThan(0);
    expect(apiConnections.length).toBeLessThanOrEqual(4);
    expect(await numsub(jobId)).toBe(1);

    // One update reaches every stream.
    await st.startJob(jobId);
    await expect
      .poll(() => watchers.every((w) => w.jobs().at(-1)?.state === JobState.PROCESSING))
      .toBe(true);

    for (const w of watchers.slice(0, 199)) w.hangUp();
    await Promise.all(watchers.slice(0, 199).map((w) => w.done));
    expect(await numsub(jobId)).toBe(1);
    watchers[199]?.hangUp();
    await expect.poll(() => numsub(jobId)).toBe(0);
  });
});

describe("WatchHub (in process, over real Redis)", () => {
  test("coalesces updates a slow stream has not read yet, but never drops a state change", async () => {
    const log = createLogger("silent", "test");
    const sub = createRedis(st.svc.redis.url, { role: "subscriber", name: TEST_CONNECTION_NAME });
    await waitForRedis(sub);
    const store = new JobStore(st.redis, { prefix: st.cfg.QUEUE_PREFIX, recordTtlSeconds: 60 });
    const hub = new WatchHub(sub, store, { heartbeatMs: 60_000, log });
    const abort = new AbortController();
    try {
      const jobId = newJobId();
      await createJob(store, jobId, [1], st.owner);
      const slow = hub.watch(jobId, 0, abort.signal);
      const fast = hub.watch(jobId, 0, abort.signal);
      expect((await slow.next()).value).toMatchObject({ job: { version: 1 } });
      expect((await fast.next()).value).toMatchObject({ job: { version: 1 } });

      // The fast stream reads concurrently; once it has the terminal event, the slow
      // stream has been offered every event too (one dispatch per published message).
      const fastVersions: number[] = [];
      const fastDone = (async () => {
        for await (const ev of fast) if (ev.job) fastVersions.push(ev.job.version);
      })();
      const run = { jobId, token: "test", checkLock: false };
      const { files } = await markProcessing(store, run, {
        progress: { filesDone: 0, filesTotal: 1, bytesDone: 0, bytesTotal: 4, bytesPerSecond: 0 },
        files: (await store.get(jobId)).files,
        startedAt: Date.now(),
      });
      await recordProgress(store, run, {
        progress: { filesDone: 0, filesTotal: 1, bytesDone: 1, bytesTotal: 4, bytesPerSecond: 0 },
        files,
      });
      await recordProgress(store, run, {
        progress: { filesDone: 0, filesTotal: 1, bytesDone: 3, bytesTotal: 4, bytesPerSecond: 0 },
        files,
      });
      await markCancelled(store, jobId);
      await fastDone;
      expect(fastVersions.at(-1)).toBe(5);

      const slowEvents: WatchEvent[] = [];
      for await (const ev of slow) slowEvents.push(ev);
      expect(slowEvents.map((e) => [e.job?.version, e.job?.state])).toEqual([
        [4, "PROCESSING"],
        [5, "CANCELLED"],
      ]);
      expect(slowEvents[0]?.job?.progress.bytesDone).toBe(3);
      expect(hub.size).toEqual({ watchers: 0, jobs: 0 });
    } finally {
      abort.abort();
      hub.close(new Error("test over"));
      sub.disconnect();
    }
  });
});
