import { type ChildProcess, spawn } from "node:child_process";
import { once } from "node:events";
import { createClient } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { DownloadService } from "../gen/downloads/v1/download_service_pb.js";
import { loadConfig } from "../core/config.js";
import { JobStore } from "../core/job-store.js";
import { newJobId } from "../core/jobs.js";
import { createRedis } from "../core/redis.js";
import { freePort, canConnect, waitUntil } from "../local/ports.js";
import { startRedis } from "../local/redis-server.js";
import { LOCAL_S3_CREDENTIALS, startS3 } from "../local/s3-server.js";
import { MB, fmt, percentile, procMemory, type Row } from "./lib.js";

// Watch fan-out on one API process:
//  - N idle WatchJob streams (one job each): server RSS per stream against a bare
//    connect-node stream that holds nothing, and the Redis connections the API uses;
//  - 1,000 watchers of one job: latency from a progress write (what a worker does) to
//    each watcher's receipt, p50/p99 over all receipts and over each update's last one.
// The server runs in its own process; streams are opened from this one over HTTP/1.1.

function spawnServer(script: string, env: Record<string, string>): ChildProcess {
  return spawn(process.execPath, ["--import", "tsx", script], {
    env: { ...process.env, ...env },
    stdio: ["ignore", "pipe", "inherit"],
  });
}

