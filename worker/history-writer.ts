import { hostname } from "node:os";
import { changeFromFields, type HistoryChange, type HistoryDb } from "../core/history.js";
import type { Logger } from "../core/logger.js";
import type { HistoryMetrics } from "../core/metrics.js";
import type { RedisClient } from "../core/redis.js";

// The history writer: reads the outbox stream that every job transition appends to
// (core/lua/transition.lua) with a consumer group, applies the changes to PostgreSQL
// idempotently (core/history.ts), then acknowledges and deletes them. It runs inside
// each worker process, as the webhook dispatcher and retention do: no extra process to
// deploy, and every worker is one more consumer of the same group. Nothing waits on it:
// jobs run whether PostgreSQL is up or not, and the outbox holds the changes meanwhile.
//
// Delivery is at least once (a writer may die between COMMIT and XACK, or another may
// claim its entries); apply() makes a repeat a no-op. Changes of one job may also be
// applied out of order by two writers: a row only takes a newer version.

export const HISTORY_GROUP = "history-writer";
/** An entry another writer read and has not acknowledged this long is taken over. */
const CLAIM_IDLE_MS = 60_000;
const BLOCK_MS = 2_000;
const MAX_BACKOFF_MS = 5_000;
const PRUNE_INTERVAL_MS = 3_600_000;
const STOP_WAIT_MS = 2_000;

const delay = (ms: number) => new Promise<void>((r) => setTimeout(r, ms).unref());

export interface HistoryWriterOptions {
  /** A connection of its own: the writer blocks on it (XREADGROUP BLOCK). */
  redis: RedisClient;
  stream: string;
  db: HistoryDb;
  log: Logger;
  batchSize?: number;
  /** History older than this many days is deleted; 0 keeps everything. */
  retentionDays?: number;
  metrics?: HistoryMetrics;
  /** How long an entry read by another writer may stay unacknowledged before this one takes it. */
  claimIdleMs?: number;
}

export interface HistoryWriter {
  /** Changes written to PostgreSQL by this writer so far. */
  readonly written: number;
  stop(): Promise<void>;
}

type Entry = [id: string, fields: string[] | null];
type Parsed = { id: string; change: HistoryChange };

/**
 * PostgreSQL refused the data itself (SQLSTATE class 22 data exception, 23 integrity):
 * retrying cannot help, unlike a connection that failed or a server shutting down.
 */
function isDataError(err: unknown): boolean {
  const code = (err as { code?: unknown }).code;
  return typeof code === "string" && /^2[23][0-9A-Z]{3}$/.test(code);
}
type ReadReply = [stream: string, entries: Entry[]][] | null;

