import { Queue, QueueEvents } from "bullmq";
import { Redis } from "ioredis";
import { startRedis } from "../local/redis-server.js";
import { Http1Pool } from "./http1-client.js";
import { fmt, percentile, procCpuMs, type Row, serviceEnv, startNodeServer } from "./lib.js";

// Job overhead: what a job costs beyond its work. Both sides run closed loops of 50 jobs
// in flight, each loop starting its next job once the last one is seen finished:
//  - ours: Initiate (Connect JSON POST) -> WatchJob (Connect streaming JSON) until
//    COMPLETED, against the API process and a worker process that makes the real
//    processor's record writes with no work and no S3 (noop-worker.ts). The client is
//    a minimal HTTP/1.1 client with an envelope reader, as light as BullMQ's own client
//    calls on the other side: a generated Connect client costs this process ~3 ms of
//    CPU per job, and node:http's ~0.4 ms, against the API's ~0.9, on the same cores;
//  - raw BullMQ: Queue.add -> QueueEvents "completed", against a worker process with a
//    no-op processor.
// Included on our side: the API (validation, admission, record, queue), the record
// writes and their pub/sub, the watch stream; excluded on both: S3 and the bundling.
// Every process of both sides is up for the whole run (idle while the other side's
// slice runs), and the sides alternate in slices of equal job counts.

const LANES = 50;

export async function benchJobs(
  opts: { quick?: boolean } = {},
): Promise<{ rows: Row[]; data: unknown }> {
  // Both sides run in alternating slices, round after round, and report medians: on a
  // shared machine the load drifts, and interleaving spreads the drift evenly over both.
  // A slice is 2,000 jobs (about a second): slices of 1,000 (0.4 s for the baseline)
  // swung by half from one round to the next.
  const rounds = opts.quick ? 2 : 7;
  const perSlice = opts.quick ? 500 : 2000;
  const redis = await startRedis();
  const prefix = "benchjobs";
  const env = serviceEnv(redis.url, "http://127.0.0.1:9", prefix);
  const servers: { stop(): Promise<void> }[] = [];
  // The baseline's client: BullMQ on plain ioredis connections.
  const conn = new Redis(redis.url, { maxRetriesPerRequest: null });
  conn.on("error", () => undefined);
  const eventsConn = new Redis(redis.url, { maxRetriesPerRequest: null });
  eventsConn.on("error", () => undefined);
  let events: QueueEvents | undefined;
  let queue: Queue | undefined;
  let client: Awaited<ReturnType<typeof lightClient>> | undefined;
  try {
    const [rawWorker, api, worker] = await Promise.all([
      startNodeServer("bench/noop-worker.ts", {
        REDIS_URL: redis.url,
        QUEUE_PREFIX: prefix,
        BENCH_RAW: "1",
      }),
      startNodeServer("bench/api-server.ts", { ...env, PORT: "0" }),
      startNodeServer("bench/noop-worker.ts", { REDIS_URL: redis.url, QUEUE_PREFIX: prefix }),
    ]);
    servers.push(rawWorker, api, worker);
    queue = new Queue("raw", {
      connection: conn,
      prefix,
      defaultJobOptions: { removeOnComplete: { count: 1000 } },
    });
    // waitUntilFinished listens on the queue too, once per job in flight.
    queue.setMaxListeners(LANES * 2);
    events = new QueueEvents("raw", { connection: eventsConn, prefix });
    events.setMaxListeners(LANES * 2);
    await events.waitUntilReady();
    const rawQueue = queue;
    const rawEvents = events;
    const rawJob = async () => {
      const job = await rawQueue.add("noop", {});
      await job.waitUntilFinished(rawEvents);
    };
    const ourClient = await lightClient(api.port);
    client = ourClient;
    let fileId = 1;
    const ourJob = async () => {
      const jobId = await ourClient.initiate([fileId++]);
      await ourClient.watchUntil(jobId, "JOB_STATE_COMPLETED");
    };

    // What each side's processes spend per job (ms of CPU), summed over its slices.
    const pids = {
      raw: { worker: rawWorker.child.pid as number, redis: redis.pid, client: process.pid },
      ours: {
        api: api.child.pid as number,
        worker: worker.child.pid as number,
        redis: redis.pid,
        client: process.pid,
      },
    };
    const cpu = { raw: {} as Record<string, number>, ours: {} as Record<string, number> };
    const slice = async (side: "raw" | "ours", count: number): Promise<number> => {
      const before = Object.entries(pids[side]).map(([k, pid]) => [k, procCpuMs(pid)] as const);
      const ms = await closedLoop(count, side === "raw" ? rawJob : ourJob);
      for (const [k, at] of before)
        cpu[side][k] =
          (cpu[side][k] ?? 0) +
          procCpuMs(pids[side][k as keyof (typeof pids)[typeof side]] as number) -
          at;
      return count / (ms / 1000);
    };

    // Warm both sides' JIT before anything counts.
    await slice("raw", 1000);
    await slice("ours", 1000);
    cpu.raw = {};
    cpu.ours = {};
    const rates = { raw: [] as number[], ours: [] as number[] };
    for (let round = 0; round < rounds; round++) {
      rates.raw.push(await slice("raw", perSlice));
      rates.ours.push(await slice("ours", perSlice));
    }
    const jobs = rounds * perSlice;
    const perJob = (side: "raw" | "ours") =>
      Object.fromEntries(Object.entries(cpu[side]).map(([k, v]) => [k, v / jobs]));
    const cpuPerJob = { raw: perJob("raw"), ours: perJob("ours") };
    const raw = percentile(rates.raw, 50);
    const ours = percentile(rates.ours, 50);
    const ratios = rates.ours.map((r, i) => r / (rates.raw[i] ?? Number.NaN));
    const scenario = `jobs ${rounds}x${perSlice} no-op, ${LANES} in flight`;
    const ms = (v: number | undefined) => fmt(v ?? Number.NaN, 2);
    const sum = (o: Record<string, number>) => Object.values(o).reduce((a, b) => a + b, 0);
    const rows: Row[] = [
      { scenario, metric: "raw BullMQ add -> completed jobs/s (median)", value: fmt(raw, 0) },
      {
        scenario,
        metric: "ours Initiate -> watcher sees COMPLETED jobs/s (median)",
        value: fmt(ours, 0),
      },
      {
        scenario,
        metric: "ours / raw BullMQ (medians)",
        value: fmt(ours / raw, 2),
        target: ">= 0.5",
        ok: ours / raw >= 0.5,
      },
      {
        scenario,
        metric: "ours / raw per round (min .. max)",
        value: `${fmt(Math.min(...ratios), 2)} .. ${fmt(Math.max(...ratios), 2)}`,
      },
      {
        scenario,
        metric: "ours CPU ms per job: API / worker / Redis / client (sum)",
        value: `${[cpuPerJob.ours.api, cpuPerJob.ours.worker, cpuPerJob.ours.redis, cpuPerJob.ours.client].map(ms).join(" / ")} (${ms(sum(cpuPerJob.ours))})`,
      },
      {
        scenario,
        metric: "raw CPU ms per job: worker / Redis / client (sum)",
        value: `${[cpuPerJob.raw.worker, cpuPerJob.raw.redis, cpuPerJob.raw.client].map(ms).join(" / ")} (${ms(sum(cpuPerJob.raw))})`,
      },
    ];
    return {
      rows,
      data: {
        rounds,
        perSlice,
        lanes: LANES,
        rates,
        ratios,
        rawJobsPerSecond: raw,
        oursJobsPerSecond: ours,
        cpuPerJob,
      },
    };
  } finally {
    client?.close();
    await events?.close().catch(() => undefined);
    await queue?.close().catch(() => undefined);
    for (const s of servers) await s.stop();
    conn.disconnect();
    eventsConn.disconnect();
    await redis.stop();
  }
}

