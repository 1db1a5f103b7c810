import { readFile } from "node:fs/promises";
import type { Redis } from "ioredis";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { createDownloadClient } from "../clients/lib/client.js";
import { type WatchEvent, type WatchOptions, watchJob } from "../clients/lib/watch.js";
import { decodeJob } from "../core/job-store.js";
import { createLogger } from "../core/logger.js";
import { createRedis, waitForRedis } from "../core/redis.js";
import { type Job, JobState } from "../gen/downloads/v1/download_service_pb.js";
import { canConnect, freePort, waitUntil } from "../local/ports.js";
import { type ServiceProcess, startServiceProcess } from "../local/service-process.js";
import { type ApiServer, startApiServer } from "../server/server.js";
import { type RunningWorker, startWorker } from "../worker/worker.js";
import { STARTUP_MS } from "./helpers/deadline.js";
import { type Nginx, startNginx } from "./helpers/nginx.js";
import { type Services, startServices, TEST_TOKEN, uniquePrefix } from "./helpers/services.js";
import { readEvents } from "./helpers/sse.js";
import { echoLine } from "./helpers/test-log.js";

// Torture tests: a real nginx between watchJob and the API, configured the ways that
// cut or hold back long requests in production. Each profile runs a real job of more
// than 20 s (a throttled worker) and watches it from start to finish; the profiles run
// side by side to keep the file short. Each prints what happened to its watcher. Stock
// nginx (f, g) streams because every streaming answer says X-Accel-Buffering: no; a
// proxy that buffers anyway (c) gets long-polls.

const FILE_ID = 91;
/** 2.4 MB at 100 kB/s: 24 s of processing. */
const FILE_BYTES = 2_400_000;
const THROTTLE = 100_000;
/** Progress reaches Redis every 5 s: longer than the proxies' 3 s idle timeout below. */
const PROGRESS_INTERVAL_MS = 5_000;
const PROFILE_TIMEOUT_MS = 300_000;

let svc: Services;
let prefix: string;
let worker: RunningWorker;
let recorder: Redis;
/** Every record published per job, in order: what the server knew. */
const published = new Map<string, { version: number; state: string }[]>();
const cleanups: (() => Promise<void>)[] = [];

beforeAll(async () => {
  svc = await startServices();
  prefix = uniquePrefix("px");
  await svc.putSource(FILE_ID, FILE_BYTES, "slow.bin");
  worker = await startWorker(
    svc.config({
      QUEUE_PREFIX: prefix,
      THROTTLE_BYTES_PER_SECOND: String(THROTTLE),
      PROGRESS_INTERVAL_MS: String(PROGRESS_INTERVAL_MS),
      WORKER_CONCURRENCY: "10",
    }),
    createLogger("silent", "worker"),
  );
  recorder = createRedis(svc.redis.url, { role: "subscriber", name: "proxy-test-recorder" });
  await waitForRedis(recorder);
  recorder.on("pmessage", (_pattern: string, channel: string, message: string) => {
    const jobId = channel.slice(`${prefix}:job:`.length, -":events".length);
    const rec = decodeJob(JSON.parse(message) as Record<string, string>);
    const list = published.get(jobId) ?? [];
    list.push({ version: rec.version, state: rec.state });
    published.set(jobId, list);
  });
  await recorder.psubscribe(`${prefix}:job:*:events`);
});

afterAll(async () => {
  await Promise.allSettled(cleanups.map((c) => c()));
  recorder?.disconnect();
  await worker?.close();
  await svc?.stop();
});

function apiEnv(extra: Record<string, string>): Record<string, string> {
  return { QUEUE_PREFIX: prefix, LOG_LEVEL: "warn", ...extra };
}

async function inProcessApi(extra: Record<string, string>): Promise<ApiServer> {
  const api = await startApiServer(
    svc.config(apiEnv({ PORT: "0", ...extra })),
    createLogger("silent", "api"),
  );
  cleanups.push(() => api.close());
  return api;
}

