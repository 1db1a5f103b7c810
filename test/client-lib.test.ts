import { Code, ConnectError } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { createDownloadClient, type DownloadClient } from "../clients/lib/client.js";
import { createDownloadClient as createNodeClient } from "../clients/lib/node.js";
import { type WatchEvent, waitForJob, watchJob } from "../clients/lib/watch.js";
import { newJobId } from "../core/jobs.js";
import { createLogger } from "../core/logger.js";
import { type Job, JobState } from "../gen/downloads/v1/download_service_pb.js";
import { type ApiServer, startApiServer } from "../server/server.js";
import { type ApiStack, startApiStack } from "./helpers/api.js";
import { TEST_TOKEN } from "./helpers/services.js";

// The client library against the real API: every transport it offers, resume without
// duplicates, the polling fallback, a server restart, and the errors a caller acts on.

const HEARTBEAT_MS = 300;

let st: ApiStack;
/** A second API server (the "restarted" one) a test may start; stopped in afterAll. */
let extra: ApiServer | undefined;

beforeAll(async () => {
  st = await startApiStack({ WATCH_HEARTBEAT_MS: String(HEARTBEAT_MS) });
});
afterAll(async () => {
  await extra?.close();
  await st?.stop();
});

async function newJob(client: DownloadClient): Promise<string> {
  const { job } = await client.initiate({ fileIds: [1, 2] });
  return job?.jobId ?? "";
}

/** Runs watchJob in the background, recording the jobs and events. */
function collect(client: DownloadClient, jobId: string, opts: Parameters<typeof watchJob>[2] = {}) {
  const jobs: Job[] = [];
  const events: WatchEvent[] = [];
  const done = (async () => {
    for await (const job of watchJob(client, jobId, { ...opts, onEvent: (e) => events.push(e) }))
      jobs.push(job);
  })().then(
    () => undefined,
    (err: unknown) => ConnectError.from(err),
  );
  return {
    jobs,
    events,
    done,
    count: (type: WatchEvent["type"]) => events.filter((e) => e.type === type).length,
  };
}

/** QUEUED → PROCESSING → progress → COMPLETED, as a worker would. */
async function runJob(jobId: string): Promise<void> {
  await st.startJob(jobId);
  await st.progress(jobId, 300, 1000);
  await st.progress(jobId, 700, 1000);
  await st.complete(jobId, Buffer.from("zip bytes"));
}

function expectCleanSequence(jobs: Job[]): void {
  const versions = jobs.map((j) => j.version);
  for (let i = 1; i < versions.length; i++)
    expect(versions[i]).toBeGreaterThan(versions[i - 1] ?? 0);
  const states = jobs.map((j) => j.state).filter((s, i, all) => i === 0 || all[i - 1] !== s);
  expect(states).toEqual([JobState.QUEUED, JobState.PROCESSING, JobState.COMPLETED]);
  expect(jobs.at(-1)?.result?.sha256).toMatch(/^[0-9a-f]{64}$/);
}

