import { Agent, request } from "node:http";
import { Queue, QueueEvents } from "bullmq";
import { createRedis } from "../core/redis.js";
import { startRedis } from "../local/redis-server.js";
import { fmt, procCpuMs, type Row, serviceEnv, startNodeServer } from "./lib.js";

// Job overhead: what a job costs beyond its work. Both sides run closed loops of 50 jobs
// in flight, each loop starting its next job once the last one is seen finished:
//  - ours: Initiate (Connect JSON POST) -> WatchJob (Connect streaming JSON) until
//    COMPLETED, against the API process and a worker process that makes the real
//    processor's record writes with no work and no S3 (noop-worker.ts). The client is
//    plain node:http with a minimal envelope reader, as light as BullMQ's own client
//    calls on the other side: a generated Connect client costs this process ~3 ms of
//    CPU per job, more than the API, on the same two cores;
//  - raw BullMQ: Queue.add -> QueueEvents "completed", against a worker process with a
//    no-op processor.
// Included on our side: the API (validation, admission, record, queue), the record
// writes and their pub/sub, the watch stream; excluded on both: S3 and the bundling.

const LANES = 50;

export async function benchJobs(opts: { quick?: boolean } = {}): Promise<{ rows: Row[]; data: unknown }> {
  const count = opts.quick ? 1000 : 5000;
  const redis = await startRedis();
  const prefix = "benchjobs";
  const env = serviceEnv(redis.url, "http://127.0.0.1:9", prefix);
  const servers: { stop(): Promise<void> }[] = [];
  const conn = createRedis(redis.url, { role: "worker", name: "bench" });
  conn.on("error", () => undefined);
  try {
    // Raw BullMQ first.
    const rawWorker = await startNodeServer("bench/noop-worker.ts", { REDIS_URL: redis.url, QUEUE_PREFIX: prefix, BENCH_RAW: "1" });
    servers.push(rawWorker);
    const queue = new Queue("raw", { connection: conn, prefix, defaultJobOptions: { removeOnComplete: { count: 1000 } } });
    const eventsConn = createRedis(redis.url, { role: "worker", name: "bench-events" });
    eventsConn.on("error", () => undefined);
    const events = new QueueEvents("raw", { connection: eventsConn, prefix });
    events.setMaxListeners(LANES * 2);
    await events.waitUntilReady();
    const rawMs = await closedLoop(count, async () => {
      const job = await queue.add("noop", {});
      await job.waitUntilFinished(events);
    });
    await events.close();
    await queue.close();
    eventsConn.disconnect();
    await rawWorker.stop();

    // Ours.
    const [api, worker] = await Promise.all([
      startNodeServer("bench/api-server.ts", { ...env, PORT: "0" }),
      startNodeServer("bench/noop-worker.ts", { REDIS_URL: redis.url, QUEUE_PREFIX: prefix }),
    ]);
    servers.push(api, worker);
    const client = lightClient(`http://127.0.0.1:${api.port}`);
    let fileId = 1;
    const pids = { api: api.child.pid as number, worker: worker.child.pid as number, redis: redis.pid, client: process.pid };
    const cpuBefore = Object.fromEntries(Object.entries(pids).map(([k, pid]) => [k, procCpuMs(pid)]));
    const oursMs = await closedLoop(count, async () => {
      const jobId = await client.initiate([fileId++]);
      await client.watchUntil(jobId, "JOB_STATE_COMPLETED");
    });
    client.close();

    // Where a job's CPU goes, per process (ms per job): what bounds the loop.
    const cpuPerJob = Object.fromEntries(Object.entries(pids).map(([k, pid]) => [k, (procCpuMs(pid) - (cpuBefore[k] ?? 0)) / count]));
    const raw = count / (rawMs / 1000);
    const ours = count / (oursMs / 1000);
    const scenario = `jobs ${count} no-op, ${LANES} in flight`;
    const rows: Row[] = [
      { scenario, metric: "raw BullMQ add -> completed jobs/s", value: fmt(raw, 0) },
      { scenario, metric: "ours Initiate -> watcher sees COMPLETED jobs/s", value: fmt(ours, 0) },
      { scenario, metric: "ours / raw BullMQ", value: fmt(ours / raw, 2), target: ">= 0.5", ok: ours / raw >= 0.5 },
      {
        scenario,
        metric: "ours CPU ms per job: API / worker / Redis / client",
        value: [cpuPerJob.api, cpuPerJob.worker, cpuPerJob.redis, cpuPerJob.client].map((v) => fmt(v ?? Number.NaN, 2)).join(" / "),
      },
    ];
    return { rows, data: { count, lanes: LANES, rawMs, oursMs, rawJobsPerSecond: raw, oursJobsPerSecond: ours, cpuPerJob } };
  } finally {
    for (const s of servers) await s.stop();
    conn.disconnect();
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

/** Initiate and WatchJob the way curl and a hand-written client call them. */
function lightClient(base: string) {
  const agent = new Agent({ keepAlive: true, maxSockets: LANES * 2 });
  const service = `${base}/downloads.v1.DownloadService`;
  return {
    initiate(fileIds: number[]): Promise<string> {
      return new Promise((resolve, reject) => {
        const req = request(`${service}/Initiate`, { method: "POST", agent, headers: { "content-type": "application/json" } }, (res) => {
          let body = "";
          res.setEncoding("utf8");
          res.on("data", (d: string) => (body += d));
          res.on("end", () => {
            if (res.statusCode !== 200) reject(new Error(`Initiate: HTTP ${res.statusCode} ${body}`));
            else resolve((JSON.parse(body) as { job: { jobId: string } }).job.jobId);
          });
        });
        req.on("error", reject);
        req.end(JSON.stringify({ fileIds }));
      });
    },
    /**
     * Resolves once a job message in `state` has arrived and the stream has ended, as
     * the server ends it right after a terminal state. Reading to the end, as Connect
     * clients do, keeps the connection for the next call; hanging up instead would cost
     * both sides a new connection per job.
     */
    watchUntil(jobId: string, state: string): Promise<void> {
      const payload = Buffer.from(JSON.stringify({ jobId }));
      const head = Buffer.alloc(5);
      head.writeUInt32BE(payload.length, 1);
      return new Promise((resolve, reject) => {
        let seen = false;
        const req = request(`${service}/WatchJob`, { method: "POST", agent, headers: { "content-type": "application/connect+json" } }, (res) => {
          let buf: Buffer = Buffer.alloc(0);
          res.on("data", (chunk: Buffer) => {
            buf = buf.length === 0 ? chunk : Buffer.concat([buf, chunk]);
            while (buf.length >= 5) {
              const length = buf.readUInt32BE(1);
              if (buf.length < 5 + length) break;
              const flags = buf[0];
              const text = buf.subarray(5, 5 + length).toString("utf8");
              buf = buf.subarray(5 + length);
              if (flags === 0 && text.includes(`"state":"${state}"`)) seen = true;
              if (flags === 2 && (!seen || text !== "{}")) reject(new Error(`WatchJob ended before ${state}: ${text}`));
            }
          });
          res.on("end", () => (seen ? resolve() : reject(new Error(`WatchJob ended before ${state}`))));
          res.on("error", reject);
        });
        req.on("error", reject);
        req.end(Buffer.concat([head, payload]));
      });
    },
    close(): void {
      agent.destroy();
    },
  };
}
