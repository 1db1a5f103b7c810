import { rmSync } from "node:fs";
import pg from "pg";
import { pino } from "pino";
import { afterAll, beforeAll, expect, test } from "vitest";
import { JobService } from "../core/job-service.js";
import { JobStore } from "../core/job-store.js";
import { isTerminal, type JobRecord } from "../core/jobs.js";
import { createBundleQueue } from "../core/queue.js";
import { createRedis, type RedisClient, waitForRedis } from "../core/redis.js";
import { waitUntil } from "../local/ports.js";
import { type LocalPostgres, startPostgres } from "../local/postgres-server.js";
import { type RunningWorker, startWorker } from "../worker/worker.js";
import { type Services, startServices } from "./helpers/services.js";

// History must never block jobs nor lose them: with a real PostgreSQL stopped while a
// bounded load of jobs runs, every job still ends; once PostgreSQL is back the history
// catches up with every job and every change of state, none missing and none twice. The
// witness of what the jobs did is each job's own change channel in Redis.

const silent = pino({ level: "silent" });
const OWNER = "history-owner";
const BEFORE = 6;
const DURING = 24;

let svc: Services;
let pgServer: LocalPostgres;
let worker: RunningWorker;
let redis: RedisClient;
let sub: RedisClient;
let sql: pg.Pool;
let service: JobService;
let store: JobStore;
let closeQueue: () => Promise<void>;
/** Per job, the state changes its channel published: "version STATE attempt". */
const seen = new Map<string, string[]>();

beforeAll(async () => {
  svc = await startServices();
  pgServer = await startPostgres();
  const cfg = svc.config({
    HISTORY_DATABASE_URL: pgServer.url,
    WORKER_CONCURRENCY: "3",
    PROGRESS_INTERVAL_MS: "50",
  });
  for (const id of [1, 2, 3]) await svc.putSource(id, 50_000 * id);
  redis = createRedis(svc.redisTarget, { role: "api" });
  sub = createRedis(svc.redisTarget, { role: "subscriber" });
  await Promise.all([waitForRedis(redis), waitForRedis(sub)]);
  store = new JobStore(redis, { prefix: cfg.QUEUE_PREFIX, recordTtlSeconds: 3600 });
  const queue = createBundleQueue(redis, {
    prefix: cfg.QUEUE_PREFIX,
    attempts: cfg.JOB_ATTEMPTS,
    backoffMs: cfg.JOB_BACKOFF_MS,
  });
  closeQueue = () => queue.close();
  service = new JobService({
    store,
    queue,
    redis,
    maxFilesPerJob: cfg.MAX_FILES_PER_JOB,
    policy: { dedupInFlight: false, reuseResults: false },
  });
  await sub.psubscribe(store.channel("*"));
  sub.on("pmessage", (_p: string, _c: string, m: string) => {
    const rec = JSON.parse(m) as Record<string, string>;
    const list = seen.get(rec.id as string) ?? [];
    const last = list.at(-1)?.split(" ");
    const change = `${rec.version} ${rec.state} ${rec.attempts}`;
    // Progress repeats the state and run; a change of either is history.
    if (last === undefined || last[1] !== rec.state || last[2] !== rec.attempts) list.push(change);
    seen.set(rec.id as string, list);
  });
  worker = await startWorker(cfg, silent);
  sql = new pg.Pool({ connectionString: pgServer.url, max: 2 });
  sql.on("error", () => undefined);
  // The writer makes the outbox when it starts; changes before that are not history.
  await waitUntil(
    "the history outbox",
    async () => (await redis.exists(store.keys.historyOutbox)) === 1,
  );
}, 180_000);

afterAll(async () => {
  await worker?.close();
  await closeQueue?.();
  sub?.disconnect();
  redis?.disconnect();
  await sql?.end().catch(() => undefined);
  await pgServer?.destroy();
  // The restarted server was given its folder, so destroy() leaves it: remove it here.
  if (pgServer !== undefined) rmSync(pgServer.dir, { recursive: true, force: true });
  await svc?.stop();
});

