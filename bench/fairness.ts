import http from "node:http";
import type { AddressInfo, Socket } from "node:net";
import { loadavg } from "node:os";
import { pino } from "pino";
import { loadConfig } from "../core/config.js";
import { JobService } from "../core/job-service.js";
import { JobStore } from "../core/job-store.js";
import { createBundleQueue, QUEUE_NAME, type SchedulerOptions } from "../core/queue.js";
import { createRedis, type RedisClient } from "../core/redis.js";
import { checkWebhookUrl } from "../core/webhook-target.js";
import { startRedis } from "../local/redis-server.js";
import { startWorker } from "../worker/worker.js";
import { fmt, percentile, procCpuMs, type Row, serviceEnv, startNodeServer } from "./lib.js";

// Fair scheduling across owners (core/queue.ts) against plain FIFO (BullMQ's wait list,
// the layout before priorities), side by side in one run:
//  - start delay: owner A has 200 jobs queued and the workers busy with them; owner B
//    queues one job. Counted in job starts of A between B's arrival and B's start (from
//    BullMQ's event stream, so exact), per worker slot; and in ms. Jobs take JOB_MS each
//    in a worker process (bench/noop-worker.ts: the real record writes, a sleep between).
//    Target: at most one job slot per worker of waiting.
//  - throughput: Initiate (in this process: validation, admission, record, queue) of
//    2,000 no-op jobs from two owners (9 of 10 from one), 50 calls in flight, against a
//    worker process at concurrency 50, until the queue is empty; jobs/s. The modes
//    alternate in slices, round after round; medians. Target: fair costs <= 10 %. On a
//    loaded machine wall-clock rates swing by half between slices, so the CPU that every
//    process of a side spent per job (this process with the API's work, the worker, Redis)
//    is reported too: it moves much less with the load.
//  - webhooks: owner A has 60 jobs whose receivers never answer; owner B's one webhook
//    is then due. How long B's delivery takes with the per-owner cap on deliveries in
//    flight (WEBHOOK_MAX_IN_FLIGHT_PER_OWNER=4) and without it (0), the worker in this
//    process, WEBHOOK_TIMEOUT_MS=10000 (the default). Jobs are cancelled (or fail) to end them.

type Mode = "fair" | "fifo";
const MODES: Record<Mode, SchedulerOptions> = {
  fair: { fair: true },
  fifo: { fair: false, plain: true },
};

const BACKLOG = 200;
const SLOTS = 4;
const JOB_MS = 40;
const LANES = 50;

interface Stack {
  redis: RedisClient;
  jobs: JobService;
  queue: ReturnType<typeof createBundleQueue>;
  close(): Promise<void>;
}

function stack(url: string, prefix: string, scheduling: SchedulerOptions): Stack {
  const redis = createRedis(url, { role: "api", name: "bench-fairness" });
  const store = new JobStore(redis, { prefix, recordTtlSeconds: 3600 });
  const queue = createBundleQueue(redis, { prefix, attempts: 1, backoffMs: 0 });
  const jobs = new JobService({
    store,
    queue,
    redis,
    maxFilesPerJob: 10,
    policy: { dedupInFlight: false, reuseResults: false },
    scheduling,
  });
  return {
    redis,
    jobs,
    queue,
    async close() {
      await queue.close();
      redis.disconnect();
    },
  };
}

async function waitFor(check: () => Promise<boolean>, timeoutMs = 120_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > end) throw new Error("fairness bench: timed out waiting");
    await new Promise((ok) => setTimeout(ok, 5));
  }
}