/** Runs `job` `count` times with LANES of them in flight; returns the elapsed ms. */
async function closedLoop(count: number, job: () => Promise<void>): Promise<number> {
  let started = 0;
  const t0 = performance.now();
  await Promise.all(
    Array.from({ length: LANES }, async () => {
      while (started < count) {
        started++;
        await job();
      }
    }),
  );
  return performance.now() - t0;
}

/**
 * Initiate and WatchJob the way curl and a hand-written client call them: Connect JSON
 * over keep-alive HTTP/1.1 connections (bench/http1-client.ts), each stream read to
 * its end, as the server ends it right after the terminal state. Reading to the end,
 * as Connect clients do, keeps the connection for the next call.
 */
async function lightClient(port: number) {
  const pool = await Http1Pool.open(port, LANES);
  const service = "/downloads.v1.DownloadService";
  return {
    async initiate(fileIds: number[]): Promise<string> {
      const res = await pool.post(
        `${service}/Initiate`,
        "application/json",
        Buffer.from(JSON.stringify({ fileIds })),
      );
      if (res.status !== 200)
        throw new Error(`Initiate: HTTP ${res.status} ${res.body.toString()}`);
      return (JSON.parse(res.body.toString()) as { job: { jobId: string } }).job.jobId;
    },
    /** Resolves once a job message in `state` has arrived and the stream has ended cleanly. */
    async watchUntil(jobId: string, state: string): Promise<void> {
      const payload = Buffer.from(JSON.stringify({ jobId }));
      const head = Buffer.alloc(5);
      head.writeUInt32BE(payload.length, 1);
      let buf: Buffer = Buffer.alloc(0);
      let seen = false;
      let end: string | undefined;
      const res = await pool.post(
        `${service}/WatchJob`,
        "application/connect+json",
        Buffer.concat([head, payload]),
        (chunk) => {
          buf = buf.length === 0 ? chunk : Buffer.concat([buf, chunk]);
          while (buf.length >= 5) {
            const length = buf.readUInt32BE(1);
            if (buf.length < 5 + length) break;
            const flags = buf[0];
            const text = buf.subarray(5, 5 + length).toString("utf8");
            buf = buf.subarray(5 + length);
            if (flags === 0 && text.includes(`"state":"${state}"`)) seen = true;
            if (flags === 2) end = text;
          }
        },
      );
      if (res.status !== 200 || !seen || end !== "{}") {
        throw new Error(
          `WatchJob ended before ${state}: HTTP ${res.status}, end of stream ${end ?? "missing"}`,
        );
      }
    },
    close(): void {
      pool.close();
    },
  };
}