/** A mix: completed jobs, one that fails (a missing source), one cancelled at once. */
async function submit(n: number): Promise<string[]> {
  const ids: string[] = [];
  for (let i = 0; i < n; i++) {
    const fileIds = i % 8 === 5 ? [1, 404_000 + i] : [1 + (i % 3), 1 + ((i + 1) % 3)];
    const { job } = await service.initiate(OWNER, { fileIds });
    if (i % 8 === 7) await service.cancel(OWNER, job.id).catch(() => undefined);
    ids.push(job.id);
  }
  return ids;
}

async function allEnded(ids: string[]): Promise<Map<string, JobRecord>> {
  const out = new Map<string, JobRecord>();
  await expect
    .poll(
      async () => {
        for (const id of ids) {
          if (out.has(id)) continue;
          const rec = await store.get(id);
          if (isTerminal(rec.state)) out.set(id, rec);
        }
        return out.size;
      },
      { timeout: 120_000, interval: 100 },
    )
    .toBe(ids.length);
  return out;
}

async function historyRows(ids: string[]) {
  return (
    await sql.query(
      `SELECT job_id, owner, state, attempts, file_ids, total_bytes, zip_bytes, error_code,
              cancelled_by, version, created_at, started_at, finished_at
       FROM download_jobs WHERE job_id = ANY($1) ORDER BY job_id`,
      [ids],
    )
  ).rows;
}

test("with PostgreSQL stopped every job still ends, and the history then catches up with nothing missing or doubled", async () => {
  const before = await submit(BEFORE);
  await allEnded(before);
  await expect
    .poll(async () => (await historyRows(before)).length, { timeout: 60_000 })
    .toBe(BEFORE);

  await pgServer.stop();
  const during = await submit(DURING);
  const ended = await allEnded(during);
  const states = [...ended.values()].map((r) => r.state);
  expect(states).toContain("COMPLETED");
  expect(states).toContain("FAILED");
  expect(states).toContain("CANCELLED");
  // The outage was real: the outbox holds the changes PostgreSQL could not take, and
  // the writer tried to write them and failed.
  expect(await redis.xlen(store.keys.historyOutbox)).toBeGreaterThanOrEqual(DURING);
  await expect
    .poll(async () => /^history_write_failures_total [1-9]/m.test(await worker.metrics.metrics()), {
      timeout: 60_000,
    })
    .toBe(true);

  pgServer = await startPostgres({ dir: pgServer.dir, port: pgServer.port });
  const ids = [...before, ...during];
  await expect
    .poll(
      async () => {
        const rows = await historyRows(ids);
        return rows.filter((r) => isTerminal(r.state)).length;
      },
      { timeout: 90_000, interval: 200 },
    )
    .toBe(ids.length);
  await expect.poll(() => redis.xlen(store.keys.historyOutbox), { timeout: 60_000 }).toBe(0);

  const records = new Map([...(await allEnded(before)), ...ended]);
  const rows = await historyRows(ids);
  expect(rows.length).toBe(ids.length);
  for (const row of rows) {
    const rec = records.get(row.job_id) as JobRecord;
    expect(row).toMatchObject({
      owner: OWNER,
      state: rec.state,
      attempts: rec.attempts,
      file_ids: rec.fileIds.map(String),
      total_bytes: String(rec.progress.bytesTotal),
      zip_bytes: rec.result !== undefined ? String(rec.result.sizeBytes) : null,
      error_code: rec.error?.code ?? null,
      cancelled_by: rec.state === "CANCELLED" ? OWNER : null,
      version: rec.version,
    });
    expect(row.created_at.getTime()).toBe(rec.createdAt);
    expect(row.finished_at.getTime()).toBe(rec.endedAt);
    expect(row.started_at?.getTime() ?? null).toBe(rec.startedAt ?? null);
  }

  const events = (
    await sql.query(
      "SELECT job_id, version, state, attempt FROM job_events WHERE job_id = ANY($1) ORDER BY job_id, version",
      [ids],
    )
  ).rows;
  const got = new Map<string, string[]>();
  for (const e of events) {
    got.set(e.job_id, [...(got.get(e.job_id) ?? []), `${e.version} ${e.state} ${e.attempt}`]);
  }
  for (const id of ids) {
    expect(got.get(id), id).toEqual(["1 QUEUED 0", ...(seen.get(id) ?? [])]);
  }
  expect(events.length).toBe(ids.reduce((n, id) => n + 1 + (seen.get(id)?.length ?? 0), 0));
}, 300_000);
