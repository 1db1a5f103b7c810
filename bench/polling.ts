import { loadavg } from "node:os";
import { create, toBinary } from "@bufbuild/protobuf";
import { createClient } from "@connectrpc/connect";
import {
  createConnectTransport,
  createGrpcTransport,
  Http2SessionManager,
} from "@connectrpc/connect-node";
import { Worker } from "bullmq";
import { JobStore } from "../core/job-store.js";
import { markCancelled, markProcessing, recordProgress } from "../core/job-transitions.js";
import { QUEUE_NAME } from "../core/queue.js";
import { createRedis } from "../core/redis.js";
import {
  DownloadService,
  GetStatusRequestSchema,
  JobState,
} from "../gen/downloads/v1/download_service_pb.js";
import { startRedis } from "../local/redis-server.js";
import { startS3 } from "../local/s3-server.js";
import { ensureH2load, h2load, type LoadResult } from "./h2load.js";
import { fmt, percentile, procCpuMs, type Row, serviceEnv, startNodeServer } from "./lib.js";

// Polling: GetStatus on a running job, at 50 and 200 connections, the way each kind of
// client polls (Connect JSON POST, Connect GET, a conditional Connect GET answered 304,
// gRPC over h2c), against
//  - bare: node:http + one HGETALL + the hash as JSON (the limit of this stack),
//  - hono: a Hono REST endpoint reading BullMQ getJob + getState (the seeds' design),
//  - connect-node: the same API with the lean paths off (for reference).
// Each server runs alone in its own process; one load generator, h2load (C, in a
// process of its own, see h2load.ts), drives them all: HTTP/1.1 with one request in
// flight per connection, gRPC over h2c with 25 calls in flight per connection (as gRPC
// clients multiplex). Requests/s and p50/p99 in ms. Then long-polling: requests per job
// change of watchers that wait on the server, against 1 s polls.

interface Measured {
  server: string;
  client: string;
  connections: number;
  rps: number;
  p50: number;
  p99: number;
  errors: number;
  /** The server process's CPU time per answered request, µs (less swayed by the machine's load than req/s). */
  cpuUs: number;
  /** Redis's CPU time per answered request, µs: the alternatives differ in what they ask of it. */
  redisUs: number;
  /** Share of the answers that were 304 Not Modified. */
  notModified: number;
}

/** Four servers compiling TypeScript at once on a loaded machine can take a while. */
const STARTUP = { timeoutMs: 180_000 };

type Init = { headers?: Record<string, string>; body?: Uint8Array };

