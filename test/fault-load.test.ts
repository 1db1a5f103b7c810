import { readFileSync } from "node:fs";
import { resolve } from "node:path";
import { ConnectError, createClient } from "@connectrpc/connect";
import {
  createConnectTransport,
  createGrpcTransport,
  Http2SessionManager,
} from "@connectrpc/connect-node";
import { afterAll, beforeAll, expect, test } from "vitest";
import { DownloadService, JobState } from "../gen/downloads/v1/download_service_pb.js";
import { freePort, waitUntil } from "../local/ports.js";
import { type ServiceProcess, startServiceProcess } from "../local/service-process.js";
import { TEST_AUTH_HEADER, withTestToken } from "./helpers/api.js";
import { STARTUP_MS } from "./helpers/deadline.js";
import { type Services, startServices, uniquePrefix } from "./helpers/services.js";
import { echoLine } from "./helpers/test-log.js";
import { spawnWorker, type WorkerProcess } from "./helpers/worker-process.js";

// Fault: a bounded load with jobs flowing. Pollers read GetStatus about once a second
// each (Connect GET, as a browser would, and Connect POST), watchers follow jobs to
// their end over HTTP/1.1 and gRPC, a producer keeps initiating jobs that a worker
// process runs. No call may fail, every watch must end in a terminal state, and the
// API's heap (after a full collection) must stay flat. SOAK=1 runs the long version.
// The load is an amount of work, not a duration: a busy machine takes longer to do it
// and the verdict is the same (throughput is `npm run bench`'s business).

const SOAK = process.env.SOAK === "1";
/** Jobs each watcher follows to their end; the first round warms the server up. */
const ROUNDS = SOAK ? 12 : 5;
/** GetStatus calls each poller makes, at least. */
const POLLS = SOAK ? 40 : 10;
const POLLERS = SOAK ? 200 : 100;
const WATCHERS = SOAK ? 200 : 100;
/** How long the work may take on a machine shared with other work. */
const LOAD_DEADLINE_MS = SOAK ? 900_000 : 300_000;
const ROOT = resolve(import.meta.dirname, "..");
const SERVICE = "/downloads.v1.DownloadService";
const FILES = [701, 702, 703, 704, 705, 706];

let svc: Services;
let api: ServiceProcess;
let worker: WorkerProcess;
let base: string;
const memoryLines: string[] = [];
const sessions: Http2SessionManager[] = [];

beforeAll(async () => {
  svc = await startServices();
  for (const id of FILES) await svc.putSource(id, 150_000 + id);
  const port = await freePort();
  base = `http://127.0.0.1:${port}`;
  const prefix = uniquePrefix("load");
  const echoApi = echoLine("api");
  api = startServiceProcess({
    name: "api",
    entry: "test/helpers/api-with-gc.ts",
    cwd: ROOT,
    env: {
      ...process.env,
      ...svc.env,
      NODE_OPTIONS: "--expose-gc",
      PORT: String(port),
      QUEUE_PREFIX: prefix,
      LOG_LEVEL: "error",
    },
    onLine: (line) => {
      if (line.startsWith("memory ")) memoryLines.push(line);
      else echoApi(line);
    },
  });
  // A job takes a second or two, so watchers see progress and not just the end.
  worker = spawnWorker({
    ...svc.env,
    QUEUE_PREFIX: prefix,
    WORKER_CONCURRENCY: "8",
    THROTTLE_BYTES_PER_SECOND: String(200_000),
    PROGRESS_INTERVAL_MS: "200",
  });
  await waitUntil("API", async () => (await fetch(`${base}/healthz`)).status === 200, STARTUP_MS);
});
afterAll(async () => {
  for (const s of sessions) s.abort();
  await worker?.kill("SIGTERM");
  await api?.stop(5000);
  await svc?.stop();
});

async function heapAfterGc(): Promise<number> {
  const seen = memoryLines.length;
  process.kill(api.pid, "SIGUSR2");
  await expect.poll(() => memoryLines.length).toBeGreaterThan(seen);
  return Number(/heapUsed=(\d+)/.exec(memoryLines.at(-1) ?? "")?.[1] ?? 0);
}