describe("createDownloadClient", () => {
  const kinds: [string, () => DownloadClient][] = [
    [
      "connect-web Connect JSON (fetch)",
      () => createDownloadClient({ baseUrl: st.server.url, token: TEST_TOKEN }),
    ],
    [
      "connect-web Connect binary",
      () =>
        createDownloadClient({ baseUrl: st.server.url, token: TEST_TOKEN, useBinaryFormat: true }),
    ],
    [
      "connect-web gRPC-Web",
      () =>
        createDownloadClient({ baseUrl: st.server.url, token: TEST_TOKEN, protocol: "grpc-web" }),
    ],
    ["connect-node Connect", () => createNodeClient({ baseUrl: st.server.url, token: TEST_TOKEN })],
    [
      "connect-node gRPC-Web",
      () => createNodeClient({ baseUrl: st.server.url, token: TEST_TOKEN, protocol: "grpc-web" }),
    ],
    [
      "connect-node gRPC over h2c",
      () => createNodeClient({ baseUrl: st.server.url, token: TEST_TOKEN, protocol: "grpc" }),
    ],
  ];
  test.each(kinds)(
    "%s: watchJob follows a job from QUEUED to COMPLETED with every state",
    async (_, make) => {
      const client = make();
      const jobId = await newJob(client);
      const w = collect(client, jobId);
      await expect.poll(() => w.jobs.length).toBe(1);
      await runJob(jobId);
      expect(await w.done).toBeUndefined();
      expectCleanSequence(w.jobs);
      expect(w.jobs.map((j) => j.version)).toEqual([1, 2, 3, 4, 5]);
      expect(w.count("connected")).toBe(1);
      expect(w.count("reconnecting")).toBe(0);
    },
  );

  test("sends the bearer token on every call, and polls GetStatus over HTTP GET", async () => {
    const seen: { method: string; path: string; auth: string | null }[] = [];
    const client = createDownloadClient({
      baseUrl: st.server.url,
      token: TEST_TOKEN,
      fetch: (input, init) => {
        const req = new Request(input, init);
        seen.push({
          method: req.method,
          path: new URL(req.url).pathname,
          auth: req.headers.get("authorization"),
        });
        return fetch(req);
      },
    });
    const jobId = await newJob(client);
    await client.getStatus({ jobId });
    expect(seen).toEqual([
      {
        method: "POST",
        path: "/downloads.v1.DownloadService/Initiate",
        auth: `Bearer ${TEST_TOKEN}`,
      },
      {
        method: "GET",
        path: "/downloads.v1.DownloadService/GetStatus",
        auth: `Bearer ${TEST_TOKEN}`,
      },
    ]);
  });
});

