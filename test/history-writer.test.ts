import { randomUUID } from "node:crypto";
import { pino } from "pino";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { HistoryDb } from "../core/history.js";
import { createMetricsRegistry, registerHistoryMetrics } from "../core/metrics.js";
import { createRedis, type RedisClient, waitForRedis } from "../core/redis.js";
import { type LocalPostgres, startPostgres } from "../local/postgres-server.js";
import { type LocalRedis, startRedis } from "../local/redis-server.js";
import { HISTORY_GROUP, historyOutboxState, startHistoryWriter } from "../worker/history-writer.js";

// The history writer between a real Redis outbox and a real PostgreSQL: entries that
// PostgreSQL refuses do not stop it, and entries a dead writer read are taken over.

const silent = pino({ level: "silent" });
let redisServer: LocalRedis;
let pgServer: LocalPostgres;
let redis: RedisClient;
let db: HistoryDb;

beforeAll(async () => {
  [redisServer, pgServer] = await Promise.all([startRedis(), startPostgres()]);
  redis = createRedis(redisServer.url, { role: "api" });
  await waitForRedis(redis);
  db = new HistoryDb(pgServer.url);
  await db.migrate();
}, 180_000);

afterAll(async () => {
  redis?.disconnect();
  await db?.close();
  await Promise.allSettled([redisServer?.stop(), pgServer?.destroy()]);
});

/** An outbox entry as core/lua/transition.lua writes it: the record's hash fields. */
function entry(jobId: string, over: Record<string, string> = {}): string[] {
  const fields: Record<string, string> = {
    id: jobId,
    owner: "writer-test",
    state: "COMPLETED",
    fileIds: "[1,2]",
    version: "5",
    attempts: "1",
    createdAt: String(Date.now() - 2000),
    startedAt: String(Date.now() - 1500),
    endedAt: String(Date.now() - 100),
    updatedAt: String(Date.now() - 100),
    progress: JSON.stringify({ bytesTotal: 42, bytesDone: 42, filesDone: 2, filesTotal: 2 }),
    result: JSON.stringify({ key: "k", fileName: "f.zip", sizeBytes: 99, sha256: "x" }),
    ...over,
  };
  return Object.entries(fields).flat();
}

async function rows(ids: string[]): Promise<string[]> {
  const { rows } = await db.pool.query(
    "SELECT job_id FROM download_jobs WHERE job_id = ANY($1) ORDER BY job_id",
    [ids],
  );
  return rows.map((r) => r.job_id);
}

const newStream = () => `w${randomUUID().slice(0, 8)}:history:outbox`;

describe("history writer", () => {
  test("skips the changes PostgreSQL refuses as data, writes the rest, and counts both", async () => {
    const stream = newStream();
    await redis.xgroup("CREATE", stream, HISTORY_GROUP, "0", "MKSTREAM");
    const good = [randomUUID(), randomUUID(), randomUUID()];
    const bad = [randomUUID(), randomUUID()];
    await redis.xadd(stream, "*", ...entry(good[0] as string));
    await redis.xadd(stream, "*", ...entry(bad[0] as string, { fileIds: "[1.5]" }));
    await redis.xadd(stream, "*", ...entry(good[1] as string));
    await redis.xadd(stream, "*", ...entry(bad[1] as string, { createdAt: "1e300" }));
    await redis.xadd(stream, "*", ...entry(good[2] as string));
    const registry = createMetricsRegistry();
    const writerRedis = createRedis(redisServer.url, { role: "worker" });
    const writer = startHistoryWriter({
      redis: writerRedis,
      stream,
      db: new HistoryDb(pgServer.url),
      log: silent,
      metrics: registerHistoryMetrics(registry, {
        outbox: () => historyOutboxState(redis, stream),
      }),
    });
    try {
      await expect.poll(() => redis.xlen(stream), { timeout: 60_000 }).toBe(0);
      expect(await rows([...good, ...bad])).toEqual([...good].sort());
      const text = await registry.metrics();
      expect(text).toMatch(/^history_changes_written_total 3$/m);
      expect(text).toMatch(/^history_changes_skipped_total 2$/m);
      expect(text).toMatch(/^history_outbox_entries 0$/m);
      expect(text).toMatch(/^history_outbox_lag_seconds 0$/m);
    } finally {
      await writer.stop();
    }
  });

  test("takes over the changes a writer read and never acknowledged (it died)", async () => {
    const stream = newStream();
    await redis.xgroup("CREATE", stream, HISTORY_GROUP, "0", "MKSTREAM");
    const ids = [randomUUID(), randomUUID()];
    for (const id of ids) await redis.xadd(stream, "*", ...entry(id));
    // The dead writer: it read both and stopped before writing them.
    const read = await redis.xreadgroup(
      "GROUP",
      HISTORY_GROUP,
      "dead-writer",
      "COUNT",
      10,
      "STREAMS",
      stream,
      ">",
    );
    expect((read as [string, unknown[]][])[0]?.[1]).toHaveLength(2);
    const writer = startHistoryWriter({
      redis: createRedis(redisServer.url, { role: "worker" }),
      stream,
      db: new HistoryDb(pgServer.url),
      log: silent,
      claimIdleMs: 400,
    });
    try {
      await expect.poll(() => rows(ids), { timeout: 60_000 }).toEqual([...ids].sort());
      await expect.poll(() => redis.xlen(stream), { timeout: 60_000 }).toBe(0);
      expect(writer.written).toBe(2);
    } finally {
      await writer.stop();
    }
  });
});