/** One start-delay measurement: A's backlog running, then B's single job. */
async function startDelay(
  url: string,
  mode: Mode,
  round: number,
): Promise<{ aStartsBetween: number; slotsPerWorker: number; delayMs: number }> {
  const prefix = `fairdelay${mode}${round}`;
  const worker = await startNodeServer("bench/noop-worker.ts", {
    REDIS_URL: url,
    QUEUE_PREFIX: prefix,
    CONCURRENCY: String(SLOTS),
    JOB_MS: String(JOB_MS),
  });
  const s = stack(url, prefix, MODES[mode]);
  try {
    for (let i = 0; i < BACKLOG; i++) await s.jobs.initiate("owner-a", { fileIds: [i + 1] });
    // The workers are busy with A's backlog: a few rounds of slots have gone by.
    await waitFor(async () => (await s.queue.getCompletedCount()) >= 2 * SLOTS);
    const t0 = Date.now();
    const b = (await s.jobs.initiate("owner-b", { fileIds: [1] })).job;
    await waitFor(async () => (await s.jobs.store.get(b.id)).startedAt !== undefined);
    const startedAt = (await s.jobs.store.get(b.id)).startedAt ?? t0;
    const events = await s.redis.xrange(`${prefix}:${QUEUE_NAME}:events`, "-", "+");
    const seq = events.map(([, f]) => ({ event: f[1], jobId: f[3] }));
    const added = seq.findIndex((e) => e.event === "added" && e.jobId === b.id);
    const started = seq.findIndex((e) => e.event === "active" && e.jobId === b.id);
    const aStartsBetween = seq
      .slice(added, started)
      .filter((e) => e.event === "active" && e.jobId !== b.id).length;
    return { aStartsBetween, slotsPerWorker: aStartsBetween / SLOTS, delayMs: startedAt - t0 };
  } finally {
    await worker.stop();
    await s.close();
  }
}

const HUNG = 60;
const WEBHOOK_TIMEOUT_MS = 10_000;

/** One webhook measurement: B's delivery behind A's 60 hung receivers. */
async function webhookDelay(url: string, cap: number, round: number): Promise<number> {
  const sockets = new Set<Socket>();
  let closing = false;
  let hanging = 0;
  let okAt = 0;
  const receiver = http.createServer((req, res) => {
    req.resume();
    if (closing) {
      req.socket.destroy();
    } else if (req.url?.startsWith("/hang/")) {
      hanging += 1;
    } else {
      req.on("end", () => {
        okAt = performance.now();
        res.writeHead(200).end();
      });
    }
  });
  receiver.on("connection", (c: Socket) => {
    sockets.add(c);
    c.once("close", () => sockets.delete(c));
  });
  await new Promise<void>((ok) => receiver.listen(0, "127.0.0.1", ok));
  const base = `http://127.0.0.1:${(receiver.address() as AddressInfo).port}`;
  const prefix = `fairhook${cap}x${round}`;
  const cfg = loadConfig({
    ...serviceEnv(url, "http://127.0.0.1:9", prefix),
    WEBHOOK_SECRET: "bench-webhook-secret-0123456789",
    WEBHOOK_ALLOWED_HOSTS: "127.0.0.1/32",
    WEBHOOK_TIMEOUT_MS: String(WEBHOOK_TIMEOUT_MS),
    WEBHOOK_MAX_IN_FLIGHT_PER_OWNER: String(cap),
  });
  const worker = await startWorker(cfg, pino({ level: "silent" }));
  const s = stack(url, prefix, MODES.fair);
  const jobs = new JobService({
    store: s.jobs.store,
    queue: s.queue,
    redis: s.redis,
    maxFilesPerJob: 10,
    policy: { dedupInFlight: false, reuseResults: false },
    checkCallbackUrl: async (u) =>
      (await checkWebhookUrl(u, { allowPrivate: false, allowedHosts: ["127.0.0.1/32"] })).url.href,
  });
  try {
    for (let i = 0; i < HUNG; i++) {
      const { job } = await jobs.initiate("owner-a", {
        fileIds: [i + 1],
        callbackUrl: `${base}/hang/${i}`,
      });
      // Ended either way (the worker may fail it first, S3 being absent): its webhook is due.
      await jobs.cancel("owner-a", job.id).catch(() => undefined);
    }
    // A's deliveries are in flight and hang.
    await waitFor(async () => hanging >= (cap > 0 ? cap : 16));
    const t0 = performance.now();
    const { job } = await jobs.initiate("owner-b", { fileIds: [1], callbackUrl: `${base}/ok` });
    await jobs.cancel("owner-b", job.id).catch(() => undefined);
    await waitFor(async () => okAt > 0);
    return okAt - t0;
  } finally {
    closing = true;
    for (const c of sockets) c.destroy();
    await worker.close();
    await s.close();
    await new Promise<void>((ok) => receiver.close(() => ok()));
  }
}