function rss(): number {
  return (
    Number(/VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${api.pid}/status`, "utf8"))?.[1] ?? 0) *
    1024
  );
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

test(
  `${POLLERS} pollers and ${WATCHERS} watchers following ${ROUNDS} jobs each to the end: no error, heap flat`,
  async () => {
    const h2 = new Http2SessionManager(base);
    sessions.push(h2);
    const h1 = createClient(
      DownloadService,
      createConnectTransport({ baseUrl: base, httpVersion: "1.1", interceptors: [withTestToken] }),
    );
    const grpc = createClient(
      DownloadService,
      createGrpcTransport({ baseUrl: base, sessionManager: h2, interceptors: [withTestToken] }),
    );

    const jobs: string[] = [];
    const errors: string[] = [];
    const count = { initiated: 0, polls: 0, watches: 0, watchMessages: 0 };
    const pollsBy = new Array<number>(POLLERS).fill(0);
    const watchesBy = new Array<number>(WATCHERS).fill(0);
    let stopping = false;
    const running = () => !stopping;
    const fail = (what: string, err: unknown) =>
      errors.push(`${what}: ${ConnectError.from(err).message}`);

    const producer = (async () => {
      for (let i = 0; running(); i++) {
        try {
          const fileIds = [
            FILES[i % FILES.length] as number,
            FILES[(i + 3) % FILES.length] as number,
          ];
          const { job } = await (i % 2 === 0 ? h1 : grpc).initiate({ fileIds });
          jobs.push(job?.jobId ?? "");
          count.initiated += 1;
        } catch (err) {
          fail("initiate", err);
        }
        await sleep(250);
      }
    })();

    const poller = async (n: number) => {
      await sleep(Math.random() * 1000);
      while (running()) {
        const jobId = jobs[Math.floor(Math.random() * jobs.length)];
        if (jobId !== undefined) {
          try {
            if (n % 2 === 0) {
              const message = encodeURIComponent(JSON.stringify({ jobId }));
              const url = `${base}${SERVICE}/GetStatus?connect=v1&encoding=json&message=${message}`;
              // A kept-alive connection the server closes (idle 5 s) just as the client
              // reuses it resets the GET; like a browser, send the idempotent GET again once.
              const res = await fetch(url, { headers: TEST_AUTH_HEADER }).catch((err: Error) => {
                if ((err.cause as { code?: string } | undefined)?.code !== "ECONNRESET") throw err;
                return fetch(url, { headers: TEST_AUTH_HEADER });
              });
              if (res.status !== 200) throw new Error(`HTTP ${res.status} ${await res.text()}`);
              await res.arrayBuffer();
            } else {
              await h1.getStatus({ jobId });
            }
            count.polls += 1;
            pollsBy[n] = (pollsBy[n] ?? 0) + 1;
          } catch (err) {
            fail("poll", err);
          }
        }
        await sleep(800 + Math.random() * 400);
      }
    };

    const watcher = async (n: number) => {
      await sleep(Math.random() * 1000);
      let watched = -1;
      while (running()) {
        // The newest job this watcher has not followed yet, as a user would open it.
        const newest = jobs.length - 1;
        if (newest <= watched) {
          await sleep(100);
          continue;
        }
        watched = newest;
        const jobId = jobs[newest] as string;
        let last: JobState | undefined;
        try {
          for await (const msg of (n % 2 === 0 ? h1 : grpc).watchJob({ jobId })) {
            count.watchMessages += 1;
            if (msg.event.case === "job") last = msg.event.value.state;
          }
          count.watches += 1;
          watchesBy[n] = (watchesBy[n] ?? 0) + 1;
          if (last !== JobState.COMPLETED)
            errors.push(
              `watch of ${jobId} ended in ${last === undefined ? "nothing" : JobState[last]}`,
            );
        } catch (err) {
          fail("watch", err);
        }
      }
    };

    const heapStart = await heapAfterGc();
    const load = Promise.all([
      producer,
      ...Array.from({ length: POLLERS }, (_, i) => poller(i)),
      ...Array.from({ length: WATCHERS }, (_, i) => watcher(i)),
    ]);
    // The first round warms the server up; the heap from there on must not grow.
    const everyone = (counts: number[], n: number) => counts.every((c) => c >= n);
    let heapWarm = 0;
    let rssWarm = 0;
    try {
      await expect
        .poll(() => everyone(watchesBy, 1) || errors.length > 0, { timeout: LOAD_DEADLINE_MS })
        .toBe(true);
      heapWarm = await heapAfterGc();
      rssWarm = rss();
      await expect
        .poll(
          () => (everyone(watchesBy, ROUNDS) && everyone(pollsBy, POLLS)) || errors.length > 0,
          { timeout: LOAD_DEADLINE_MS },
        )
        .toBe(true);
    } finally {
      stopping = true;
      await load;
    }
    // Every job initiated must end; the watchers above already saw theirs complete.
    const states = await Promise.all(
      jobs.map(async (jobId) => {
        await expect
          .poll(async () => (await h1.getStatus({ jobId })).job?.state, {
            timeout: LOAD_DEADLINE_MS,
            interval: 200,
          })
          .toBe(JobState.COMPLETED);
        return JobState.COMPLETED;
      }),
    );
    const heapEnd = await heapAfterGc();
    const rssEnd = rss();
    const mb = (n: number) => `${(n / 1024 / 1024).toFixed(1)} MB`;
    console.log(
      `fault load: ${POLLERS} pollers (Connect GET and POST), ${WATCHERS} watchers (HTTP/1.1 and gRPC); ` +
        `${count.initiated} jobs initiated, ${states.length} completed; ${count.polls} polls, ${count.watches} watches to the end ` +
        `(${count.watchMessages} messages); errors: ${errors.length}; API heap after GC ${mb(heapStart)} idle, ${mb(heapWarm)} warm, ` +
        `${mb(heapEnd)} at the end; RSS ${mb(rssWarm)} warm, ${mb(rssEnd)} at the end; lost: 0`,
    );
    expect(errors.slice(0, 10)).toEqual([]);
    expect(heapEnd).toBeLessThanOrEqual(heapWarm + 10 * 1024 * 1024);
  },
  3 * LOAD_DEADLINE_MS,
);
