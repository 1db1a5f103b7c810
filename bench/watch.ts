import { type ChildProcess, spawn } from "node:child_process";
import { once } from "node:events";
import { createClient } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { JobStore } from "../core/job-store.js";
import { createJob, markProcessing, recordProgress } from "../core/job-transitions.js";
import { newJobId } from "../core/jobs.js";
import { createRedis } from "../core/redis.js";
import { DownloadService } from "../gen/downloads/v1/download_service_pb.js";
import { waitUntil } from "../local/ports.js";
import { startRedis } from "../local/redis-server.js";
import { startS3 } from "../local/s3-server.js";
import {
  fmt,
  MB,
  percentile,
  procCpuMs,
  procMemory,
  type Row,
  serviceEnv,
  startNodeServer,
  stopChild,
} from "./lib.js";

// Watch fan-out on one API process:
//  - N idle WatchJob streams (one job each): server RSS per stream against a bare
//    connect-node stream that holds nothing, and the Redis connections the API uses;
//  - 1,000 watchers of one job: latency from a progress write (what a worker does) to
//    each watcher's receipt, p50/p99 over all receipts and over each update's last one.
// The API runs in its own process. Idle streams are opened from this one with the
// generated Connect client over HTTP/1.1; the fan-out watchers are raw HTTP/1.1 clients
// in two processes of their own (watch-clients.ts).

async function settle(pid: number): Promise<number> {
  // RSS after the open burst settles: take the median of a few readings.
  const readings: number[] = [];
  for (let i = 0; i < 5; i++) {
    await new Promise((r) => setTimeout(r, 300));
    readings.push(procMemory(pid).rss);
  }
  return percentile(readings, 50);
}

/** Opens `n` WatchJob streams, resolves once each has delivered its first message. */
async function openStreams(
  port: number,
  jobIds: readonly string[],
  signal: AbortSignal,
): Promise<void> {
  const client = createClient(
    DownloadService,
    createConnectTransport({ baseUrl: `http://127.0.0.1:${port}`, httpVersion: "1.1" }),
  );
  const ready: Promise<void>[] = [];
  for (const [i, jobId] of jobIds.entries()) {
    ready.push(
      new Promise<void>((resolve, reject) => {
        const run = async () => {
          let first = true;
          try {
            for await (const _msg of client.watchJob({ jobId }, { signal })) {
              if (first) {
                first = false;
                resolve();
              }
            }
          } catch (err) {
            if (first) reject(err as Error);
          }
        };
        void run();
      }),
    );
    // Open in batches so the listen backlog is not the thing measured.
    if (i % 200 === 199) await Promise.all(ready.slice(-200));
  }
  await Promise.all(ready);
}

/**
 * Job records stored as Initiate stores them, without queueing: thousands of idle watch
 * targets, sent without waiting for each other.
 */
async function seedJobs(store: JobStore, ids: readonly string[]): Promise<void> {
  const now = Date.now();
  // The owner every call has while auth is disabled, as the benchmarks run it.
  await Promise.all(ids.map((id) => createJob(store, id, [1], "anonymous", now)));
}