async function stopChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = once(child, "exit");
  child.kill("SIGTERM");
  const timer = setTimeout(() => child.kill("SIGKILL"), 10_000);
  await exited;
  clearTimeout(timer);
}

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
async function openStreams(port: number, jobIds: readonly string[], signal: AbortSignal): Promise<void> {
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

export async function benchWatch(opts: { quick?: boolean } = {}): Promise<{ rows: Row[]; data: unknown }> {
  const idleStreams = opts.quick ? 1000 : 10_000;
  const fanout = 1000;
  const updates = opts.quick ? 20 : 50;
  const redis = await startRedis();
  const s3 = await startS3({ buckets: ["download-sources", "download-results"] });
  const env: Record<string, string> = {
    REDIS_URL: redis.url,
    S3_ENDPOINT: s3.endpoint,
    S3_ACCESS_KEY_ID: LOCAL_S3_CREDENTIALS.accessKeyId,
    S3_SECRET_ACCESS_KEY: LOCAL_S3_CREDENTIALS.secretAccessKey,
    LOG_LEVEL: "warn",
    // Measures streams, not auth: every caller is the anonymous owner.
    AUTH_DISABLED: "true",
    QUEUE_PREFIX: "benchwatch",
    WATCH_HEARTBEAT_MS: "15000",
  };
  const cfg = loadConfig(env);
  const conn = createRedis(redis.url, { role: "api", name: "bench" });
  const store = new JobStore(conn, { prefix: cfg.QUEUE_PREFIX, recordTtlSeconds: 3600 });
  const rows: Row[] = [];
  const data: Record<string, unknown> = {};
  const children: ChildProcess[] = [];
  const ac = new AbortController();
  try {
    // Baseline: the bare stream server.
    const barePort = await freePort();
    const bare = spawnServer("bench/bare-stream-server.ts", { PORT: String(barePort) });
    children.push(bare);
    await waitUntil("bare server", () => canConnect(barePort));
    const bareBefore = await settle(bare.pid as number);
    const bareAc = new AbortController();
    await openStreams(barePort, Array.from({ length: idleStreams }, () => newJobId()), bareAc.signal);
    const bareAfter = await settle(bare.pid as number);
    bareAc.abort();
    await stopChild(bare);

    // The real API.
    const apiPort = await freePort();
    const api = spawnServer("server/main.ts", { ...env, PORT: String(apiPort), HOST: "127.0.0.1" });
    children.push(api);
    await waitUntil("API server", () => canConnect(apiPort), 30_000);
    const ids = Array.from({ length: idleStreams }, () => newJobId());
    const pipe = conn.pipeline();
    for (const id of ids) pipe.hset(store.key(id), { id, state: "QUEUED", version: "1", attempts: "0", fileIds: "[1]", createdAt: String(Date.now()), updatedAt: String(Date.now()), progress: JSON.stringify({ filesDone: 0, filesTotal: 1, bytesDone: 0, bytesTotal: 0, bytesPerSecond: 0 }), files: "[]" });
    await pipe.exec();
    const apiBefore = await settle(api.pid as number);
    const t0 = performance.now();
    await openStreams(apiPort, ids, ac.signal);
    const openMs = performance.now() - t0;
    const apiAfter = await settle(api.pid as number);
    const clients = (await conn.client("LIST")) as string;
    const apiConnections = clients.split("\n").filter((l) => l.trim() !== "" && !/name=bench\b/.test(l)).length;

    const perStream = (apiAfter - apiBefore) / idleStreams;
    const barePerStream = (bareAfter - bareBefore) / idleStreams;
    data.idle = { streams: idleStreams, apiBefore, apiAfter, bareBefore, bareAfter, perStream, barePerStream, apiConnections, openMs };
    rows.push(
      { scenario: `watch ${idleStreams} idle`, metric: "API RSS per stream KB", value: fmt(perStream / 1024) },
      { scenario: `watch ${idleStreams} idle`, metric: "bare connect RSS per stream KB", value: fmt(barePerStream / 1024) },
      { scenario: `watch ${idleStreams} idle`, metric: "API / bare per stream", value: fmt(perStream / barePerStream, 2), target: "<= 1.3", ok: perStream / barePerStream <= 1.3 },
      { scenario: `watch ${idleStreams} idle`, metric: "API total RSS MB", value: fmt(apiAfter / MB) },
      { scenario: `watch ${idleStreams} idle`, metric: "Redis connections (API)", value: String(apiConnections), target: "<= 4", ok: apiConnections <= 4 },
    );
    ac.abort();

    // Fan-out: 1,000 watchers of one job, progress writes as a worker would make them.
    const jobId = newJobId();
    await store.create(jobId, [1], "anonymous");
    const client = createClient(DownloadService, createConnectTransport({ baseUrl: `http://127.0.0.1:${apiPort}`, httpVersion: "1.1" }));
    const sentAt = new Map<number, number>();
    const receipts = new Map<number, number[]>();
    const fan = new AbortController();
    const ready: Promise<void>[] = [];
    for (let i = 0; i < fanout; i++) {
      ready.push(
        new Promise<void>((resolve) => {
          void (async () => {
            try {
              for await (const msg of client.watchJob({ jobId }, { signal: fan.signal })) {
                if (msg.event.case !== "job") continue;
                const v = msg.event.value.version;
                if (v === 1) {
                  resolve();
                  continue;
                }
                const at = performance.now();
                const list = receipts.get(v) ?? [];
                list.push(at);
                receipts.set(v, list);
              }
            } catch {
              resolve();
            }
          })();
        }),
      );
    }
    await Promise.all(ready);
    for (let u = 0; u < updates; u++) {
      const before = performance.now();
      const rec = await store.update(jobId, { progress: { filesDone: 0, filesTotal: 1, bytesDone: u, bytesTotal: updates, bytesPerSecond: 1 } }, { from: ["QUEUED"] });
      sentAt.set(rec.version, before);
      await new Promise((r) => setTimeout(r, 200));
    }
    await waitUntil("all receipts", async () => [...sentAt.keys()].every((v) => (receipts.get(v)?.length ?? 0) >= fanout), 20_000).catch(() => undefined);
    fan.abort();
    const all: number[] = [];
    const lastPer: number[] = [];
    let missing = 0;
    for (const [v, t] of sentAt) {
      const got = receipts.get(v) ?? [];
      missing += fanout - got.length;
      const lat = got.map((r) => r - t);
      all.push(...lat);
      lastPer.push(Math.max(...lat));
    }
    data.fanout = { watchers: fanout, updates, p50: percentile(all, 50), p99: percentile(all, 99), lastP50: percentile(lastPer, 50), lastP99: percentile(lastPer, 99), missing };
    rows.push(
      { scenario: `fan-out ${fanout} watchers`, metric: "update -> receipt p50 ms", value: fmt(percentile(all, 50)) },
      { scenario: `fan-out ${fanout} watchers`, metric: "update -> receipt p99 ms", value: fmt(percentile(all, 99)), target: "<= 50", ok: percentile(all, 99) <= 50 },
      { scenario: `fan-out ${fanout} watchers`, metric: "update -> last watcher p99 ms", value: fmt(percentile(lastPer, 99)) },
      { scenario: `fan-out ${fanout} watchers`, metric: "messages missed", value: String(missing), target: "0", ok: missing === 0 },
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
