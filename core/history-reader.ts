import { hkdfSync } from "node:crypto";
import type { HistoryDb } from "./history.js";
import { InvalidInputError, type JobStateName } from "./jobs.js";
import { checkJobsFilter, PageTokens } from "./page-tokens.js";

// Reading the job history for its owner: a page of their jobs (keyset pagination on
// (created_at, job_id) with signed page tokens) and their hourly or daily totals from
// the per-owner views of core/history-sql/003_owner_views.sql. Only the two history RPCs call this; the
// job path never waits on PostgreSQL.

/** The server has no HISTORY_DATABASE_URL: there is no history to read. */
export class HistoryOffError extends Error {
  override name = "HistoryOffError";
  constructor() {
    super(
      "job history is not configured on this server: set HISTORY_DATABASE_URL " +
        "(postgres://user:password@host:5432/database) on the API and the workers to turn it " +
        "on (docs/configuration.md, History)",
    );
  }
}

/** PostgreSQL cannot answer now (down, timed out, schema not migrated yet): retry later. */
export class HistoryUnavailableError extends Error {
  override name = "HistoryUnavailableError";
}

export const DEFAULT_PAGE_SIZE = 50;
export const MAX_PAGE_SIZE = 1000;
const DAY_MS = 86_400_000;
/** Longest range of one statistics call, per interval: 744 hourly or 400 daily buckets. */
export const MAX_STATISTICS_RANGE_MS = { hour: 31 * DAY_MS, day: 400 * DAY_MS } as const;

export interface HistoryListQuery {
  /** 0 for the default; clamped to MAX_PAGE_SIZE. */
  pageSize: number;
  pageToken: string;
  /** Empty: every state. */
  states: readonly JobStateName[];
  /** Inclusive, ms. */
  createdFrom?: number;
  /** Exclusive, ms. */
  createdBefore?: number;
}

export interface HistoryRow {
  jobId: string;
  state: JobStateName;
  fileIds: number[];
  totalBytes: number;
  zipBytes?: number;
  createdAt: number;
  startedAt?: number;
  endedAt?: number;
  updatedAt: number;
  attempts: number;
  errorCode?: string;
  errorMessage?: string;
  /** Initiate's labels; absent when the job had none. */
  labels?: Record<string, string>;
}

export interface HistoryPage {
  rows: HistoryRow[];
  /** Empty on the last page. */
  nextPageToken: string;
}

export interface StatisticsBucket {
  start: number;
  jobs: number;
  completed: number;
  failed: number;
  cancelled: number;
  totalBytes: number;
  zipBytes: number;
  durationP50Ms?: number;
  durationP95Ms?: number;
  queueWaitP50Ms?: number;
  queueWaitP95Ms?: number;
  /** Most frequent first. */
  failures: { errorCode: string; count: number }[];
}

/** Where a page ended: the last row's created_at as PostgreSQL printed it, and its id. */
interface Cursor {
  c: string;
  i: string;
}

const num = (v: string | number | null): number | undefined => (v === null ? undefined : Number(v));
const time = (v: Date | null): number | undefined => (v === null ? undefined : v.getTime());

export class HistoryReader {
  private readonly tokens: PageTokens<Cursor>;

  /**
   * `secret`: what the page tokens' HMAC key is derived from (HKDF-SHA256). The API passes
   * HISTORY_PAGE_TOKEN_SECRET or, unset, the database URL: every API instance of one
   * deployment shares it, so a token made by one is good on the others, and whoever
   * holds it can read the history anyway.
   */
  constructor(
    private readonly db: HistoryDb,
    secret: string,
  ) {
    this.tokens = new PageTokens(
      Buffer.from(hkdfSync("sha256", secret, "", "download-jobs history page tokens v1", 32)),
      "history-page-v1",
      "states and create_time range",
      (c): c is Cursor =>
        typeof (c as Cursor | null)?.c === "string" && typeof (c as Cursor | null)?.i === "string",
    );
  }