export async function benchFairness(
  opts: { quick?: boolean } = {},
): Promise<{ rows: Row[]; data: unknown }> {
  const rounds = opts.quick ? 3 : 15;
  const delayRounds = opts.quick ? 1 : 3;
  const perSlice = opts.quick ? 500 : 1000;
  const redis = await startRedis();
  const loadAtStart = loadavg()[0] as number;
  const scenario = "fairness";
  try {
    // ---- start delay behind another owner's backlog
    const delays: Record<
      Mode,
      { aStartsBetween: number; slotsPerWorker: number; delayMs: number }[]
    > = { fair: [], fifo: [] };
    for (let r = 0; r < delayRounds; r++) {
      for (const mode of ["fair", "fifo"] as const) {
        delays[mode].push(await startDelay(redis.url, mode, r));
      }
    }

    // ---- webhooks: B's delivery behind A's hung receivers, with and without the cap
    const hooks: Record<"capped" | "uncapped", number[]> = { capped: [], uncapped: [] };
    for (let r = 0; r < delayRounds; r++) {
      hooks.capped.push(await webhookDelay(redis.url, 4, r));
      hooks.uncapped.push(await webhookDelay(redis.url, 0, r));
    }

    // ---- throughput, fair against FIFO
    const workers = await Promise.all(
      (["fair", "fifo"] as const).map((mode) =>
        startNodeServer("bench/noop-worker.ts", {
          REDIS_URL: redis.url,
          QUEUE_PREFIX: `fairtp${mode}`,
          CONCURRENCY: String(LANES),
        }),
      ),
    );
    const stacks = {
      fair: stack(redis.url, "fairtpfair", MODES.fair),
      fifo: stack(redis.url, "fairtpfifo", MODES.fifo),
    };
    const rates: Record<Mode, number[]> = { fair: [], fifo: [] };
    const cpu: Record<Mode, { ms: number; jobs: number }> = {
      fair: { ms: 0, jobs: 0 },
      fifo: { ms: 0, jobs: 0 },
    };
    const workerPid = { fair: workers[0]?.child.pid ?? 0, fifo: workers[1]?.child.pid ?? 0 };
    const cpuNow = (mode: Mode) => {
      const own = process.cpuUsage();
      return (own.user + own.system) / 1000 + procCpuMs(workerPid[mode]) + procCpuMs(redis.pid);
    };
    try {
      let fileId = 1;
      const slice = async (mode: Mode, count: number, measure = true): Promise<number> => {
        const s = stacks[mode];
        const cpuBefore = cpuNow(mode);
        let next = 0;
        const t0 = performance.now();
        const lane = async () => {
          while (next < count) {
            const i = next++;
            await s.jobs.initiate(i % 10 === 9 ? "owner-b" : "owner-a", { fileIds: [fileId++] });
          }
        };
        await Promise.all(Array.from({ length: LANES }, lane));
        await waitFor(async () => {
          const c = await s.queue.getJobCounts("wait", "prioritized", "active", "delayed");
          return Object.values(c).every((n) => n === 0);
        });
        const rate = count / ((performance.now() - t0) / 1000);
        if (measure) {
          cpu[mode].ms += cpuNow(mode) - cpuBefore;
          cpu[mode].jobs += count;
        }
        return rate;
      };
      // Warm both sides up, then alternate.
      await slice("fair", 300, false);
      await slice("fifo", 300, false);
      for (let r = 0; r < rounds; r++) {
        const order: Mode[] = r % 2 === 0 ? ["fair", "fifo"] : ["fifo", "fair"];
        for (const mode of order) rates[mode].push(await slice(mode, perSlice));
      }
    } finally {
      await Promise.all(workers.map((w) => w.stop()));
      await Promise.all(Object.values(stacks).map((s) => s.close()));
    }

    const median = (v: number[]) => percentile(v, 50);
    const fairRate = median(rates.fair);
    const fifoRate = median(rates.fifo);
    const cost = 1 - fairRate / fifoRate;
    const perRound = rates.fair.map((f, i) => 1 - f / (rates.fifo[i] ?? f));
    const roundCost = median(perRound);
    const cpuPerJob = (m: Mode) => cpu[m].ms / Math.max(1, cpu[m].jobs);
    const cpuCost = cpuPerJob("fair") / cpuPerJob("fifo") - 1;
    const worstSlots = Math.max(...delays.fair.map((d) => d.slotsPerWorker));
    const loadAtEnd = loadavg()[0] as number;
    const rows: Row[] = [
      {
        scenario,
        metric: `B's start delay behind ${BACKLOG} of A, fair: A starts in between (max over ${delayRounds})`,
        value: `${Math.max(...delays.fair.map((d) => d.aStartsBetween))} = ${fmt(worstSlots, 2)} slots per worker`,
        target: "<= 1 slot per worker",
        ok: worstSlots <= 1,
      },
      {
        scenario,
        metric: "B's start delay, fair: ms (median) / job length",
        value: `${fmt(median(delays.fair.map((d) => d.delayMs)), 0)} ms / ${JOB_MS} ms`,
      },
      {
        scenario,
        metric: "B's start delay, FIFO: A starts in between (median), ms (median)",
        value: `${median(delays.fifo.map((d) => d.aStartsBetween))}, ${fmt(median(delays.fifo.map((d) => d.delayMs)), 0)} ms`,
      },
      {
        scenario,
        metric: `Initiate -> done, no-op jobs/s fair / FIFO (medians of ${rounds})`,
        value: `${fmt(fairRate, 0)} / ${fmt(fifoRate, 0)}`,
      },
      {
        scenario,
        metric: "throughput cost of fair scheduling: of the medians; median of rounds (min .. max)",
        value: `${fmt(cost * 100, 1)} %; ${fmt(roundCost * 100, 1)} % (${fmt(Math.min(...perRound) * 100, 1)} .. ${fmt(Math.max(...perRound) * 100, 1)} %)`,
        target: "<= 10 %",
        ok: cost <= 0.1,
      },
      {
        scenario,
        metric: "CPU ms per job, all processes (this + worker + Redis): fair / FIFO",
        value: `${fmt(cpuPerJob("fair"), 2)} / ${fmt(cpuPerJob("fifo"), 2)} (${cpuCost >= 0 ? "+" : ""}${fmt(cpuCost * 100, 1)} %)`,
        target: "<= +10 %",
        ok: cpuCost <= 0.1,
      },
      {
        scenario,
        metric: `B's webhook behind ${HUNG} hung receivers of A: ms, cap 4 / no cap (each run; timeout ${WEBHOOK_TIMEOUT_MS} ms)`,
        value: `${hooks.capped.map((v) => fmt(v, 0)).join(", ")} / ${hooks.uncapped.map((v) => fmt(v, 0)).join(", ")}`,
      },
      {
        scenario,
        metric: "load average (1 min) at start / end",
        value: `${fmt(loadAtStart, 2)} / ${fmt(loadAtEnd, 2)}`,
      },
    ];
    return {
      rows,
      data: {
        backlog: BACKLOG,
        slots: SLOTS,
        jobMs: JOB_MS,
        delays,
        rates,
        cpu,
        hooks,
        perSlice,
        lanes: LANES,
        loadAtStart,
        loadAtEnd,
      },
    };
  } finally {
    await redis.stop();
  }
}