export async function benchWatch(
  opts: { quick?: boolean } = {},
): Promise<{ rows: Row[]; data: unknown }> {
  const idleStreams = opts.quick ? 1000 : 10_000;
  const fanout = 1000;
  const updates = opts.quick ? 20 : 50;
  const redis = await startRedis();
  const s3 = await startS3({ buckets: ["download-sources", "download-results"] });
  const prefix = "benchwatch";
  const env = { ...serviceEnv(redis.url, s3.endpoint, prefix), WATCH_HEARTBEAT_MS: "15000" };
  const conn = createRedis(redis.url, { role: "api", name: "bench" });
  conn.on("error", () => undefined);
  const store = new JobStore(conn, { prefix, recordTtlSeconds: 3600 });
  const rows: Row[] = [];
  const data: Record<string, unknown> = {};
  const children: ChildProcess[] = [];
  const ac = new AbortController();
  try {
    // Baseline: the bare stream server.
    const bare = await startNodeServer("bench/bare-stream-server.ts", { PORT: "0" });
    children.push(bare.child);
    const bareBefore = await settle(bare.child.pid as number);
    const bareAc = new AbortController();
    await openStreams(
      bare.port,
      Array.from({ length: idleStreams }, () => newJobId()),
      bareAc.signal,
    );
    const bareAfter = await settle(bare.child.pid as number);
    bareAc.abort();
    await bare.stop();

    // The real API.
    const api = await startNodeServer("bench/api-server.ts", { ...env, PORT: "0" });
    children.push(api.child);
    const ids = Array.from({ length: idleStreams }, () => newJobId());
    await seedJobs(store, ids);
    const apiBefore = await settle(api.child.pid as number);
    const t0 = performance.now();
    await openStreams(api.port, ids, ac.signal);
    const openMs = performance.now() - t0;
    const apiAfter = await settle(api.child.pid as number);
    const clients = (await conn.client("LIST")) as string;
    const apiConnections = clients
      .split("\n")
      .filter((l) => l.trim() !== "" && !/name=bench\b/.test(l)).length;

    const perStream = (apiAfter - apiBefore) / idleStreams;
    const barePerStream = (bareAfter - bareBefore) / idleStreams;
    data.idle = {
      streams: idleStreams,
      apiBefore,
      apiAfter,
      bareBefore,
      bareAfter,
      perStream,
      barePerStream,
      apiConnections,
      openMs,
    };
    rows.push(
      {
        scenario: `watch ${idleStreams} idle`,
        metric: "API RSS per stream KB",
        value: fmt(perStream / 1024),
      },
      {
        scenario: `watch ${idleStreams} idle`,
        metric: "bare connect RSS per stream KB",
        value: fmt(barePerStream / 1024),
      },
      {
        scenario: `watch ${idleStreams} idle`,
        metric: "API / bare per stream",
        value: fmt(perStream / barePerStream, 2),
        target: "<= 1.3",
        ok: perStream / barePerStream <= 1.3,
      },
      {
        scenario: `watch ${idleStreams} idle`,
        metric: "API total RSS MB",
        value: fmt(apiAfter / MB),
      },
      {
        scenario: `watch ${idleStreams} idle`,
        metric: "Redis connections (API)",
        value: String(apiConnections),
        target: "<= 4",
        ok: apiConnections <= 4,
      },
    );
    ac.abort();

    // Fan-out: 1,000 watchers of one job, progress writes as a worker would make them.
    // The watchers are light raw clients in two processes of their own (watch-clients.ts)
    // so that parsing a thousand messages is not what is measured; receipt times are
    // wall-clock times with sub-millisecond resolution, comparable across processes.
    const jobId = newJobId();
    await seedJobs(store, [jobId]);
    const perProcess = [Math.ceil(fanout / 2), Math.floor(fanout / 2)];
    const watchers = perProcess.map((n) =>
      spawn(
        process.execPath,
        [
          "--import",
          "tsx",
          "bench/watch-clients.ts",
          `http://127.0.0.1:${api.port}`,
          jobId,
          String(n),
        ],
        {
          stdio: ["pipe", "pipe", "inherit"],
        },
      ),
    );
    children.push(...watchers);
    const outputs = watchers.map((w) => {
      let out = "";
      w.stdout?.on("data", (d: Buffer) => (out += d.toString()));
      return () => out;
    });
    await waitUntil(
      "watchers ready",
      async () => outputs.every((o) => o().includes("ready")),
      60_000,
    );
    const sentAt = new Map<number, number>();
    const now = () => performance.timeOrigin + performance.now();
    // The API's own CPU per update: what the fan-out costs the server, whatever else
    // runs on the machine (wall-clock latency is only as good as the machine is idle).
    const cpuBefore = procCpuMs(api.child.pid as number);
    const run = { jobId, token: "bench", checkLock: false };
    const started = await markProcessing(store, run, {
      progress: {
        filesDone: 0,
        filesTotal: 1,
        bytesDone: 0,
        bytesTotal: updates,
        bytesPerSecond: 1,
      },
      files: [],
      startedAt: Date.now(),
    });
    for (let u = 0; u < updates; u++) {
      const before = now();
      await recordProgress(store, run, {
        progress: {
          filesDone: 0,
          filesTotal: 1,
          bytesDone: u,
          bytesTotal: updates,
          bytesPerSecond: 1,
        },
        files: [],
      });
      // Each write bumps the version by one: the first update is the claim's next.
      sentAt.set(started.version + u + 1, before);
      await new Promise((r) => setTimeout(r, 200));
    }
    await new Promise((r) => setTimeout(r, 1000));
    const cpuPerUpdate = (procCpuMs(api.child.pid as number) - cpuBefore) / updates;
    const receipts = new Map<number, number[]>();
    await Promise.all(
      watchers.map(async (w, i) => {
        const exited = once(w, "exit");
        w.stdin?.end();
        await exited;
        const line = outputs[i]?.().trim().split("\n").at(-1) ?? "{}";
        for (const [v, times] of Object.entries(JSON.parse(line) as Record<string, number[]>)) {
          receipts.set(Number(v), [...(receipts.get(Number(v)) ?? []), ...times]);
        }
      }),
    );
    const all: number[] = [];
    const lastPer: number[] = [];
    let missing = 0;
    for (const [v, t] of sentAt) {
      const got = receipts.get(v) ?? [];
      missing += fanout - got.length;
      const lat = got.map((r) => r - t);
      all.push(...lat);
      if (lat.length > 0) lastPer.push(Math.max(...lat));
    }
    data.fanout = {
      watchers: fanout,
      updates,
      p50: percentile(all, 50),
      p99: percentile(all, 99),
      lastP50: percentile(lastPer, 50),
      lastP99: percentile(lastPer, 99),
      missing,
      cpuPerUpdate,
    };
    rows.push(
      {
        scenario: `fan-out ${fanout} watchers`,
        metric: "update -> receipt p50 ms",
        value: fmt(percentile(all, 50)),
      },
      {
        scenario: `fan-out ${fanout} watchers`,
        metric: "update -> receipt p99 ms",
        value: fmt(percentile(all, 99)),
        target: "<= 50",
        ok: percentile(all, 99) <= 50,
      },
      {
        scenario: `fan-out ${fanout} watchers`,
        metric: "update -> last watcher p99 ms",
        value: fmt(percentile(lastPer, 99)),
      },
      {
        scenario: `fan-out ${fanout} watchers`,
        metric: "messages missed",
        value: String(missing),
        target: "0",
        ok: missing === 0,
      },
      {
        scenario: `fan-out ${fanout} watchers`,
        metric: "API CPU per update ms (1 core)",
        value: fmt(cpuPerUpdate),
      },
    );
    return { rows, data };
  } finally {
    ac.abort();
    for (const c of children) await stopChild(c);
    conn.disconnect();
    await s3.stop();
    await redis.stop();
  }
}
