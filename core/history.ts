import { readdirSync, readFileSync } from "node:fs";
import type { PoolClient } from "pg";
import pg from "pg";
import type { JobErrorRecord, JobProgress, JobResultRecord } from "./jobs.js";

// Job history in PostgreSQL: the schema (SQL migrations in core/history-sql, run at
// start-up), the idempotent apply of outbox changes, retention and erasure. Nothing in
// the request or job path calls this: changes reach it through the Redis outbox that the
// transitions append to (core/lua/transition.lua), read by worker/history-writer.ts.

/** One change from the outbox: the job record's history fields after the change. */
export interface HistoryChange {
  jobId: string;
  owner: string;
  state: string;
  version: number;
  attempts: number;
  createdAt: number;
  updatedAt: number;
  startedAt?: number;
  endedAt?: number;
  fileIds: number[];
  totalBytes: number;
  zipBytes?: number;
  errorCode?: string;
  errorMessage?: string;
  cancelledBy?: string;
  labels?: unknown;
}

/**
 * An outbox entry's fields (the record's hash fields, as the transition wrote them) ->
 * a change; undefined for an entry that is not a job change (nothing else writes there,
 * but a hand-written entry must not stop the writer).
 */
export function changeFromFields(fields: readonly string[]): HistoryChange | undefined {
  const f: Record<string, string> = {};
  for (let i = 0; i + 1 < fields.length; i += 2) f[fields[i] as string] = fields[i + 1] as string;
  if (f.id === undefined || f.owner === undefined || f.state === undefined) return undefined;
  const json = <T>(v: string | undefined): T | undefined =>
    v === undefined ? undefined : (JSON.parse(v) as T);
  const num = (v: string | undefined) => (v === undefined ? undefined : Number(v));
  const progress = json<JobProgress>(f.progress);
  const result = json<JobResultRecord>(f.result);
  const error = json<JobErrorRecord>(f.error);
  const out: HistoryChange = {
    jobId: f.id,
    owner: f.owner,
    state: f.state,
    version: Number(f.version ?? 0),
    attempts: Number(f.attempts ?? 0),
    createdAt: Number(f.createdAt ?? 0),
    updatedAt: Number(f.updatedAt ?? f.createdAt ?? 0),
    fileIds: json<number[]>(f.fileIds) ?? [],
    totalBytes: progress?.bytesTotal ?? 0,
  };
  const startedAt = num(f.startedAt);
  const endedAt = num(f.endedAt);
  if (startedAt !== undefined) out.startedAt = startedAt;
  if (endedAt !== undefined) out.endedAt = endedAt;
  if (result !== undefined) out.zipBytes = result.sizeBytes;
  if (error !== undefined) {
    out.errorCode = error.code;
    out.errorMessage = error.message;
  }
  if (f.cancelledBy !== undefined) out.cancelledBy = f.cancelledBy;
  if (f.labels !== undefined) out.labels = json(f.labels);
  return out;
}

const MIGRATIONS = new URL("./history-sql/", import.meta.url);
// pg_advisory_lock takes a bigint: any fixed number that names "history migrations".
const MIGRATION_LOCK = 0x646a_6869_7374;

// A time out of JavaScript's range becomes NULL, which PostgreSQL then refuses as data
// where a time is required (the writer skips that change) instead of throwing here.
const ms = (v: number | undefined) =>
  v === undefined || !Number.isFinite(v) || Math.abs(v) > 8.64e15
    ? null
    : new Date(v).toISOString();

export class HistoryDb {
  readonly pool: pg.Pool;