  async list(owner: string, q: HistoryListQuery): Promise<HistoryPage> {
    const { size, states } = checkJobsFilter(q, { default: DEFAULT_PAGE_SIZE, max: MAX_PAGE_SIZE });
    const filter = JSON.stringify([states, q.createdFrom ?? null, q.createdBefore ?? null]);
    const cursor = q.pageToken === "" ? undefined : this.tokens.verify(owner, filter, q.pageToken);

    const res = await this.query<{
      job_id: string;
      state: JobStateName;
      file_ids: string[];
      total_bytes: string;
      zip_bytes: string | null;
      created_at: Date;
      started_at: Date | null;
      finished_at: Date | null;
      updated_at: Date;
      attempts: number;
      error_code: string | null;
      error_message: string | null;
      labels: Record<string, string> | null;
      cursor: string;
    }>(
      // Row comparison on (created_at, job_id) follows the owner's index in order: each
      // page is a range scan from where the last one ended, however deep the page.
      `SELECT job_id, state, file_ids, total_bytes, zip_bytes, created_at, started_at,
              finished_at, updated_at, attempts, error_code, error_message, labels,
              created_at::text AS cursor
       FROM download_jobs
       WHERE owner = $1
         AND (cardinality($2::text[]) = 0 OR state = ANY($2::text[]))
         AND ($3::timestamptz IS NULL OR created_at >= $3)
         AND ($4::timestamptz IS NULL OR created_at < $4)
         AND ($5::timestamptz IS NULL OR (created_at, job_id) < ($5::timestamptz, $6::text))
       ORDER BY created_at DESC, job_id DESC
       LIMIT $7`,
      [
        owner,
        states,
        q.createdFrom === undefined ? null : new Date(q.createdFrom).toISOString(),
        q.createdBefore === undefined ? null : new Date(q.createdBefore).toISOString(),
        cursor?.c ?? null,
        cursor?.i ?? null,
        size + 1,
      ],
    );
    const more = res.length > size;
    const page = more ? res.slice(0, size) : res;
    const last = page.at(-1);
    return {
      rows: page.map((r) => {
        const row: HistoryRow = {
          jobId: r.job_id,
          state: r.state,
          fileIds: r.file_ids.map(Number),
          totalBytes: Number(r.total_bytes),
          createdAt: r.created_at.getTime(),
          updatedAt: r.updated_at.getTime(),
          attempts: r.attempts,
        };
        const opt = {
          zipBytes: num(r.zip_bytes),
          startedAt: time(r.started_at),
          endedAt: time(r.finished_at),
          errorCode: r.error_code ?? undefined,
          errorMessage: r.error_message ?? undefined,
          labels: r.labels ?? undefined,
        };
        for (const [k, v] of Object.entries(opt))
          if (v !== undefined) Object.assign(row, { [k]: v });
        return row;
      }),
      nextPageToken:
        more && last !== undefined
          ? this.tokens.sign(owner, filter, { c: last.cursor, i: last.job_id })
          : "",
    };
  }

  /** Buckets in which the owner's jobs ended, in [from, to), oldest first. */
  async statistics(
    owner: string,
    interval: "hour" | "day",
    from: number,
    to: number,
  ): Promise<StatisticsBucket[]> {
    if (!(to > from))
      throw new InvalidInputError("end_time must be after start_time (both are required)");
    if (to - from > MAX_STATISTICS_RANGE_MS[interval])
      throw new InvalidInputError(
        `the range is too long for ${interval === "hour" ? "hourly" : "daily"} buckets: at most ` +
          `${MAX_STATISTICS_RANGE_MS[interval] / DAY_MS} days; ask for daily buckets or a shorter range`,
      );
    // The view names come from this fixed table, never from the request. These are the
    // per-owner views (003_owner_views.sql): the owner condition reaches the table there.
    const views =
      interval === "hour"
        ? { totals: "job_history_owner_hourly", failures: "job_failures_owner_hourly" }
        : { totals: "job_history_owner_daily", failures: "job_failures_owner_daily" };
    const range = [owner, new Date(from).toISOString(), new Date(to).toISOString(), interval];
    const [totals, failures] = await Promise.all([
      this.query<{
        bucket: Date;
        jobs: string;
        completed: string;
        failed: string;
        cancelled: string;
        bytes: string;
        zip_bytes: string;
        duration_p50_ms: number | null;
        duration_p95_ms: number | null;
        queue_wait_p50_ms: number | null;
        queue_wait_p95_ms: number | null;
      }>(
        `SELECT * FROM ${views.totals}
         WHERE owner = $1 AND bucket >= date_trunc($4, $2::timestamptz) AND bucket < $3
         ORDER BY bucket`,
        range,
      ),
      this.query<{ bucket: Date; error_code: string | null; failed: string }>(
        `SELECT bucket, error_code, failed FROM ${views.failures}
         WHERE owner = $1 AND bucket >= date_trunc($4, $2::timestamptz) AND bucket < $3
         ORDER BY bucket, failed DESC, error_code`,
        range,
      ),
    ]);
    const byBucket = new Map<number, StatisticsBucket["failures"]>();
    for (const f of failures) {
      const list = byBucket.get(f.bucket.getTime()) ?? [];
      list.push({ errorCode: f.error_code ?? "", count: Number(f.failed) });
      byBucket.set(f.bucket.getTime(), list);
    }
    return totals.map((t) => {
      const b: StatisticsBucket = {
        start: t.bucket.getTime(),
        jobs: Number(t.jobs),
        completed: Number(t.completed),
        failed: Number(t.failed),
        cancelled: Number(t.cancelled),
        totalBytes: Number(t.bytes),
        zipBytes: Number(t.zip_bytes),
        failures: byBucket.get(t.bucket.getTime()) ?? [],
      };
      const opt = {
        durationP50Ms: num(t.duration_p50_ms),
        durationP95Ms: num(t.duration_p95_ms),
        queueWaitP50Ms: num(t.queue_wait_p50_ms),
        queueWaitP95Ms: num(t.queue_wait_p95_ms),
      };
      for (const [k, v] of Object.entries(opt)) if (v !== undefined) Object.assign(b, { [k]: v });
      return b;
    });
  }

  /**
   * Any failure to get an answer from PostgreSQL is UNAVAILABLE to the caller, except a
   * mistake in our own SQL (class 42 other than a missing table: not migrated yet).
   */
  private async query<R>(sql: string, params: unknown[]): Promise<R[]> {
    try {
      return (await this.db.pool.query(sql, params)).rows as R[];
    } catch (err) {
      const code = (err as { code?: unknown }).code;
      if (typeof code === "string" && code.startsWith("42") && code !== "42P01") throw err;
      throw new HistoryUnavailableError("job history is unavailable, retry shortly", {
        cause: err,
      });
    }
  }
}