export async function benchPolling(
  opts: { quick?: boolean } = {},
): Promise<{ rows: Row[]; data: unknown }> {
  // Every configuration runs in short slices, round after round, and reports its median:
  // on a shared machine the load drifts, and interleaving spreads the drift evenly.
  const rounds = opts.quick ? 2 : 7;
  const slice = 2;
  const levels = [50, 200];
  ensureH2load((line) => process.stderr.write(`${line}\n`));
  const redis = await startRedis();
  const s3 = await startS3({ buckets: ["download-sources", "download-results"] });
  const prefix = "benchpoll";
  const env = serviceEnv(redis.url, s3.endpoint, prefix);
  const conn = createRedis(redis.url, { role: "api", name: "bench" });
  const workerConn = createRedis(redis.url, { role: "worker", name: "bench-worker" });
  for (const c of [conn, workerConn]) c.on("error", () => undefined);
  const store = new JobStore(conn, { prefix, recordTtlSeconds: 3600 });
  let release: () => void = () => undefined;
  const held = new Promise<void>((r) => (release = r));
  let worker: Worker | undefined;
  const servers: { stop(): Promise<void> }[] = [];

  try {
    const [api, plain, bare, hono] = await Promise.all([
      startNodeServer("bench/api-server.ts", { ...env, PORT: "0" }, STARTUP),
      startNodeServer("bench/api-server.ts", { ...env, PORT: "0", BENCH_FAST_PATHS: "0" }, STARTUP),
      startNodeServer(
        "bench/bare-status-server.ts",
        {
          REDIS_URL: redis.url,
          KEY_PREFIX: prefix,
          PORT: "0",
        },
        STARTUP,
      ),
      startNodeServer(
        "bench/hono-status-server.ts",
        {
          REDIS_URL: redis.url,
          QUEUE_PREFIX: prefix,
          QUEUE_NAME,
          PORT: "0",
        },
        STARTUP,
      ),
    ]);
    servers.push(api, plain, bare, hono);

    // The job: initiated through the API, taken by a BullMQ worker that holds it (active
    // for BullMQ), and PROCESSING with progress in our record.
    const base = `http://127.0.0.1:${api.port}`;
    const client = createClient(
      DownloadService,
      createConnectTransport({ baseUrl: base, httpVersion: "1.1" }),
    );
    const jobId =
      (await client.initiate({ fileIds: Array.from({ length: 10 }, (_, i) => 70000 + i) })).job
        ?.jobId ?? "";
    worker = new Worker(QUEUE_NAME, () => held, { connection: workerConn, prefix });
    const run = { jobId, token: "bench", checkLock: false };
    const rec = await store.get(jobId);
    await markProcessing(store, run, {
      progress: rec.progress,
      files: rec.files,
      startedAt: Date.now(),
    });
    await recordProgress(store, run, {
      progress: {
        ...rec.progress,
        bytesDone: 123_456_789,
        bytesTotal: 300_000_000,
        bytesPerSecond: 8_000_000,
        etaSeconds: 22,
      },
      files: rec.files,
    });

    const post: Init = {
      headers: { "content-type": "application/json" },
      body: Buffer.from(JSON.stringify({ jobId })),
    };
    const path = "/downloads.v1.DownloadService/GetStatus";
    const query = `?connect=v1&encoding=json&message=${encodeURIComponent(JSON.stringify({ jobId }))}`;
    const grpcMessage = toBinary(GetStatusRequestSchema, create(GetStatusRequestSchema, { jobId }));
    const grpcFrame = Buffer.alloc(5 + grpcMessage.length);
    grpcFrame.writeUInt32BE(grpcMessage.length, 1);
    grpcFrame.set(grpcMessage, 5);
    const grpc: Init = {
      headers: { "content-type": "application/grpc", te: "trailers" },
      body: grpcFrame,
    };
    const at = (port: number) => `http://127.0.0.1:${port}`;
    // h2load checks the HTTP status only, and a gRPC error is a 200 with grpc-status in
    // the trailers: make sure the call succeeds before timing it.
    const session = new Http2SessionManager(base);
    try {
      const grpcClient = createClient(
        DownloadService,
        createGrpcTransport({ baseUrl: base, sessionManager: session }),
      );
      const { job } = await grpcClient.getStatus({ jobId });
      if (job?.state !== JobState.PROCESSING)
        throw new Error("gRPC GetStatus does not see the running job");
    } finally {
      session.abort();
    }

    // A conditional poll names the ETag of the answer it has (read just before each
    // slice: a running job's estimate may have moved since): unchanged, it gets 304.
    const currentEtag = async () => {
      const etag = (await fetch(`${base}${path}${query}`)).headers.get("etag");
      if (etag === null) throw new Error("GetStatus over GET answered without an ETag");
      return etag;
    };

    type Run = (connections: number, seconds: number) => Promise<LoadResult>;
    const configs: { server: string; client: string; pid: number; run: Run }[] = [
      {
        server: "api (fast path)",
        client: "Connect JSON POST",
        pid: pidOf(api),
        run: (c, s) => http(`${at(api.port)}${path}`, c, s, post),
      },
      {
        server: "api (fast path)",
        client: "Connect GET",
        pid: pidOf(api),
        run: (c, s) => http(`${at(api.port)}${path}${query}`, c, s),
      },
      {
        server: "api (fast path)",
        client: "Connect GET If-None-Match (304)",
        pid: pidOf(api),
        run: async (c, s) =>
          http(`${at(api.port)}${path}${query}`, c, s, {
            headers: { "if-none-match": await currentEtag() },
          }),
      },
      {
        server: "api (fast path)",
        client: "gRPC h2c",
        pid: pidOf(api),
        run: (c, s) => h2c(`${at(api.port)}${path}`, c, s, grpc),
      },
      {
        server: "api (connect-node)",
        client: "Connect JSON POST",
        pid: pidOf(plain),
        run: (c, s) => http(`${at(plain.port)}${path}`, c, s, post),
      },
      {
        server: "api (connect-node)",
        client: "gRPC h2c",
        pid: pidOf(plain),
        run: (c, s) => h2c(`${at(plain.port)}${path}`, c, s, grpc),
      },
      {
        server: "bare node:http + HGETALL",
        client: "GET",
        pid: pidOf(bare),
        run: (c, s) => http(`${at(bare.port)}/jobs/${jobId}`, c, s),
      },
      {
        server: "hono + BullMQ getJob",
        client: "GET",
        pid: pidOf(hono),
        run: (c, s) => http(`${at(hono.port)}/jobs/${jobId}`, c, s),
      },
    ];

    // BENCH_POLLING_ONLY=<a>,<b>: only the configurations whose "server client" contains
    // one of these (for profiling one path; the ratios need their baselines kept in).
    const only = (process.env.BENCH_POLLING_ONLY ?? "").split(",").filter((s) => s !== "");
    if (only.length > 0) {
      const keep = configs.filter((c) => only.some((s) => `${c.server} ${c.client}`.includes(s)));
      configs.splice(0, configs.length, ...keep);
    }
    // Warm every server's JIT before anything counts.
    for (const cfg of configs) await cfg.run(50, 1);
    const samples = new Map<string, Measured[]>();
    for (let round = 0; round < rounds; round++) {
      for (const c of levels) {
        for (const cfg of configs) {
          const [cpuBefore, redisBefore] = [procCpuMs(cfg.pid), procCpuMs(redis.pid)];
          const { rps, p50, p99, errors, requests, notModified } = await cfg.run(c, slice);
          const perRequest = (ms: number) => (ms * 1000) / Math.max(1, requests);
          const cpuUs = perRequest(procCpuMs(cfg.pid) - cpuBefore);
          const redisUs = perRequest(procCpuMs(redis.pid) - redisBefore);
          const m = {
            server: cfg.server,
            client: cfg.client,
            connections: c,
            rps,
            p50,
            p99,
            errors,
            cpuUs,
            redisUs,
            notModified: notModified / Math.max(1, requests),
          };
          const key = `${cfg.server}|${cfg.client}|${c}`;
          samples.set(key, [...(samples.get(key) ?? []), m]);
        }
      }
    }
    const results: Measured[] = [...samples.values()].map((list) => ({
      ...(list[0] as Measured),
      rps: percentile(
        list.map((m) => m.rps),
        50,
      ),
      p50: percentile(
        list.map((m) => m.p50),
        50,
      ),
      p99: percentile(
        list.map((m) => m.p99),
        50,
      ),
      cpuUs: percentile(
        list.map((m) => m.cpuUs),
        50,
      ),
      redisUs: percentile(
        list.map((m) => m.redisUs),
        50,
      ),
      notModified: percentile(
        list.map((m) => m.notModified),
        50,
      ),
      errors: list.reduce((n, m) => n + m.errors, 0),
    }));

    const rows: Row[] = [];
    for (const c of levels) {
      const here = results.filter((r) => r.connections === c);
      const honoM = here.find((r) => r.server.startsWith("hono"));
      const bareM = here.find((r) => r.server.startsWith("bare"));
      const scenario = `polling ${c} conns`;
      for (const r of here) {
        rows.push({
          scenario,
          metric: `${r.server}, ${r.client}: req/s (p50 / p99 ms) CPU µs/req server + redis`,
          value: `${fmt(r.rps, 0)} (${fmt(r.p50)} / ${fmt(r.p99)}) ${fmt(r.cpuUs, 0)} + ${fmt(r.redisUs, 0)}${r.errors > 0 ? ` ${r.errors} errors` : ""}`,
        });
        if (r.notModified > 0 && bareM !== undefined) {
          // The 304 row: a poll of an unchanged job against the stack's bare limit.
          rows.push({
            scenario,
            metric: `  ${r.client} / bare (${fmt(r.notModified * 100, 0)} % answered 304)`,
            value: fmt(r.rps / bareM.rps, 2),
            target: ">= 1.0",
            ok: r.rps / bareM.rps >= 1.0,
          });
          continue;
        }
        if (r.server === "api (fast path)" && honoM !== undefined && bareM !== undefined) {
          rows.push(
            {
              scenario,
              metric: `  ${r.client} / hono`,
              value: fmt(r.rps / honoM.rps, 2),
              target: ">= 1.0",
              ok: r.rps / honoM.rps >= 1.0,
            },
            {
              scenario,
              metric: `  ${r.client} / bare`,
              value: fmt(r.rps / bareM.rps, 2),
              target: ">= 0.5",
              ok: r.rps / bareM.rps >= 0.5,
            },
            {
              scenario,
              metric: `  ${r.client} p99 vs hono p99 ms`,
              value: `${fmt(r.p99)} vs ${fmt(honoM.p99)}`,
              target: "<= hono",
              ok: r.p99 <= honoM.p99,
            },
          );
        }
      }
    }
    const longPoll = await measureLongPoll(base, store, opts.quick === true);
    for (const m of longPoll) {
      const scenario = `long-poll, ${m.pollers} watchers, a change every ${m.intervalMs / 1000} s`;
      rows.push(
        {
          scenario,
          metric: `${m.kind}: GetStatus requests per job change (median watcher)`,
          value: fmt(m.requestsPerChange, 2),
          ...(m.kind.startsWith("long-poll")
            ? { target: "<= 1.1", ok: m.requestsPerChange <= 1.1 }
            : {}),
        },
        {
          scenario,
          metric: `${m.kind}: change seen after, p50 / p99 ms; versions missed`,
          value: `${fmt(m.p50)} / ${fmt(m.p99)}; ${m.missed}`,
        },
      );
    }
    rows.push({
      scenario: "polling",
      metric: "load average (1 min) at the end",
      value: fmt(loadavg()[0] ?? 0, 1),
    });
    return {
      rows,
      data: {
        longPoll,
        loadAverage: loadavg(),
        rounds,
        sliceSeconds: slice,
        medians: results,
        samples: [...samples.values()].flat(),
      },
    };
  } finally {
    release();
    await worker?.close(true).catch(() => undefined);
    for (const s of servers) await s.stop();
    conn.disconnect();
    workerConn.disconnect();
    await s3.stop();
    await redis.stop();
  }
}