describe("watchJob", () => {
  const client = () => createDownloadClient({ baseUrl: st.server.url, token: TEST_TOKEN });

  test("resumes after afterVersion with no duplicate, and a finished job yields its terminal snapshot once", async () => {
    const c = client();
    const jobId = await newJob(c);
    await st.startJob(jobId);
    await st.progress(jobId, 100, 1000);
    const w = collect(c, jobId, { afterVersion: 2 });
    await expect.poll(() => w.jobs.length).toBe(1);
    expect(w.jobs[0]?.version).toBe(3);
    await st.complete(jobId, Buffer.from("zip"));
    expect(await w.done).toBeUndefined();
    expect(w.jobs.map((j) => j.version)).toEqual([3, 4]);

    // A caller that already has the terminal version still gets the end it waits for.
    const final = await waitForJob(c, jobId, { afterVersion: 4 });
    expect(final.state).toBe(JobState.COMPLETED);
    expect(final.version).toBe(4);
  });

  test("throws NotFound, InvalidArgument and Unauthenticated at once, without retrying", async () => {
    const c = client();
    const events: WatchEvent[] = [];
    const unknown = await waitForJob(c, newJobId(), { onEvent: (e) => events.push(e) }).catch(
      (e: unknown) => ConnectError.from(e),
    );
    expect(unknown).toBeInstanceOf(ConnectError);
    expect((unknown as ConnectError).code).toBe(Code.NotFound);
    const malformed = await waitForJob(c, "not-a-job-id").catch((e: unknown) =>
      ConnectError.from(e),
    );
    expect((malformed as ConnectError).code).toBe(Code.InvalidArgument);
    expect(events.filter((e) => e.type === "reconnecting" || e.type === "polling")).toEqual([]);

    // Without the token (or with a wrong one) the caller has to act: no retrying either.
    const jobId = await newJob(c);
    for (const anonymous of [
      createDownloadClient({ baseUrl: st.server.url }),
      createNodeClient({ baseUrl: st.server.url, token: "wrong", protocol: "grpc" }),
    ]) {
      const denied = await waitForJob(anonymous, jobId, { onEvent: (e) => events.push(e) }).catch(
        (e: unknown) => ConnectError.from(e),
      );
      expect((denied as ConnectError).code).toBe(Code.Unauthenticated);
    }
    expect(events.filter((e) => e.type === "reconnecting" || e.type === "polling")).toEqual([]);
  });

  test("the AbortSignal ends the watch with Canceled", async () => {
    const c = client();
    const jobId = await newJob(c);
    const abort = new AbortController();
    const w = collect(c, jobId, { signal: abort.signal });
    await expect.poll(() => w.events.some((e) => e.type === "heartbeat")).toBe(true);
    abort.abort();
    expect((await w.done)?.code).toBe(Code.Canceled);
  });

  test("falls back to polling GetStatus (over GET) when the path refuses streams, and still ends with the terminal job", async () => {
    const gets: string[] = [];
    // What a proxy that routes only unary paths does to a stream: 404.
    const c = createDownloadClient({
      baseUrl: st.server.url,
      token: TEST_TOKEN,
      fetch: (input, init) => {
        const req = new Request(input, init);
        if (req.url.endsWith("/WatchJob"))
          return Promise.resolve(new Response("no route", { status: 404 }));
        if (req.method === "GET") gets.push(new URL(req.url).pathname);
        return fetch(req);
      },
    });
    const jobId = await newJob(c);
    const w = collect(c, jobId, { pollIntervalMs: 100, streamRetryMs: 1_000 });
    await expect.poll(() => w.jobs.length).toBe(1);
    await st.startJob(jobId);
    await expect.poll(() => w.jobs.at(-1)?.state).toBe(JobState.PROCESSING);
    // It keeps polling and keeps trying to stream again (each try refused).
    await expect.poll(() => w.count("streaming")).toBeGreaterThanOrEqual(1);
    await st.complete(jobId, Buffer.from("zip"));
    expect(await w.done).toBeUndefined();
    const states = w.jobs.map((j) => j.state);
    expect(states).toEqual([JobState.QUEUED, JobState.PROCESSING, JobState.COMPLETED]);
    expect(w.events.find((e) => e.type === "polling")).toMatchObject({
      reason: { code: Code.Unimplemented },
    });
    expect(gets.length).toBeGreaterThan(0);
    expect(new Set(gets)).toEqual(new Set(["/downloads.v1.DownloadService/GetStatus"]));
  });

  test("its polling fallback long-polls: about one GetStatus per change, each naming the version it has", async () => {
    const asked: { afterVersion?: number; wait?: string }[] = [];
    const c = createDownloadClient({
      baseUrl: st.server.url,
      token: TEST_TOKEN,
      fetch: (input, init) => {
        const req = new Request(input, init);
        if (req.url.endsWith("/WatchJob"))
          return Promise.resolve(new Response("no route", { status: 404 }));
        if (req.url.includes("/GetStatus?")) {
          const message = new URL(req.url).searchParams.get("message") ?? "{}";
          asked.push(JSON.parse(message) as { afterVersion?: number; wait?: string });
        }
        return fetch(req);
      },
    });
    const jobId = await newJob(c);
    // A plain poller at this interval would ask dozens of times while the job sits still.
    const w = collect(c, jobId, { pollIntervalMs: 50, streamRetryMs: 600_000 });
    await expect.poll(() => w.jobs.length).toBe(1);
    // The job sits still: the poll waits on the server rather than asking again.
    await expect.poll(() => asked.some((m) => m.wait !== undefined)).toBe(true);
    await new Promise((r) => setTimeout(r, 1_000));
    await runJob(jobId);
    expect(await w.done).toBeUndefined();
    expectCleanSequence(w.jobs);
    const waiting = asked.filter((m) => m.wait !== undefined);
    expect(waiting.length).toBeGreaterThan(0);
    for (const m of waiting) expect(m.afterVersion).toBeGreaterThan(0);
    // One poll per version the job went through, the first plain one and a few spare
    // (a poll may arrive between two changes written back to back).
    const versions = w.jobs.at(-1)?.version ?? 0;
    expect(asked.length).toBeLessThanOrEqual(versions + 3);
  });

  test("survives the API restarting mid-job: resumes on the new process with no gap", async () => {
    const port = st.server.port;
    const c = createNodeClient({ baseUrl: st.server.url, token: TEST_TOKEN });
    const jobId = await newJob(c);
    const w = collect(c, jobId, { baseBackoffMs: 100, maxBackoffMs: 500 });
    await expect.poll(() => w.jobs.length).toBe(1);
    await st.startJob(jobId);
    await expect.poll(() => w.jobs.at(-1)?.state).toBe(JobState.PROCESSING);

    await st.server.close();
    // Changes while no API runs reach the watcher after the restart.
    await st.progress(jobId, 500, 1000);
    extra = await startApiServer(
      { ...st.cfg, PORT: port },
      createLogger("silent", "api-restarted"),
    );
    await expect.poll(() => w.jobs.at(-1)?.progress?.percent).toBe(50);
    await st.complete(jobId, Buffer.from("zip"));
    expect(await w.done).toBeUndefined();
    expectCleanSequence(w.jobs);
    expect(w.jobs.map((j) => j.version)).toEqual([1, 2, 3, 4]);
    expect(w.count("reconnecting")).toBeGreaterThanOrEqual(1);
    const firstError = w.events.find((e) => e.type === "reconnecting" && e.error !== undefined);
    expect(firstError).toMatchObject({ error: { code: Code.Unavailable } });
  });

  test("gives up with Unavailable after maxRetryTimeMs when no server answers", async () => {
    // A port that was free a moment ago: nothing answers there.
    const { createServer } = await import("node:net");
    const probe = createServer();
    await new Promise<void>((resolve) => probe.listen(0, "127.0.0.1", resolve));
    const port = (probe.address() as { port: number }).port;
    await new Promise<void>((resolve) => probe.close(() => resolve()));
    const c = createNodeClient({ baseUrl: `http://127.0.0.1:${port}` });
    const events: WatchEvent[] = [];
    const err = await waitForJob(c, newJobId(), {
      baseBackoffMs: 50,
      maxBackoffMs: 200,
      maxRetryTimeMs: 1_500,
      onEvent: (e) => events.push(e),
    }).catch((e: unknown) => ConnectError.from(e));
    expect((err as ConnectError).code).toBe(Code.Unavailable);
    expect(events.filter((e) => e.type === "reconnecting").length).toBeGreaterThan(1);
  });
});