  /** `statementTimeoutMs`: the server cancels longer statements (the API's reads). */
  constructor(
    readonly url: string,
    opts: { max?: number; statementTimeoutMs?: number } = {},
  ) {
    this.pool = new pg.Pool({
      connectionString: url,
      max: opts.max ?? 2,
      // The views bucket by date_trunc, which follows the session's time zone: buckets are
      // UTC hours and days whatever the server's default.
      options: "-c TimeZone=UTC",
      ...(opts.statementTimeoutMs !== undefined
        ? { statement_timeout: opts.statementTimeoutMs }
        : {}),
      connectionTimeoutMillis: 5000,
      // A query that hangs on a half-dead server must fail, so the batch is retried.
      query_timeout: 30_000,
    });
    // An idle client whose server went away emits here; the next query reconnects.
    this.pool.on("error", () => undefined);
    // pg-pool drops its listener while a client is checked out (migrate, a batch, an
    // erasure): a server dying between two of its queries would then be an uncaught
    // exception. The queries reject and release() discards the dead client anyway.
    this.pool.on("connect", (client) => client.on("error", () => undefined));
  }

  /**
   * Applies every migration not yet applied, in name order, each in its own transaction.
   * Several processes may start at once: the advisory lock lets one migrate while the
   * others wait, then find nothing left to do.
   */
  async migrate(): Promise<string[]> {
    const files = readdirSync(MIGRATIONS)
      .filter((f) => f.endsWith(".sql"))
      .sort();
    const client = await this.pool.connect();
    const applied: string[] = [];
    try {
      await client.query("SELECT pg_advisory_lock($1)", [MIGRATION_LOCK]);
      await client.query(
        "CREATE TABLE IF NOT EXISTS history_migrations (name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
      );
      const done = new Set(
        (await client.query<{ name: string }>("SELECT name FROM history_migrations")).rows.map(
          (r) => r.name,
        ),
      );
      for (const file of files) {
        if (done.has(file)) continue;
        const sql = readFileSync(new URL(file, MIGRATIONS), "utf8");
        await client.query("BEGIN");
        try {
          await client.query(sql);
          await client.query("INSERT INTO history_migrations (name) VALUES ($1)", [file]);
          await client.query("COMMIT");
        } catch (err) {
          await client.query("ROLLBACK");
          throw new Error(`history migration ${file} failed: ${(err as Error).message}`);
        }
        applied.push(file);
      }
    } finally {
      await client.query("SELECT pg_advisory_unlock($1)", [MIGRATION_LOCK]).catch(() => undefined);
      client.release();
    }
    return applied;
  }