async function proxy(opts: Parameters<typeof startNginx>[0]): Promise<Nginx> {
  const nginx = await startNginx(opts);
  cleanups.push(() => nginx.stop());
  return nginx;
}

const hostPort = (url: string) => new URL(url).host;

/** What one profile's watcher went through. */
interface Outcome {
  jobs: Job[];
  events: WatchEvent[];
  seconds: number;
  count(type: WatchEvent["type"]): number;
  reconnectsWithError: number;
}

/** Starts a job through `nginx` and watches it to the end with watchJob. */
async function watchThrough(
  name: string,
  nginx: Nginx,
  opts: WatchOptions = {},
  during?: (job: () => Job | undefined) => Promise<void>,
): Promise<Outcome> {
  const client = createDownloadClient({ baseUrl: nginx.url, token: TEST_TOKEN });
  const started = Date.now();
  const { job } = await client.initiate({ fileIds: [FILE_ID] });
  const jobId = job?.jobId ?? "";
  // The job as Initiate returned it is the first snapshot; the watch resumes after it,
  // as any client that starts a job and then follows it does.
  const jobs: Job[] = job !== undefined ? [job] : [];
  const events: WatchEvent[] = [];
  let finished = false;
  const side = during?.(() => jobs.at(-1)) ?? Promise.resolve();
  try {
    for await (const j of watchJob(client, jobId, {
      ...opts,
      afterVersion: job?.version ?? 0,
      onEvent: (e) => events.push(e),
    }))
      jobs.push(j);
  } finally {
    finished = true;
  }
  await side;
  const seconds = (Date.now() - started) / 1000;
  const count = (type: WatchEvent["type"]) => events.filter((e) => e.type === type).length;
  const reconnectsWithError = events.filter(
    (e) => e.type === "reconnecting" && e.error !== undefined,
  ).length;
  const errors = [
    ...new Set(
      events.flatMap((e) => (e.type === "reconnecting" && e.error ? [e.error.rawMessage] : [])),
    ),
  ];
  console.log(
    `[proxy] ${name}: ${seconds.toFixed(1)} s, ${jobs.length} snapshots (versions ${jobs[0]?.version}..${jobs.at(-1)?.version}), ` +
      `${count("connected")} streams, ${count("reconnecting")} reconnects (${reconnectsWithError} after an error), ` +
      `${count("polling")} fallbacks to polling, ${count("poll")} polls, ${count("streaming")} returns to streaming, ` +
      `${count("heartbeat")} heartbeats${errors.length > 0 ? `; errors: ${errors.join(" | ")}` : ""}`,
  );
  expect(finished).toBe(true);
  return { jobs, events, seconds, count, reconnectsWithError };
}

/** No duplicate, every state in order, the result at the end, a job of 20 s or more. */
function expectWholeJob(o: Outcome): void {
  const versions = o.jobs.map((j) => j.version);
  for (let i = 1; i < versions.length; i++)
    expect(versions[i]).toBeGreaterThan(versions[i - 1] ?? 0);
  const states = o.jobs.map((j) => j.state).filter((s, i, all) => i === 0 || all[i - 1] !== s);
  expect(states).toEqual([JobState.QUEUED, JobState.PROCESSING, JobState.COMPLETED]);
  const last = o.jobs.at(-1);
  expect(last?.result?.sha256).toMatch(/^[0-9a-f]{64}$/);
  const ms = (t: { seconds: bigint; nanos: number } | undefined) =>
    Number(t?.seconds ?? 0n) * 1000 + (t?.nanos ?? 0) / 1e6;
  expect(ms(last?.endTime) - ms(last?.startTime)).toBeGreaterThanOrEqual(20_000);
}

/**
 * A streamed watch saw every state the server went through, each within the versions
 * it lasted: the server may coalesce records within one state (a slow reader gets the
 * latest progress), never across a change of state. And it ended at the last version.
 */
