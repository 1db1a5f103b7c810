import { create, toBinary } from "@bufbuild/protobuf";
import { createClient } from "@connectrpc/connect";
import {
  createConnectTransport,
  createGrpcTransport,
  Http2SessionManager,
} from "@connectrpc/connect-node";
import { Worker } from "bullmq";
import { JobStore } from "../core/job-store.js";
import { markProcessing, recordProgress } from "../core/job-transitions.js";
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
// client polls (Connect JSON POST, Connect GET, gRPC over h2c), against
//  - bare: node:http + one HGETALL + the hash as JSON (the limit of this stack),
//  - hono: a Hono REST endpoint reading BullMQ getJob + getState (the seeds' design),
//  - connect-node: the same API with the lean paths off (for reference).
// Each server runs alone in its own process; one load generator, h2load (C, in a
// process of its own, see h2load.ts), drives them all: HTTP/1.1 with one request in
// flight per connection, gRPC over h2c with 25 calls in flight per connection (as gRPC
// clients multiplex). Requests/s and p50/p99 in ms.

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
}

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
      startNodeServer("bench/api-server.ts", { ...env, PORT: "0" }),
      startNodeServer("bench/api-server.ts", { ...env, PORT: "0", BENCH_FAST_PATHS: "0" }),
      startNodeServer("bench/bare-status-server.ts", {
        REDIS_URL: redis.url,
        KEY_PREFIX: prefix,
        PORT: "0",
      }),
      startNodeServer("bench/hono-status-server.ts", {
        REDIS_URL: redis.url,
        QUEUE_PREFIX: prefix,
        QUEUE_NAME,
        PORT: "0",
      }),
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

    // Warm every server's JIT before anything counts.
    for (const cfg of configs) await cfg.run(50, 1);
    const samples = new Map<string, Measured[]>();
    for (let round = 0; round < rounds; round++) {
      for (const c of levels) {
        for (const cfg of configs) {
          const [cpuBefore, redisBefore] = [procCpuMs(cfg.pid), procCpuMs(redis.pid)];
          const { rps, p50, p99, errors, requests } = await cfg.run(c, slice);
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
    return {
      rows,
      data: {
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
