import { randomUUID } from "node:crypto";
import { QueueEvents } from "bullmq";
import { pino } from "pino";
import { HistoryDb } from "../core/history.js";
import { JobStore } from "../core/job-store.js";
import { createJob } from "../core/job-transitions.js";
import { createBundleQueue, QUEUE_NAME } from "../core/queue.js";
import { createRedis, waitForRedis } from "../core/redis.js";
import { startPostgres } from "../local/postgres-server.js";
import { startRedis } from "../local/redis-server.js";
import { HISTORY_GROUP, startHistoryWriter } from "../worker/history-writer.js";
import { fmt, percentile, type Row, startNodeServer } from "./lib.js";

// History's cost and speed: jobs run through the real transitions (bench/noop-worker.ts:
// the processor's record writes, no work, no S3) against a real PostgreSQL with fsync on.
//  1. outbox off (no stream): job completions per second, the baseline;
//  2. outbox on, no writer: the same, now that every change is also appended (1 and 2
//     alternate, round after round);
//  3. the writer drains what the rounds of 2 left: changes and job rows per second;
//  4. outbox on and the writer running: completions per second, and how far behind the
//     history is when the last job completes.

export async function benchHistory(
  opts: { quick?: boolean } = {},
): Promise<{ rows: Row[]; data: unknown }> {
  const perRound = opts.quick ? 500 : 2000;
  const rounds = opts.quick ? 1 : 3;
  const redisServer = await startRedis();
  const pgServer = await startPostgres({ fast: false });
  const prefix = "benchhistory";
  const redis = createRedis(redisServer.url, { role: "worker" });
  const eventsConn = createRedis(redisServer.url, { role: "worker" });
  await waitForRedis(redis);
  const store = new JobStore(redis, { prefix, recordTtlSeconds: 3600 });
  const queue = createBundleQueue(redis, { prefix, attempts: 1, backoffMs: 0 });
  const events = new QueueEvents(QUEUE_NAME, { connection: eventsConn, prefix });
  await events.waitUntilReady();
  let completed = 0;
  events.on("completed", () => {
    completed += 1;
  });
  const worker = await startNodeServer("bench/noop-worker.ts", {
    REDIS_URL: redisServer.url,
    QUEUE_PREFIX: prefix,
  });
  const db = new HistoryDb(pgServer.url);
  await db.migrate();
  let writer: ReturnType<typeof startHistoryWriter> | undefined;
  const rowCount = async () =>
    Number((await db.pool.query("SELECT count(*) AS n FROM download_jobs")).rows[0].n);

  /** Runs `n` jobs (created and queued 100 at a time); resolves to completions per second. */
  const round = async (n: number): Promise<number> => {
    const target = completed + n;
    const t0 = performance.now();
    for (let i = 0; i < n; i += 100) {
      const batch = Array.from({ length: Math.min(100, n - i) }, () => randomUUID());
      await Promise.all(batch.map((id, k) => createJob(store, id, [i + k + 1], "bench")));
      await queue.addBulk(
        batch.map((id, k) => ({
          name: "bundle",
          data: { jobId: id, fileIds: [i + k + 1], owner: "bench" },
          opts: { jobId: id },
        })),
      );
    }
    while (completed < target) await new Promise((r) => setTimeout(r, 20));
    return n / ((performance.now() - t0) / 1000);
  };

  try {
    await round(1000); // warm-up, not history
    // Rounds with the outbox off and on alternate, and medians are compared, since the
    // machine's load drifts. Off: the stream is parked under another name, so the
    // transitions' XADD NOMKSTREAM finds none; on: it is back, with its group.
    const outbox = store.keys.historyOutbox;
    const parked = `${outbox}:parked`;
    await redis.xgroup("CREATE", outbox, HISTORY_GROUP, "0", "MKSTREAM");
    const rates = { off: [] as number[], on: [] as number[] };
    for (let r = 0; r < rounds; r++) {
      await redis.rename(outbox, parked);
      rates.off.push(await round(perRound));
      await redis.rename(parked, outbox);
      rates.on.push(await round(perRound));
    }
    const baseline = percentile(rates.off, 50);
    const withOutbox = percentile(rates.on, 50);
    const backlog = await redis.xlen(outbox);

    const t0 = performance.now();
    writer = startHistoryWriter({
      redis: createRedis(redisServer.url, { role: "worker" }),
      stream: store.keys.historyOutbox,
      db: new HistoryDb(pgServer.url),
      log: pino({ level: process.env.BENCH_HISTORY_LOG ?? "silent" }, pino.destination(2)),
    });
    while ((await redis.xlen(store.keys.historyOutbox)) > 0) {
      await new Promise((r) => setTimeout(r, 20));
    }
    const drainSeconds = (performance.now() - t0) / 1000;
    const drainedRows = await rowCount();

    const live = await round(perRound);
    const lagAtEnd = await redis.xlen(store.keys.historyOutbox);
    const t1 = performance.now();
    while ((await redis.xlen(store.keys.historyOutbox)) > 0) {
      await new Promise((r) => setTimeout(r, 20));
    }
    const catchUpMs = performance.now() - t1;
    const finalRows = await rowCount();

    const scenario = `history ${rounds}x${perRound} no-op jobs per side, PostgreSQL fsync on`;
    const rows: Row[] = [
      { scenario, metric: "jobs/s, outbox off (median)", value: fmt(baseline, 0) },
      { scenario, metric: "jobs/s, outbox on, no writer (median)", value: fmt(withOutbox, 0) },
      {
        scenario,
        metric: "outbox on / off (jobs/s)",
        value: fmt(withOutbox / baseline, 2),
      },
      {
        scenario,
        metric: "writer drain: changes/s (job rows/s)",
        value: `${fmt(backlog / drainSeconds, 0)} (${fmt(drainedRows / drainSeconds, 0)})`,
      },
      { scenario, metric: "jobs/s with the writer running", value: fmt(live, 0) },
      {
        scenario,
        metric: "outbox left when the last job completed; ms to catch up",
        value: `${lagAtEnd}; ${fmt(catchUpMs, 0)}`,
      },
      {
        scenario,
        metric: "history rows = jobs run with history",
        value: `${finalRows} = ${(rounds + 1) * perRound}`,
        ok: finalRows === (rounds + 1) * perRound,
      },
    ];
    return {
      rows,
      data: {
        perRound,
        rounds,
        rates,
        baseline,
        withOutbox,
        backlog,
        drainSeconds,
        drainedRows,
        live,
        lagAtEnd,
        catchUpMs,
        finalRows,
      },
    };
  } finally {
    await writer?.stop();
    await worker.stop();
    await events.close().catch(() => undefined);
    await queue.close().catch(() => undefined);
    await db.close().catch(() => undefined);
    redis.disconnect();
    eventsConn.disconnect();
    await pgServer.destroy();
    await redisServer.stop();
  }
}