export function startHistoryWriter(opts: HistoryWriterOptions): HistoryWriter {
  const { redis, stream, db, log } = opts;
  const batch = opts.batchSize ?? 200;
  const consumer = `${hostname()}-${process.pid}-${Math.random().toString(36).slice(2, 8)}`;
  const claimIdleMs = opts.claimIdleMs ?? CLAIM_IDLE_MS;
  let running = true;
  let written = 0;
  let wake: (() => void) | undefined;
  const pause = (ms: number) =>
    new Promise<void>((r) => {
      const t = setTimeout(r, ms);
      wake = () => {
        clearTimeout(t);
        r();
      };
    });

  async function ensureGroup(): Promise<void> {
    try {
      // MKSTREAM: the stream's existence is what turns the outbox on (XADD NOMKSTREAM).
      await redis.xgroup("CREATE", stream, HISTORY_GROUP, "0", "MKSTREAM");
      log.info({ stream }, "history outbox created: job changes are recorded from now on");
    } catch (err) {
      if (!String((err as Error).message).includes("BUSYGROUP")) throw err;
    }
  }

  async function read(id: "0" | ">"): Promise<Entry[]> {
    const args: (string | number)[] = ["GROUP", HISTORY_GROUP, consumer, "COUNT", batch];
    if (id === ">") args.push("BLOCK", BLOCK_MS);
    args.push("STREAMS", stream, id);
    const reply = (await redis.call("XREADGROUP", ...args)) as ReadReply;
    return reply?.[0]?.[1] ?? [];
  }

  /**
   * Writes a batch; a batch PostgreSQL refuses as data is split until the change it
   * refuses is found, which is logged and given up so that it cannot stop the history.
   */
  async function write(batch: Parsed[]): Promise<{ written: number; skipped: number }> {
    try {
      await db.apply(batch.map((p) => p.change));
      return { written: batch.length, skipped: 0 };
    } catch (err) {
      if (!isDataError(err)) throw err;
      if (batch.length === 1) {
        const [p] = batch as [Parsed];
        log.error({ err, entry: p.id, jobId: p.change.jobId }, "history change refused: skipped");
        return { written: 0, skipped: 1 };
      }
      const half = Math.ceil(batch.length / 2);
      const a = await write(batch.slice(0, half));
      const b = await write(batch.slice(half));
      return { written: a.written + b.written, skipped: a.skipped + b.skipped };
    }
  }

  async function loop(): Promise<void> {
    let migrated = false;
    let backoff = 100;
    let failing = false;
    // Our own pending entries first (a batch that failed, or one a restart left behind).
    let backlog = true;
    let nextClaim = Date.now() + claimIdleMs / 4;
    let nextPrune = 0;
    while (running) {
      try {
        if (!migrated) {
          await ensureGroup();
          const applied = await db.migrate();
          if (applied.length > 0) log.info({ applied }, "history migrations applied");
          migrated = true;
        }
        if (Date.now() >= nextClaim) {
          nextClaim = Date.now() + claimIdleMs / 4;
          const claimed = (await redis.call(
            "XAUTOCLAIM",
            stream,
            HISTORY_GROUP,
            consumer,
            claimIdleMs,
            "0-0",
            "COUNT",
            batch,
            "JUSTID",
          )) as [string, string[]];
          if ((claimed[1] ?? []).length > 0) backlog = true;
        }
        if ((opts.retentionDays ?? 0) > 0 && Date.now() >= nextPrune) {
          nextPrune = Date.now() + PRUNE_INTERVAL_MS;
          const pruned = await db.prune(opts.retentionDays ?? 0);
          if (pruned > 0) log.info({ pruned }, "history past its retention deleted");
        }
        const entries = await read(backlog ? "0" : ">");
        if (entries.length === 0) {
          backlog = false;
          continue;
        }
        const parsed: Parsed[] = [];
        let lost = 0;
        for (const [id, fields] of entries) {
          // An entry trimmed by the outbox's length cap while pending reads as null.
          let change: HistoryChange | undefined;
          try {
            change = fields === null ? undefined : changeFromFields(fields);
          } catch {
            change = undefined;
          }
          if (change !== undefined) parsed.push({ id, change });
          else lost += 1;
        }
        if (lost > 0) log.warn({ lost }, "history outbox entries unreadable or trimmed: skipped");
        const result = await write(parsed);
        // Counted once committed, before the entries leave the outbox: whoever sees the
        // outbox empty also sees the counts that emptied it.
        written += result.written;
        opts.metrics?.written(result.written);
        if (lost + result.skipped > 0) opts.metrics?.skipped(lost + result.skipped);
        const ids = entries.map(([id]) => id);
        await redis.xack(stream, HISTORY_GROUP, ...ids);
        await redis.xdel(stream, ...ids);
        if (failing) log.info("history writer writes again");
        failing = false;
        backoff = 100;
      } catch (err) {
        if (!running) break;
        if (String((err as Error).message).includes("NOGROUP")) migrated = false;
        // One line per outage, not one per retry: the outbox keeps every change meanwhile.
        if (!failing) log.warn({ err }, "history writer cannot write: retrying");
        opts.metrics?.writeFailed();
        failing = true;
        backlog = true;
        await pause(backoff);
        backoff = Math.min(backoff * 2, MAX_BACKOFF_MS);
      }
    }
  }

  const done = loop();
  return {
    get written() {
      return written;
    },
    async stop() {
      running = false;
      wake?.();
      // Ends a blocked XREADGROUP at once instead of after BLOCK_MS.
      redis.disconnect();
      // A write stuck on a hung PostgreSQL must not hold the worker's shutdown: what it
      // had read stays pending in the outbox, and another writer takes it over.
      await Promise.race([done, delay(STOP_WAIT_MS)]);
      await Promise.race([db.close().catch(() => undefined), delay(STOP_WAIT_MS)]);
    },
  };
}

/**
 * How far behind the history is: entries in the outbox and the age of the oldest. Written
 * entries are deleted, so the first one left is the oldest change not yet written.
 */
export async function historyOutboxState(
  redis: RedisClient,
  stream: string,
): Promise<{ entries: number; oldestAgeMs: number }> {
  const [entries, first] = await Promise.all([
    redis.xlen(stream),
    redis.xrange(stream, "-", "+", "COUNT", 1),
  ]);
  const id = first[0]?.[0];
  const at = id !== undefined ? Number(id.split("-")[0]) : Date.now();
  return { entries, oldestAgeMs: Math.max(0, Date.now() - at) };
}