interface LongPollMeasured {
  kind: string;
  pollers: number;
  intervalMs: number;
  changes: number;
  requestsPerChange: number;
  p50: number;
  p99: number;
  /** Versions some watcher never saw (a plain poller skips those made between two polls). */
  missed: number;
}

/**
 * Watchers of one running job, each asking GetStatus (Connect GET, JSON) in a loop while
 * the job changes every `intervalMs`, then ends: long-polls (after_version, wait 20 s)
 * against 1 s polls. Counted: requests per change per watcher, and how long after each
 * change a watcher saw it.
 */
async function measureLongPoll(
  base: string,
  store: JobStore,
  quick: boolean,
): Promise<LongPollMeasured[]> {
  const pollers = quick ? 50 : 200;
  const intervalMs = 2_000;
  const changes = quick ? 4 : 10;
  const out: LongPollMeasured[] = [];
  const client = createClient(
    DownloadService,
    createConnectTransport({ baseUrl: base, httpVersion: "1.1" }),
  );
  for (const kind of ["long-poll (wait 20 s)", "plain poll every 1 s"]) {
    const jobId = (await client.initiate({ fileIds: [71000, 71001] })).job?.jobId ?? "";
    const run = { jobId, token: "bench-longpoll", checkLock: false };
    const rec = await store.get(jobId);
    const started = await markProcessing(store, run, {
      progress: rec.progress,
      files: rec.files,
      startedAt: Date.now(),
    });
    /** When each version was written. */
    const writtenAt = new Map<number, number>();
    const url = (msg: object) =>
      `${base}/downloads.v1.DownloadService/GetStatus?connect=v1&encoding=json&message=${encodeURIComponent(JSON.stringify(msg))}`;
    const longPoll = kind.startsWith("long-poll");
    const watchers = Array.from({ length: pollers }, async () => {
      let last = started.version;
      let requests = 0;
      const delays: number[] = [];
      const seen = new Set<number>();
      for (;;) {
        requests++;
        const res = await fetch(
          url(longPoll ? { jobId, afterVersion: last, wait: "20s" } : { jobId }),
        );
        const { job } = (await res.json()) as { job: { version: number; state: string } };
        if (job.version > last) {
          delays.push(Date.now() - (writtenAt.get(job.version) ?? Date.now()));
          seen.add(job.version);
          last = job.version;
        }
        if (job.state === "JOB_STATE_CANCELLED") return { requests, delays, seen };
        if (!longPoll) await new Promise((r) => setTimeout(r, 1_000));
      }
    });
    // Every watcher has its first answer (or is waiting) before the first change.
    await new Promise((r) => setTimeout(r, 1_000));
    for (let i = 1; i <= changes; i++) {
      await new Promise((r) => setTimeout(r, intervalMs));
      const now = Date.now();
      if (i < changes) {
        await recordProgress(store, run, {
          progress: { ...rec.progress, bytesDone: i * 1000, bytesTotal: changes * 1000 },
          files: rec.files,
        });
        writtenAt.set(started.version + i, now);
      } else {
        const ended = await markCancelled(store, jobId);
        writtenAt.set(ended.version, now);
      }
    }
    const results = await Promise.all(watchers);
    const perChange = results.map((r) => r.requests / changes);
    const delays = results.flatMap((r) => r.delays);
    out.push({
      kind,
      pollers,
      intervalMs,
      changes,
      requestsPerChange: percentile(perChange, 50),
      p50: percentile(delays, 50),
      p99: percentile(delays, 99),
      missed: results.reduce((n, r) => n + (changes - r.seen.size), 0),
    });
  }
  return out;
}

/** HTTP/1.1: one connection per request in flight. */
function http(
  url: string,
  connections: number,
  seconds: number,
  init: Init = {},
): Promise<LoadResult> {
  return h2load({ url, connections, seconds, h1: true, ...init });
}

/** h2c: `inFlight` calls over one connection per 25 of them. */
function h2c(url: string, inFlight: number, seconds: number, init: Init): Promise<LoadResult> {
  const connections = Math.max(1, Math.ceil(inFlight / 25));
  return h2load({ url, connections, streams: Math.ceil(inFlight / connections), seconds, ...init });
}

function pidOf(server: { child: { pid?: number | undefined } }): number {
  if (server.child.pid === undefined) throw new Error("server process has no pid");
  return server.child.pid;
}