  /**
   * Applies a batch of changes in one transaction, in any order and any number of times
   * with the same result: a row takes a change only if it is newer than the row's
   * version, and an event is keyed by (job, version). A job's creation (version 1,
   * QUEUED) is not in the outbox; its event is derived from the record's creation time.
   */
  async apply(changes: readonly HistoryChange[]): Promise<void> {
    if (changes.length === 0) return;
    const latest = new Map<string, HistoryChange>();
    for (const c of changes) {
      const prev = latest.get(c.jobId);
      if (prev === undefined || prev.version < c.version) latest.set(c.jobId, c);
    }
    const rows = [...latest.values()].map((c) => ({
      job_id: c.jobId,
      owner: c.owner,
      labels: c.labels ?? null,
      file_ids: c.fileIds,
      total_bytes: c.totalBytes,
      zip_bytes: c.zipBytes ?? null,
      created_at: ms(c.createdAt),
      started_at: ms(c.startedAt),
      finished_at: ms(c.endedAt),
      state: c.state,
      error_code: c.errorCode ?? null,
      error_message: c.errorMessage ?? null,
      attempts: c.attempts,
      cancelled_by: c.cancelledBy ?? null,
      version: c.version,
      updated_at: ms(c.updatedAt),
    }));
    const events = [
      ...changes.map((c) => ({
        job_id: c.jobId,
        version: c.version,
        state: c.state,
        attempt: c.attempts,
        at: ms(c.updatedAt),
      })),
      ...[...latest.values()].map((c) => ({
        job_id: c.jobId,
        version: 1,
        state: "QUEUED",
        attempt: 0,
        at: ms(c.createdAt),
      })),
    ];
    await this.transaction(async (client) => {
      await client.query(
        `INSERT INTO download_jobs AS j
           (job_id, owner, labels, file_ids, total_bytes, zip_bytes, created_at, started_at,
            finished_at, state, error_code, error_message, attempts, cancelled_by, version, updated_at)
         SELECT x.job_id, x.owner, x.labels, ARRAY(SELECT jsonb_array_elements_text(x.file_ids)::bigint),
                x.total_bytes, x.zip_bytes, x.created_at, x.started_at, x.finished_at, x.state,
                x.error_code, x.error_message, x.attempts, x.cancelled_by, x.version, x.updated_at
         FROM jsonb_to_recordset($1::jsonb) AS x(
           job_id text, owner text, labels jsonb, file_ids jsonb, total_bytes bigint,
           zip_bytes bigint, created_at timestamptz, started_at timestamptz,
           finished_at timestamptz, state text, error_code text, error_message text,
           attempts integer, cancelled_by text, version integer, updated_at timestamptz)
         WHERE NOT EXISTS (
           SELECT 1 FROM history_erasures e
           WHERE e.owner_sha256 = sha256(convert_to(x.owner, 'UTF8')) AND x.created_at <= e.erased_at)
         ON CONFLICT (job_id) DO UPDATE SET
           labels = EXCLUDED.labels, total_bytes = EXCLUDED.total_bytes,
           zip_bytes = EXCLUDED.zip_bytes, started_at = EXCLUDED.started_at,
           finished_at = EXCLUDED.finished_at, state = EXCLUDED.state,
           error_code = EXCLUDED.error_code, error_message = EXCLUDED.error_message,
           attempts = EXCLUDED.attempts, cancelled_by = EXCLUDED.cancelled_by,
           version = EXCLUDED.version, updated_at = EXCLUDED.updated_at
         WHERE j.version < EXCLUDED.version`,
        [JSON.stringify(rows)],
      );
      // Only events of jobs that have a row: an erased owner's late changes stay out.
      await client.query(
        `INSERT INTO job_events (job_id, version, state, attempt, at)
         SELECT x.job_id, x.version, x.state, x.attempt, x.at
         FROM jsonb_to_recordset($1::jsonb)
           AS x(job_id text, version integer, state text, attempt integer, at timestamptz)
         WHERE EXISTS (SELECT 1 FROM download_jobs j WHERE j.job_id = x.job_id)
         ON CONFLICT (job_id, version) DO NOTHING`,
        [JSON.stringify(events)],
      );
    });
  }

  /**
   * Deletes an owner's whole history (a privacy request) and remembers that it did, so
   * changes of theirs still on their way from the outbox do not bring any of it back.
   * Resolves to the number of jobs deleted.
   */
  async eraseOwner(owner: string): Promise<number> {
    return this.transaction(async (client) => {
      await client.query(
        `INSERT INTO history_erasures (owner_sha256, erased_at)
         VALUES (sha256(convert_to($1, 'UTF8')), now())
         ON CONFLICT (owner_sha256) DO UPDATE SET erased_at = EXCLUDED.erased_at`,
        [owner],
      );
      const res = await client.query("DELETE FROM download_jobs WHERE owner = $1", [owner]);
      return res.rowCount ?? 0;
    });
  }

  /** Runs `work` in one transaction on one pooled client: committed, or rolled back. */
  private async transaction<T>(work: (client: PoolClient) => Promise<T>): Promise<T> {
    const client = await this.pool.connect();
    try {
      await client.query("BEGIN");
      const out = await work(client);
      await client.query("COMMIT");
      return out;
    } catch (err) {
      await client.query("ROLLBACK").catch(() => undefined);
      throw err;
    } finally {
      client.release();
    }
  }

  /**
   * Deletes jobs that ended (or, never ending, were created) more than `days` days ago;
   * their events go with them. Resolves to the number of jobs deleted.
   */
  async prune(days: number): Promise<number> {
    const res = await this.pool.query(
      `DELETE FROM download_jobs
       WHERE coalesce(finished_at, created_at) < now() - make_interval(days => $1)`,
      [days],
    );
    return res.rowCount ?? 0;
  }

  async close(): Promise<void> {
    await this.pool.end();
  }
}