function expectNoMissedState(o: Outcome): void {
  const jobId = o.jobs[0]?.jobId ?? "";
  const records = published.get(jobId) ?? [];
  const changes = records.filter((r, i, all) => i === 0 || all[i - 1]?.state !== r.state);
  expect(changes.length).toBeGreaterThanOrEqual(2);
  changes.forEach((c, i) => {
    const until = changes[i + 1]?.version ?? Number.POSITIVE_INFINITY;
    const seen = o.jobs.some(
      (j) => j.version >= c.version && j.version < until && JobState[j.state] === c.state,
    );
    expect(seen, `state ${c.state} (versions ${c.version} to ${until - 1})`).toBe(true);
  });
  expect(o.jobs.at(-1)?.version).toBe(records.at(-1)?.version);
}

/** TCP connections in ESTABLISHED state whose local port is `port` (Linux /proc/net/tcp). */
async function establishedOn(port: number): Promise<number> {
  const table = await readFile("/proc/net/tcp", "utf8");
  return table
    .split("\n")
    .slice(1)
    .filter((line) => {
      const cols = line.trim().split(/\s+/);
      return cols[3] === "01" && Number.parseInt(cols[1]?.split(":")[1] ?? "", 16) === port;
    }).length;
}

describe.concurrent("watchJob through nginx", () => {
  test(
    "(a) idle timeout 3 s: 1 s heartbeats keep one stream open for the whole job",
    async () => {
      const api = await inProcessApi({ WATCH_HEARTBEAT_MS: "1000" });
      const nginx = await proxy({
        upstreams: [hostPort(api.url)],
        location: "proxy_buffering off; proxy_http_version 1.1; proxy_read_timeout 3s;",
      });
      const o = await watchThrough("a idle 3s, heartbeat 1s", nginx);
      expectWholeJob(o);
      expectNoMissedState(o);
      expect(o.count("reconnecting")).toBe(0);
      expect(o.count("polling")).toBe(0);
      expect(o.count("connected")).toBe(1);
    },
    PROFILE_TIMEOUT_MS,
  );

  test(
    "(a') idle timeout 3 s with 10 s heartbeats: nginx cuts the stream and the watcher resumes each time",
    async () => {
      const api = await inProcessApi({ WATCH_HEARTBEAT_MS: "10000" });
      const nginx = await proxy({
        upstreams: [hostPort(api.url)],
        location: "proxy_buffering off; proxy_http_version 1.1; proxy_read_timeout 3s;",
      });
      const o = await watchThrough("a' idle 3s, heartbeat 10s", nginx);
      expectWholeJob(o);
      expectNoMissedState(o);
      expect(o.reconnectsWithError).toBeGreaterThanOrEqual(2);
      expect(o.count("polling")).toBe(0);
      expect(nginx.output()).toContain("upstream timed out");
    },
    PROFILE_TIMEOUT_MS,
  );

  test(
    "(b) every connection cut every 4 s (nginx reloads, old workers stop after 1 s): resumes with after_version",
    async () => {
      const api = await inProcessApi({ WATCH_HEARTBEAT_MS: "1000" });
      const nginx = await proxy({
        upstreams: [hostPort(api.url)],
        main: "worker_shutdown_timeout 1s;",
        location: "proxy_buffering off; proxy_http_version 1.1;",
      });
      let reloads = 0;
      const o = await watchThrough("b reload every 4s", nginx, {}, async (current) => {
        while (!isDone(current())) {
          await waitUntil("next cut", async () => isDone(current()), 4_000).catch(() => undefined);
          if (isDone(current())) break;
          nginx.reload();
          reloads += 1;
        }
      });
      console.log(`[proxy] b: ${reloads} reloads`);
      expectWholeJob(o);
      expectNoMissedState(o);
      expect(reloads).toBeGreaterThanOrEqual(4);
      expect(o.reconnectsWithError).toBeGreaterThanOrEqual(3);
      expect(o.count("connected")).toBeGreaterThanOrEqual(4);
    },
    PROFILE_TIMEOUT_MS,
  );

  test(
    "(c) buffering proxy (HTTP/1.0 upstream, X-Accel-Buffering ignored): no first message in time, long-polling GetStatus, terminal state reached",
    async () => {
      const api = await inProcessApi({ WATCH_HEARTBEAT_MS: "1000" });
      const nginx = await proxy({
        upstreams: [hostPort(api.url)],
        // A proxy that buffers whatever the answer asks for.
        location:
          "proxy_buffering on; proxy_http_version 1.0; proxy_ignore_headers X-Accel-Buffering;",
      });
      const o = await watchThrough("c buffering", nginx, {
        firstMessageTimeoutMs: 3_000,
        streamRetryMs: 4_000,
      });
      expectWholeJob(o);
      // The first stream gets no message in time and the watcher falls back to polling. A
      // later stream may still connect: once it has held a whole buffer's worth of
      // messages (more of them on a slow, loaded machine) nginx passes that buffer on.
      const firstOutcome = o.events.find((e) => e.type === "connected" || e.type === "polling");
      expect(firstOutcome?.type).toBe("polling");
      const reasons = o.events.flatMap((e) => (e.type === "polling" ? [e.reason.rawMessage] : []));
      expect(reasons.every((r) => r.includes("no message within"))).toBe(true);
      // It keeps checking whether streaming works again.
      expect(o.count("streaming")).toBeGreaterThanOrEqual(1);
      // Long-polls, not 1 s polls: each waits on the server for the next version, so a
      // poll answers a change or ends a polling period (streamRetryMs), about one per
      // change over a job of 20 s or more (1 s polls would make four per period).
      const changes = new Set(o.events.flatMap((e) => (e.type === "poll" ? [e.version] : []))).size;
      console.log(
        `[proxy] c: ${o.count("poll")} polls for ${changes} versions seen while polling, ${o.count("polling")} polling periods`,
      );
      // Each polling period adds at most two polls that bring no change: the one that
      // opens it and the one its end cuts short.
      expect(o.count("poll")).toBeLessThanOrEqual(changes + 2 * o.count("polling") + 1);
    },
    PROFILE_TIMEOUT_MS,
  );

  test(
    "(f) stock nginx (buffering on, HTTP/1.0 upstream, nothing changed): X-Accel-Buffering: no lets WatchJob stream the whole job",
    async () => {
      const api = await inProcessApi({ WATCH_HEARTBEAT_MS: "1000" });
      const nginx = await proxy({ upstreams: [hostPort(api.url)] });
      const o = await watchThrough("f stock nginx", nginx, { firstMessageTimeoutMs: 5_000 });
      expectWholeJob(o);
      expectNoMissedState(o);
      expect(o.count("polling")).toBe(0);
      expect(o.count("connected")).toBeGreaterThanOrEqual(1);
      expect(o.count("heartbeat")).toBeGreaterThanOrEqual(5);
    },
    PROFILE_TIMEOUT_MS,
  );

  test(
    "(g) stock nginx: a job's server-sent events arrive as they happen, heartbeats included",
    async () => {
      const api = await inProcessApi({ WATCH_HEARTBEAT_MS: "1000" });
      const nginx = await proxy({ upstreams: [hostPort(api.url)] });
      const client = createDownloadClient({ baseUrl: nginx.url, token: TEST_TOKEN });
      const { job } = await client.initiate({ fileIds: [FILE_ID] });
      const jobId = job?.jobId ?? "";
      const r = readEvents(`${nginx.url}/v1/jobs/${jobId}/events`, {
        authorization: `Bearer ${TEST_TOKEN}`,
      });
      // Through a buffering proxy nothing would arrive before the job's end (20 s or more).
      await waitUntil("the first event", async () => r.jobs().length > 0, 60_000);
      const early = (await client.getStatus({ jobId })).job;
      expect(isDone(early)).toBe(false);
      await waitUntil(
        "a heartbeat",
        async () => r.events.some((e) => e.comment?.startsWith("heartbeat")),
        60_000,
      );
      const res = r.response();
      expect(res?.headers.get("content-type")).toMatch(/^text\/event-stream/);
      // nginx consumes X-Accel-Buffering: it is not passed on to the client.
      await r.done;
      const states = r
        .jobs()
        .map((j) => j.job.state)
        .filter((st, i, all) => all[i - 1] !== st);
      expect(states.at(-1)).toBe("JOB_STATE_COMPLETED");
      expect(states).toContain("JOB_STATE_PROCESSING");
      console.log(
        `[proxy] g: ${r.jobs().length} job events, ${r.events.filter((e) => e.comment !== undefined).length} heartbeats`,
      );
    },
    PROFILE_TIMEOUT_MS,
  );

  test(
    "(d) two API processes behind nginx, the one holding the stream killed mid-job: the watcher continues through the other",
    async () => {
      const ports = [await freePort(), await freePort()];
      const procs: ServiceProcess[] = ports.map((port, i) =>
        startServiceProcess({
          name: `api${i}`,
          entry: "server/main.ts",
          cwd: process.cwd(),
          env: {
            ...process.env,
            ...svc.env,
            ...apiEnv({ PORT: String(port), HOST: "127.0.0.1", WATCH_HEARTBEAT_MS: "1000" }),
          },
          onLine: echoLine(`api${i}`),
        }),
      );
      cleanups.push(async () => {
        await Promise.all(procs.map((p) => p.stop(3_000)));
      });
      for (const port of ports)
        await waitUntil(`api on ${port}`, () => canConnect(port), STARTUP_MS);
      const nginx = await proxy({
        upstreams: ports.map((p) => `127.0.0.1:${p}`),
        location: "proxy_buffering off; proxy_http_version 1.1;",
      });
      let killed = -1;
      const o = await watchThrough("d kill the serving API", nginx, {}, async (current) => {
        await waitUntil(
          "a few seconds of processing",
          async () => (current()?.progress?.bytesDone ?? 0n) > 0n,
          60_000,
        );
        // The stream is the only long-lived connection from nginx to an API.
        await waitUntil(
          "the stream's API",
          async () =>
            (await establishedOn(ports[0] ?? 0)) + (await establishedOn(ports[1] ?? 0)) === 1,
        );
        killed = (await establishedOn(ports[0] ?? 0)) === 1 ? 0 : 1;
        procs[killed]?.kill();
      });
      console.log(
        `[proxy] d: killed api${killed} (port ${ports[killed]}), api${1 - killed} finished the watch`,
      );
      expectWholeJob(o);
      expectNoMissedState(o);
      expect(killed).toBeGreaterThanOrEqual(0);
      expect(procs[killed]?.running()).toBe(false);
      expect(procs[1 - killed]?.running()).toBe(true);
      expect(o.reconnectsWithError).toBeGreaterThanOrEqual(1);
      expect(o.count("connected")).toBeGreaterThanOrEqual(2);
    },
    PROFILE_TIMEOUT_MS,
  );

  test(
    "(e) WATCH_MAX_STREAM_MS 4 s: streams end cleanly and the watcher resumes before any proxy limit",
    async () => {
      const api = await inProcessApi({ WATCH_HEARTBEAT_MS: "1000", WATCH_MAX_STREAM_MS: "4000" });
      const nginx = await proxy({
        upstreams: [hostPort(api.url)],
        location: "proxy_buffering off; proxy_http_version 1.1; proxy_read_timeout 3s;",
      });
      const o = await watchThrough("e max stream 4s", nginx);
      expectWholeJob(o);
      expectNoMissedState(o);
      expect(o.count("reconnecting")).toBeGreaterThanOrEqual(4);
      expect(o.reconnectsWithError).toBe(0);
      expect(o.count("polling")).toBe(0);
    },
    PROFILE_TIMEOUT_MS,
  );
});

function isDone(job: Job | undefined): boolean {
  return (
    job !== undefined &&
    (job.state === JobState.COMPLETED ||
      job.state === JobState.FAILED ||
      job.state === JobState.CANCELLED)
  );
}
