import { execFile } from "node:child_process";
import { randomUUID } from "node:crypto";
import { readFileSync } from "node:fs";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { type HistoryChange, HistoryDb } from "../core/history.js";
import { type LocalPostgres, startPostgres } from "../local/postgres-server.js";

// The history database against a real PostgreSQL: migrations from several processes at
// once, replays, the hourly and daily views, retention and erasing an owner.

let server: LocalPostgres;
let db: HistoryDb;

beforeAll(async () => {
  server = await startPostgres();
  db = new HistoryDb(server.url);
  await db.migrate();
}, 180_000);

afterAll(async () => {
  await db?.close();
  await server?.destroy();
});

const HOUR = 3_600_000;
/** A fixed hour in the past, so every bucket is known. */
const T0 = Date.UTC(2026, 10, 2, 10, 0, 0);

/** The changes of one job that ran: QUEUED at `created`, started `wait` later, ran `run`. */
function jobChanges(opts: {
  owner: string;
  created: number;
  waitMs: number;
  runMs: number;
  end: "COMPLETED" | "FAILED" | "CANCELLED";
  bytes?: number;
  errorCode?: string;
}): HistoryChange[] {
  const base = {
    jobId: randomUUID(),
    owner: opts.owner,
    createdAt: opts.created,
    fileIds: [1, 2],
    totalBytes: opts.bytes ?? 1000,
  };
  const started = opts.created + opts.waitMs;
  const ended = started + opts.runMs;
  return [
    {
      ...base,
      state: "PROCESSING",
      version: 2,
      attempts: 1,
      updatedAt: started,
      startedAt: started,
    },
    {
      ...base,
      state: opts.end,
      version: 7,
      attempts: 1,
      updatedAt: ended,
      startedAt: started,
      endedAt: ended,
      ...(opts.end === "COMPLETED" ? { zipBytes: (opts.bytes ?? 1000) + 200 } : {}),
      ...(opts.errorCode !== undefined
        ? { errorCode: opts.errorCode, errorMessage: `failed: ${opts.errorCode}` }
        : {}),
      ...(opts.end === "CANCELLED" ? { cancelledBy: opts.owner } : {}),
    },
  ];
}

async function count(sql: string, params: unknown[] = []): Promise<number> {
  const { rows } = await db.pool.query(sql, params);
  return Number(rows[0].n);
}

