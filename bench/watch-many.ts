import { type ChildProcess, spawn } from "node:child_process";
import { once } from "node:events";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { availableParallelism, loadavg, tmpdir } from "node:os";
import { join } from "node:path";
import { JobStore } from "../core/job-store.js";
import { createJob, markProcessing, recordProgress } from "../core/job-transitions.js";
import { newJobId } from "../core/jobs.js";
import { createRedis, type RedisClient } from "../core/redis.js";
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

// Watch at scale, the way a proxy in front of the API carries it: WatchJob streams
// multiplexed on HTTP/2 connections (watch-h2-clients.ts, in processes of their own).
//  - watch-50k: 10,000 then 50,000 idle streams, one job each, in one API process: RSS
//    and heap (after a full GC) per stream, and the API's Redis connections.
//  - fanout-jobs: 2,000 running jobs, 3 watchers each, 5 progress writes a second per
//    job through core/job-transitions.ts (the worker's Lua step and its publish):
//    delivery latency from the write to each watcher and the updates never delivered.
// The API's SETTINGS_MAX_CONCURRENT_STREAMS is raised for the run (HTTP2_MAX_CONCURRENT_
// STREAMS) and the streams are spread so no connection goes beyond it: node's client
// would queue the rest silently and the bench would measure the queue.

const STREAMS_PER_CONNECTION = 1000;

interface Clients {
  children: ChildProcess[];
  /** Resolves once every client process has printed "ready", to the refused opens retried. */
  ready(timeoutMs: number): Promise<number>;
  /** Closes the clients' stdin; each one's last JSON line and the index of its first job. */
  finish(): Promise<{ offset: number; out: unknown }[]>;
}

/** Spreads `ids` × `perJob` streams over `processes` client processes. */
function startClients(
  port: number,
  dir: string,
  ids: readonly string[],
  perJob: number,
  processes: number,
  record: boolean,
): Clients {
  const children: ChildProcess[] = [];
  const outputs: (() => string)[] = [];
  const offsets: number[] = [];
  const per = Math.ceil(ids.length / processes);
  for (let p = 0; p < processes; p++) {
    const mine = ids.slice(p * per, (p + 1) * per);
    if (mine.length === 0) continue;
    const file = join(dir, `ids-${p}-${Date.now()}.txt`);
    writeFileSync(file, `${mine.join("\n")}\n`);
    const connections = Math.ceil((mine.length * perJob) / STREAMS_PER_CONNECTION);
    const child = spawn(
      process.execPath,
      [
        "--import",
        "tsx",
        "bench/watch-h2-clients.ts",
        `http://127.0.0.1:${port}`,
        file,
        String(perJob),
        String(connections),
        record ? "1" : "0",
      ],
      { stdio: ["pipe", "pipe", "inherit"] },
    );
    let out = "";
    child.stdout?.on("data", (d: Buffer) => (out += d.toString()));
    outputs.push(() => out);
    offsets.push(p * per);
    children.push(child);
  }
  return {
    children,
    ready: async (timeoutMs) => {
      await waitUntil(
        `${ids.length * perJob} watch streams`,
        async () => outputs.every((o) => o().includes("ready")),
        timeoutMs,
      );
      const failed = outputs.reduce(
        (n, o) => n + Number(/ready \d+ errors (\d+)/.exec(o())?.[1] ?? 0),
        0,
      );
      if (failed > 0) throw new Error(`${failed} watch streams failed before their snapshot`);
      return outputs.reduce(
        (n, o) => n + Number(/ready \d+ errors \d+ retries (\d+)/.exec(o())?.[1] ?? 0),
        0,
      );
    },
    finish: () =>
      Promise.all(
        children.map(async (c, i) => {
          const exited = once(c, "exit");
          c.stdin?.end();
          await exited;
          const line = outputs[i]?.().trim().split("\n").at(-1) ?? "{}";
          return { offset: offsets[i] as number, out: JSON.parse(line) as unknown };
        }),
      ),
  };
}

async function settledRss(pid: number): Promise<number> {
  const readings: number[] = [];
  for (let i = 0; i < 5; i++) {
    await new Promise((r) => setTimeout(r, 300));
    readings.push(procMemory(pid).rss);
  }
  return percentile(readings, 50);
}