describe("WATCH_MAX_STREAM_MS", () => {
  test("a stream older than the limit ends cleanly right after a message, and watchJob resumes with no gap", async () => {
    const short = await startApiStack(
      { WATCH_HEARTBEAT_MS: "400", WATCH_MAX_STREAM_MS: "1000" },
      { services: st.svc },
    );
    try {
      const c = createNodeClient({ baseUrl: short.server.url, token: TEST_TOKEN });
      const { job } = await c.initiate({ fileIds: [1] });
      const jobId = job?.jobId ?? "";

      // The raw stream: it ends OK (no error) although the job is still queued.
      const started = Date.now();
      const kinds: string[] = [];
      for await (const msg of c.watchJob({ jobId, afterVersion: 0 }))
        kinds.push(msg.event.case ?? "");
      expect(Date.now() - started).toBeGreaterThanOrEqual(1000);
      expect(kinds[0]).toBe("job");
      expect(kinds.length).toBeGreaterThan(1);

      const w = collect(c, jobId);
      await expect.poll(() => w.jobs.length).toBe(1);
      await short.startJob(jobId);
      await expect.poll(() => w.count("reconnecting")).toBeGreaterThanOrEqual(2);
      await short.progress(jobId, 500, 1000);
      await expect.poll(() => w.count("reconnecting")).toBeGreaterThanOrEqual(4);
      await short.complete(jobId, Buffer.from("zip"));
      expect(await w.done).toBeUndefined();
      expect(w.jobs.map((j) => j.version)).toEqual([1, 2, 3, 4]);
      expectCleanSequence(w.jobs);
      // Clean ends carry no error: nothing went wrong, the server asked for a fresh stream.
      expect(
        w.events.filter((e) => e.type === "reconnecting").every((e) => e.error === undefined),
      ).toBe(true);
      expect(w.count("polling")).toBe(0);
    } finally {
      await short.stop();
    }
  });
});