describe("history database", () => {
  test("migrations started by several processes at once apply once", async () => {
    await db.pool.query("CREATE DATABASE migrations_race");
    const url = server.url.replace(/\/postgres$/, "/migrations_race");
    const dbs = [1, 2, 3, 4, 5].map(() => new HistoryDb(url));
    try {
      const applied = await Promise.all(dbs.map((d) => d.migrate()));
      expect(applied.flat().sort()).toEqual([
        "001_history.sql",
        "002_views.sql",
        "003_owner_views.sql",
      ]);
      const { rows } = (await dbs[0]?.pool.query(
        "SELECT name FROM history_migrations ORDER BY name",
      )) ?? { rows: [] };
      expect(rows.map((r) => r.name)).toEqual([
        "001_history.sql",
        "002_views.sql",
        "003_owner_views.sql",
      ]);
      expect(await dbs[0]?.migrate()).toEqual([]);
    } finally {
      await Promise.all(dbs.map((d) => d.close()));
    }
  });

  test("a batch applied again, or its changes in reverse order, changes nothing", async () => {
    const changes = jobChanges({
      owner: "replay",
      created: T0,
      waitMs: 100,
      runMs: 900,
      end: "COMPLETED",
    });
    const id = changes[0]?.jobId as string;
    await db.apply(changes);
    const first = (await db.pool.query("SELECT * FROM download_jobs WHERE job_id = $1", [id]))
      .rows[0];
    await db.apply([...changes].reverse());
    await db.apply([changes[0] as HistoryChange]);
    const again = (await db.pool.query("SELECT * FROM download_jobs WHERE job_id = $1", [id]))
      .rows[0];
    expect(again).toEqual(first);
    expect(first).toMatchObject({ state: "COMPLETED", version: 7, zip_bytes: "1200" });
    const events = await db.pool.query(
      "SELECT version, state FROM job_events WHERE job_id = $1 ORDER BY version",
      [id],
    );
    expect(events.rows).toEqual([
      { version: 1, state: "QUEUED" },
      { version: 2, state: "PROCESSING" },
      { version: 7, state: "COMPLETED" },
    ]);
  });

  test("hourly and daily views total jobs, bytes, failures by code and duration percentiles", async () => {
    const owner = `stats-${randomUUID().slice(0, 8)}`;
    const jobs = [
      // Hour 1: ten completed jobs of 1..10 s after a 1 s wait, two failures, one cancel.
      ...Array.from({ length: 10 }, (_, i) =>
        jobChanges({
          owner,
          created: T0 + i * 1000,
          waitMs: 1000,
          runMs: (i + 1) * 1000,
          end: "COMPLETED",
          bytes: 5000,
        }),
      ),
      jobChanges({
        owner,
        created: T0,
        waitMs: 10,
        runMs: 10,
        end: "FAILED",
        errorCode: "not_found",
      }),
      jobChanges({
        owner,
        created: T0,
        waitMs: 10,
        runMs: 10,
        end: "FAILED",
        errorCode: "not_found",
      }),
      jobChanges({ owner, created: T0, waitMs: 10, runMs: 10, end: "CANCELLED" }),
      // Hour 2 of the same day: one failure of another kind.
      jobChanges({
        owner,
        created: T0 + HOUR,
        waitMs: 10,
        runMs: 10,
        end: "FAILED",
        errorCode: "resource_exhausted",
      }),
    ];
    await db.apply(jobs.flat());

    const hourly = await db.pool.query(
      "SELECT * FROM job_history_hourly WHERE owner = $1 ORDER BY bucket",
      [owner],
    );
    expect(hourly.rows.map((r) => r.bucket.getTime())).toEqual([T0, T0 + HOUR]);
    const h1 = hourly.rows[0];
    expect(h1).toMatchObject({
      jobs: "13",
      completed: "10",
      failed: "2",
      cancelled: "1",
      bytes: "50000",
      zip_bytes: "52000",
    });
    // Completed durations 1..10 s: p50 5.5 s, p95 9.55 s (linear interpolation).
    expect(h1.duration_p50_ms).toBeCloseTo(5500, 3);
    expect(h1.duration_p95_ms).toBeCloseTo(9550, 3);
    // Queue waits: ten of 1 s and three of 10 ms.
    expect(h1.queue_wait_p50_ms).toBeCloseTo(1000, 3);

    const daily = await db.pool.query("SELECT * FROM job_history_daily WHERE owner = $1", [owner]);
    expect(daily.rows).toHaveLength(1);
    expect(daily.rows[0]).toMatchObject({ jobs: "14", completed: "10", failed: "3" });

    const failures = await db.pool.query(
      "SELECT error_code, failed FROM job_failures_daily WHERE owner = $1 ORDER BY error_code",
      [owner],
    );
    expect(failures.rows).toEqual([
      { error_code: "not_found", failed: "2" },
      { error_code: "resource_exhausted", failed: "1" },
    ]);
    const hourlyFailures = await db.pool.query(
      "SELECT bucket, error_code, failed FROM job_failures_hourly WHERE owner = $1 ORDER BY bucket",
      [owner],
    );
    expect(hourlyFailures.rows.map((r) => [r.bucket.getTime(), r.error_code, r.failed])).toEqual([
      [T0, "not_found", "2"],
      [T0 + HOUR, "resource_exhausted", "1"],
    ]);

    // The everyone row (owner NULL) counts this owner's jobs too.
    const all = await db.pool.query(
      "SELECT jobs FROM job_history_daily WHERE owner IS NULL AND bucket = $1",
      [new Date(Date.UTC(2026, 10, 2))],
    );
    expect(Number(all.rows[0].jobs)).toBeGreaterThanOrEqual(14);
  });

  test("retention deletes jobs that ended before the period, with their events", async () => {
    const owner = `retention-${randomUUID().slice(0, 8)}`;
    const now = Date.now();
    const old = jobChanges({
      owner,
      created: now - 40 * 24 * HOUR,
      waitMs: 10,
      runMs: 10,
      end: "COMPLETED",
    });
    const recent = jobChanges({
      owner,
      created: now - 2 * 24 * HOUR,
      waitMs: 10,
      runMs: 10,
      end: "COMPLETED",
    });
    await db.apply([...old, ...recent]);
    expect(await db.prune(30)).toBeGreaterThanOrEqual(1);
    const left = await db.pool.query("SELECT job_id FROM download_jobs WHERE owner = $1", [owner]);
    expect(left.rows.map((r) => r.job_id)).toEqual([recent[0]?.jobId]);
    expect(
      await count("SELECT count(*) AS n FROM job_events WHERE job_id = $1", [old[0]?.jobId]),
    ).toBe(0);
  });

  test("erasing an owner deletes their history, and their changes still in the outbox do not bring it back", async () => {
    const owner = `erase-${randomUUID().slice(0, 8)}`;
    const other = `keep-${randomUUID().slice(0, 8)}`;
    const mine = jobChanges({ owner, created: T0, waitMs: 10, runMs: 10, end: "COMPLETED" });
    const theirs = jobChanges({
      owner: other,
      created: T0,
      waitMs: 10,
      runMs: 10,
      end: "COMPLETED",
    });
    // Only the start of my job is written before the erasure; its end arrives later.
    await db.apply([mine[0] as HistoryChange, ...theirs]);
    expect(await db.eraseOwner(owner)).toBe(1);
    await db.apply([mine[1] as HistoryChange]);
    expect(await count("SELECT count(*) AS n FROM download_jobs WHERE owner = $1", [owner])).toBe(
      0,
    );
    expect(
      await count("SELECT count(*) AS n FROM job_events WHERE job_id = $1", [mine[0]?.jobId]),
    ).toBe(0);
    expect(await count("SELECT count(*) AS n FROM download_jobs WHERE owner = $1", [other])).toBe(
      1,
    );
    // A job the owner starts after the erasure is history again.
    const later = jobChanges({
      owner,
      created: Date.now() + 1000,
      waitMs: 10,
      runMs: 10,
      end: "COMPLETED",
    });
    await db.apply(later);
    expect(await count("SELECT count(*) AS n FROM download_jobs WHERE owner = $1", [owner])).toBe(
      1,
    );
  });

  test("npm run history -- erase <owner> erases from the command line, and a bad call says what is wrong", async () => {
    const owner = `cli-${randomUUID().slice(0, 8)}`;
    await db.apply(jobChanges({ owner, created: T0, waitMs: 10, runMs: 10, end: "FAILED" }));
    const run = (args: string[], env: Record<string, string>) =>
      promisify(execFile)("node_modules/.bin/tsx", ["scripts/history.ts", ...args], {
        env: { ...process.env, ...env },
      });
    const out = await run(["erase", owner], { HISTORY_DATABASE_URL: server.url });
    expect(out.stdout).toContain(`erased 1 jobs of ${owner}`);
    expect(await count("SELECT count(*) AS n FROM download_jobs WHERE owner = $1", [owner])).toBe(
      0,
    );
    await expect(run(["erase"], { HISTORY_DATABASE_URL: server.url })).rejects.toMatchObject({
      code: 2,
      stderr: expect.stringContaining("erase needs the owner"),
    });
    await expect(run(["erase", owner], { HISTORY_DATABASE_URL: "" })).rejects.toMatchObject({
      code: 2,
      stderr: expect.stringContaining("HISTORY_DATABASE_URL is not set"),
    });
  });

  test("every query of the Grafana history dashboard runs against the schema and finds the jobs", async () => {
    await db.apply(
      jobChanges({
        owner: "grafana",
        created: T0,
        waitMs: 10,
        runMs: 10,
        end: "FAILED",
        errorCode: "not_found",
      }),
    );
    const dashboard = JSON.parse(
      readFileSync("deploy/grafana/dashboards/download-jobs-history.json", "utf8"),
    ) as { panels: { title: string; targets: { rawSql: string }[] }[] };
    expect(dashboard.panels.length).toBeGreaterThanOrEqual(6);
    for (const panel of dashboard.panels) {
      for (const t of panel.targets) {
        // Grafana's macro, as it expands it for the dashboard's time range.
        const sql = t.rawSql.replace(
          /\$__timeFilter\((\w+)\)/g,
          `$1 BETWEEN '${new Date(T0 - HOUR).toISOString()}' AND '${new Date(T0 + 3 * HOUR).toISOString()}'`,
        );
        const { rows } = await db.pool.query(sql);
        expect(rows.length, panel.title).toBeGreaterThan(0);
      }
    }
  });
});