/** process.memoryUsage() of a process preloaded with gc-on-signal.ts, after a full GC. */
async function memoryAfterGc(child: ChildProcess, file: string): Promise<NodeJS.MemoryUsage> {
  rmSync(file, { force: true });
  child.kill("SIGUSR2");
  let text = "";
  await waitUntil(
    "memory reading",
    async () => {
      text = readFileSync(file, "utf8");
      return text !== "";
    },
    60_000,
  );
  return JSON.parse(text) as NodeJS.MemoryUsage;
}

async function apiRedisConnections(conn: RedisClient): Promise<number> {
  const list = (await conn.client("LIST")) as string;
  return list.split("\n").filter((l) => l.trim() !== "" && !/name=bench\b/.test(l)).length;
}

async function withServices<T>(
  prefix: string,
  run: (ctx: {
    env: Record<string, string>;
    store: JobStore;
    conn: RedisClient;
    dir: string;
    children: ChildProcess[];
    redisPid: number;
  }) => Promise<T>,
): Promise<T> {
  const redis = await startRedis();
  const s3 = await startS3({ buckets: ["download-sources", "download-results"] });
  const conn = createRedis(redis.url, { role: "api", name: "bench" });
  conn.on("error", () => undefined);
  const store = new JobStore(conn, { prefix, recordTtlSeconds: 3600 });
  const dir = mkdtempSync(join(tmpdir(), "bench-watch-"));
  const children: ChildProcess[] = [];
  const env = {
    ...serviceEnv(redis.url, s3.endpoint, prefix),
    WATCH_HEARTBEAT_MS: "15000",
    HTTP2_MAX_CONCURRENT_STREAMS: String(STREAMS_PER_CONNECTION),
    BENCH_MEMORY_FILE: join(dir, "api-memory.json"),
  };
  try {
    return await run({ env, store, conn, dir, children, redisPid: redis.pid });
  } finally {
    for (const c of children) await stopChild(c);
    conn.disconnect();
    await s3.stop();
    await redis.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}

async function seed(store: JobStore, ids: readonly string[]): Promise<void> {
  const now = Date.now();
  // In slices: 50,000 scripts at once would be one huge ioredis write queue.
  for (let i = 0; i < ids.length; i += 5000) {
    // The owner every call has while auth is disabled, as the benchmarks run it.
    await Promise.all(
      ids.slice(i, i + 5000).map((id) => createJob(store, id, [1], "anonymous", now)),
    );
  }
}

export async function benchWatch50k(
  opts: { quick?: boolean } = {},
): Promise<{ rows: Row[]; data: unknown }> {
  const steps = opts.quick ? [2000, 10_000] : [10_000, 50_000];
  // Figures from a shared machine mean little without how busy it was.
  const loadAtStart = loadavg()[0] as number;
  return withServices("benchwatch50k", async ({ env, store, conn, dir, children }) => {
    const rows: Row[] = [];
    const api = await startNodeServer(
      "bench/api-server.ts",
      { ...env, PORT: "0" },
      { args: ["--expose-gc"], imports: ["./bench/gc-on-signal.ts"] },
    );
    children.push(api.child);
    const pid = api.child.pid as number;
    const memFile = join(dir, "api-memory.json");
    const ids = Array.from({ length: steps.at(-1) as number }, () => newJobId());
    await seed(store, ids);
    const rssBefore = await settledRss(pid);
    const heapBefore = await memoryAfterGc(api.child, memFile);
    const results: Record<string, unknown>[] = [];
    let opened = 0;
    for (const target of steps) {
      // Each step adds its streams in new client processes (about 12,500 streams each);
      // earlier streams stay open.
      const slice = ids.slice(opened, target);
      const t0 = performance.now();
      const clients = startClients(
        api.port,
        dir,
        slice,
        1,
        Math.max(1, Math.ceil(slice.length / 12_500)),
        false,
      );
      children.push(...clients.children);
      const retried = await clients.ready(300_000);
      const openMs = performance.now() - t0;
      opened = target;
      const rss = await settledRss(pid);
      const mem = await memoryAfterGc(api.child, memFile);
      const redisConnections = await apiRedisConnections(conn);
      const r = {
        streams: target,
        openMs,
        rssKbPerStream: (rss - rssBefore) / target / 1024,
        heapKbPerStream: (mem.heapUsed - heapBefore.heapUsed) / target / 1024,
        externalKbPerStream: (mem.external - heapBefore.external) / target / 1024,
        rssMb: rss / MB,
        redisConnections,
        connections: Math.ceil(target / STREAMS_PER_CONNECTION),
        retried,
      };
      results.push(r);
      const name = `watch ${target} idle (h2, ${STREAMS_PER_CONNECTION}/conn)`;
      rows.push(
        {
          scenario: name,
          metric: "load average (1 min) now",
          value: fmt(loadavg()[0] as number),
        },
        {
          scenario: name,
          metric: "API RSS per stream KB",
          value: fmt(r.rssKbPerStream),
          target: "<= 25",
          ok: r.rssKbPerStream <= 25,
        },
        {
          scenario: name,
          metric: "API heap after GC per stream KB",
          value: fmt(r.heapKbPerStream),
        },
        { scenario: name, metric: "API total RSS MB", value: fmt(r.rssMb) },
        {
          scenario: name,
          metric: "Redis connections (API)",
          value: String(redisConnections),
          target: "<= 4",
          ok: redisConnections <= 4,
        },
        { scenario: name, metric: "open time s", value: fmt(openMs / 1000) },
        {
          scenario: name,
          metric: "opens refused (UNAVAILABLE) and retried",
          value: String(retried),
        },
      );
    }
    return {
      rows,
      data: {
        loadAverage: loadAtStart,
        loadAtEnd: loadavg()[0] as number,
        rssBefore,
        heapBefore,
        streamsPerConnection: STREAMS_PER_CONNECTION,
        results,
      },
    };
  });
}

/**
 * For each update written, each watcher's delivery: the first message carrying that
 * version or a later one (the hub coalesces progress within one state when a stream is
 * behind, which is delivery of the newer state, not a loss).
 */
function deliveries(
  sent: readonly Float64Array[],
  firstVersion: readonly number[],
  counts: readonly number[],
  streams: readonly number[][],
  second: (at: number) => number,
): {
  latencies: number[];
  bySecond: number[][];
  missed: number;
  exact: number;
  expected: number;
} {
  const latencies: number[] = [];
  const bySecond: number[][] = [];
  let missed = 0;
  let exact = 0;
  let expected = 0;
  for (const s of streams) {
    const job = s[0] as number;
    const times = sent[job] as Float64Array;
    const base = firstVersion[job] as number;
    const n = counts[job] as number;
    expected += n;
    let k = 1;
    for (let u = 0; u < n; u++) {
      const v = base + u + 1;
      while (k < s.length && (s[k] as number) < v) k += 2;
      if (k >= s.length) {
        missed += n - u;
        break;
      }
      if (s[k] === v) exact++;
      const latency = (s[k + 1] as number) - (times[u] as number);
      latencies.push(latency);
      (bySecond[second(times[u] as number)] ??= []).push(latency);
    }
  }
  return { latencies, bySecond, missed, exact, expected };
}

/** The first seconds of writes warm the JIT of every process; shown apart as well. */
const WARMUP_SECONDS = 2;

/** The API's event-loop delay p99 and max (ms) since the previous scrape of /metrics. */
async function eventLoopDelay(port: number): Promise<{ p99: number; max: number }> {
  const text = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
  const read = (name: string) =>
    Number(new RegExp(`^${name} ([0-9.e+-]+)`, "m").exec(text)?.[1] ?? Number.NaN) * 1000;
  return {
    p99: read("nodejs_eventloop_lag_p99_seconds"),
    max: read("nodejs_eventloop_lag_max_seconds"),
  };
}

export async function benchFanoutJobs(
  opts: { quick?: boolean } = {},
): Promise<{ rows: Row[]; data: unknown }> {
  const jobs = opts.quick ? 500 : 2000;
  const perJob = 3;
  const ratePerJob = 5;
  const seconds = opts.quick ? 8 : 20;
  const loadAtStart = loadavg()[0] as number;
  return withServices("benchfanout", async ({ env, store, dir, children, redisPid }) => {
    const api = await startNodeServer("bench/api-server.ts", { ...env, PORT: "0" });
    children.push(api.child);
    const pid = api.child.pid as number;
    const ids = Array.from({ length: jobs }, () => newJobId());
    await seed(store, ids);
    const progress = (done: number) => ({
      progress: {
        filesDone: 0,
        filesTotal: 1,
        bytesDone: done,
        bytesTotal: 1_000_000,
        bytesPerSecond: 1,
      },
      files: [],
    });
    const runs = ids.map((jobId) => ({ jobId, token: "bench", checkLock: false }));
    const started = await Promise.all(
      runs.map((run) => markProcessing(store, run, { ...progress(0), startedAt: Date.now() })),
    );
    const firstVersion = started.map((r) => r.version);
    const clients = startClients(api.port, dir, ids, perJob, 2, true);
    children.push(...clients.children);
    const retried = await clients.ready(300_000);

    // Every 10 ms one twentieth of the jobs get their next write, so each job is written
    // every 200 ms and the writes are spread evenly; a tick that falls behind (a busy
    // machine) still sends its share, late, and the achieved rate is reported.
    const tickMs = 10;
    const ticksPerRound = 1000 / ratePerJob / tickMs;
    const rounds = seconds * ratePerJob;
    const sent = ids.map(() => new Float64Array(rounds));
    // When each write's Lua step answered: how much of a delivery's time is the write.
    const writeMs: number[] = [];
    // Each second's p99 separately: a burst (a GC, another engineer's job) shows as one
    // bad second rather than as a raised curve.

    const counts = ids.map(() => 0);
    const now = () => performance.timeOrigin + performance.now();
    let failed = 0;
    let lateTicks = 0;
    const inflight = new Set<Promise<void>>();
    // prom-client's event-loop delay figures cover the time since the last scrape.
    await eventLoopDelay(api.port);
    const cpu0 = procCpuMs(pid);
    // Every process of the scenario shares the host's cores: their CPU says how much of
    // the host the scenario needs (the writer is this process).
    const clientPids = clients.children.map((c) => c.pid as number);
    const othersCpu = () => {
      const own = process.cpuUsage();
      return {
        redis: procCpuMs(redisPid),
        writer: (own.user + own.system) / 1000,
        clients: clientPids.reduce((n, p) => n + procCpuMs(p), 0),
      };
    };
    const others0 = othersCpu();
    const t0 = performance.now();
    const second = (at: number) => Math.floor((at - (performance.timeOrigin + t0)) / 1000);
    for (let tick = 0; tick < rounds * ticksPerRound; tick++) {
      const due = t0 + tick * tickMs;
      const wait = due - performance.now();
      if (wait > 0) await new Promise((r) => setTimeout(r, wait));
      else if (wait < -tickMs) lateTicks++;
      const slot = tick % ticksPerRound;
      for (let j = slot; j < jobs; j += ticksPerRound) {
        const u = counts[j] as number;
        counts[j] = u + 1;
        const at = now();
        (sent[j] as Float64Array)[u] = at;
        const p = recordProgress(store, runs[j] as (typeof runs)[number], progress(u + 1)).then(
          () => {
            writeMs.push(now() - at);
          },
          () => {
            failed++;
          },
        );
        inflight.add(p);
        void p.finally(() => inflight.delete(p));
      }
    }
    await Promise.all(inflight);
    const writeSeconds = (performance.now() - t0) / 1000;
    // Let the last writes reach every watcher.
    await new Promise((r) => setTimeout(r, 3000));
    const cpuMs = procCpuMs(pid) - cpu0;
    const others1 = othersCpu();
    // CPU ms over the writes and the settling after them, as % of one core.
    const percentOfCore = (ms: number) => (ms / 10 / (writeSeconds + 3)) | 0;
    const apiLoop = await eventLoopDelay(api.port);
    const outputs = (await clients.finish()) as {
      offset: number;
      out: { errors: number; streams: number[][]; loopMaxMs: number };
    }[];
    // Job indexes in a client's output count from its own first job.
    const streams = outputs.flatMap(({ offset, out }) =>
      out.streams.map((s) => [(s[0] as number) + offset, ...s.slice(1)]),
    );
    const streamErrors = outputs.reduce((n, o) => n + o.out.errors, 0);
    const d = deliveries(sent, firstVersion, counts, streams, second);
    const totalWrites = counts.reduce((a, b) => a + b, 0);
    const p50 = percentile(d.latencies, 50);
    const p99 = percentile(d.latencies, 99);
    const name = `fan-out ${jobs} jobs x ${perJob} watchers, ${ratePerJob}/s each`;
    const data = {
      loadAverage: loadAtStart,
      loadAtEnd: loadavg()[0] as number,
      jobs,
      watchersPerJob: perJob,
      ratePerJob,
      seconds,
      writes: totalWrites,
      writesPerSecond: totalWrites / writeSeconds,
      failedWrites: failed,
      lateTicks,
      streams: streams.length,
      opensRetried: retried,
      streamErrors,
      deliveriesExpected: d.expected,
      deliveredExact: d.exact,
      missed: d.missed,
      p50,
      p90: percentile(d.latencies, 90),
      p99,
      max: percentile(d.latencies, 100),
      p99AfterWarmup: percentile(d.bySecond.slice(WARMUP_SECONDS).flat(), 99),
      apiEventLoopP99Ms: apiLoop.p99,
      apiEventLoopMaxMs: apiLoop.max,
      clientEventLoopMaxMs: Math.max(...outputs.map((o) => o.out.loopMaxMs)),
      p99BySecond: d.bySecond.map((l) => Math.round(percentile(l ?? [], 99))),
      writeP50: percentile(writeMs, 50),
      writeP99: percentile(writeMs, 99),
      apiCpuPercent: percentOfCore(cpuMs),
      cpuPercent: {
        redis: percentOfCore(others1.redis - others0.redis),
        writer: percentOfCore(others1.writer - others0.writer),
        clients: percentOfCore(others1.clients - others0.clients),
      },
    };
    const hostPercent =
      data.apiCpuPercent + data.cpuPercent.redis + data.cpuPercent.writer + data.cpuPercent.clients;
    const rows: Row[] = [
      {
        scenario: name,
        metric: "load average (1 min) at start / end",
        value: `${fmt(data.loadAverage)} / ${fmt(data.loadAtEnd)}`,
      },
      {
        scenario: name,
        metric: "writes per second (achieved)",
        value: fmt(data.writesPerSecond, 0),
        target: String(jobs * ratePerJob),
      },
      { scenario: name, metric: "delivery p50 ms", value: fmt(p50) },
      {
        scenario: name,
        metric: "delivery p99 ms",
        value: fmt(p99),
        target: "<= 100",
        ok: p99 <= 100,
      },
      {
        scenario: name,
        metric: `delivery p99 ms after the first ${WARMUP_SECONDS} s`,
        value: fmt(data.p99AfterWarmup),
        target: "<= 100",
        ok: data.p99AfterWarmup <= 100,
      },
      {
        scenario: name,
        metric: "updates missed",
        value: String(d.missed + failed + streamErrors),
        target: "0",
        ok: d.missed + failed + streamErrors === 0,
      },
      {
        scenario: name,
        metric: "delivered as sent (not coalesced) %",
        value: fmt((100 * d.exact) / Math.max(1, d.expected)),
      },
      { scenario: name, metric: "write (Lua step) p99 ms", value: fmt(data.writeP99) },
      {
        scenario: name,
        metric: "seconds with p99 <= 100 ms",
        value: `${data.p99BySecond.filter((p) => p <= 100).length}/${data.p99BySecond.length}`,
      },
      { scenario: name, metric: "API CPU % of one core", value: String(data.apiCpuPercent) },
      {
        scenario: name,
        metric: `CPU % of one core: API + Redis + writer + clients = all (of ${availableParallelism() * 100})`,
        value: `${data.apiCpuPercent} + ${data.cpuPercent.redis} + ${data.cpuPercent.writer} + ${data.cpuPercent.clients} = ${hostPercent}`,
      },
      {
        scenario: name,
        metric: "API CPU µs per delivered message",
        value: fmt((cpuMs * 1000) / Math.max(1, d.expected)),
      },
      {
        scenario: name,
        metric: "event-loop delay max ms: API / clients",
        value: `${fmt(apiLoop.max)} / ${fmt(data.clientEventLoopMaxMs)}`,
      },
    ];
    return { rows, data };
  });
}
