import { Queue, Worker } from "bullmq";
import type { Redis } from "ioredis";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { ConfigError, loadConfig } from "../core/config.js";
import { createRedis, type RedisClient, redisTargetFrom } from "../core/redis.js";
import { type LocalRedisSentinel, startRedisSentinel } from "../local/redis-sentinel.js";

// Sentinels and data nodes that require passwords, as production Sentinel set-ups do:
// the Sentinels' own in their redis:// URLs, the primary's in REDIS_PASSWORD. Real
// redis-server processes (requirepass on every node and Sentinel, masterauth on the
// replica, auth-pass in the Sentinel's monitor).

const DATA_PASSWORD = "data-secret";
const SENTINEL_PASSWORD = "sentinel-secret";

let sn: LocalRedisSentinel;
const open: RedisClient[] = [];

beforeAll(async () => {
  sn = await startRedisSentinel({
    replicas: 1,
    sentinels: 1,
    password: DATA_PASSWORD,
    sentinelPassword: SENTINEL_PASSWORD,
  });
});

afterAll(async () => {
  for (const c of open) c.disconnect();
  await sn?.stop();
});

function connect(env: Record<string, string>, role: "api" | "worker" = "worker"): Redis {
  const target = redisTargetFrom(loadConfig(env));
  if (target === undefined) throw new Error("no Redis target");
  const conn = createRedis(target, { role }) as Redis;
  conn.on("error", () => undefined);
  open.push(conn);
  return conn;
}

describe("Redis through Sentinels that require passwords", () => {
  test("with both passwords, commands reach the primary and a BullMQ job runs", async () => {
    const env = {
      REDIS_SENTINELS: sn.sentinels.join(","),
      REDIS_SENTINEL_NAME: sn.name,
      REDIS_PASSWORD: DATA_PASSWORD,
    };
    expect(sn.sentinels[0]).toMatch(/^redis:\/\/:sentinel-secret@127\.0\.0\.1:\d+$/);
    const conn = connect(env, "api");
    await conn.set("auth-check", "yes");
    expect(await conn.get("auth-check")).toBe("yes");
    // The server that answered is the primary the Sentinels name.
    const port = /tcp_port:(\d+)/.exec(await conn.info("server"))?.[1];
    expect(`127.0.0.1:${port}`).toBe(await sn.primary());

    // BullMQ duplicates the connection it is given: the copies must authenticate too.
    const queue = new Queue("auth-q", { connection: connect(env) });
    const worker = new Worker("auth-q", async (job) => `done ${job.data.n}`, {
      connection: connect(env),
    });
    try {
      const job = await queue.add("one", { n: 7 });
      await expect.poll(async () => (await queue.getJob(job.id ?? ""))?.returnvalue).toBe("done 7");
    } finally {
      await worker.close();
      await queue.close();
    }
  });

  test("without the primary's password, the connection reports NOAUTH", async () => {
    const errors: string[] = [];
    const target = redisTargetFrom(
      loadConfig({ REDIS_SENTINELS: sn.sentinels.join(","), REDIS_SENTINEL_NAME: sn.name }),
    );
    const conn = createRedis(target as NonNullable<typeof target>, { role: "worker" }) as Redis;
    open.push(conn);
    conn.on("error", (err: Error) => errors.push(err.message));
    await expect.poll(() => errors.join("\n")).toMatch(/NOAUTH|Authentication required/);
  });

  test("without the Sentinels' password, asking them for the primary fails", async () => {
    const errors: string[] = [];
    const bare = sn.sentinels.map((s) => s.replace(/^redis:\/\/:[^@]*@/, ""));
    const target = redisTargetFrom(
      loadConfig({
        REDIS_SENTINELS: bare.join(","),
        REDIS_SENTINEL_NAME: sn.name,
        REDIS_PASSWORD: DATA_PASSWORD,
      }),
    );
    const conn = createRedis(target as NonNullable<typeof target>, { role: "worker" }) as Redis;
    open.push(conn);
    conn.on("error", (err: Error) => errors.push(err.message));
    await expect
      .poll(() => errors.join("\n"))
      .toMatch(/NOAUTH|Authentication required|All sentinels are unreachable/);
  });

  test("bad settings are refused at start, saying what to do", () => {
    expect(() => loadConfig({ REDIS_URL: "redis://127.0.0.1:6379", REDIS_PASSWORD: "x" })).toThrow(
      ConfigError,
    );
    expect(() => loadConfig({ REDIS_URL: "redis://127.0.0.1:6379", REDIS_PASSWORD: "x" })).toThrow(
      /only with REDIS_SENTINELS; put credentials in REDIS_URL/,
    );
    // A password and TLS together (test/redis-sentinel-tls.test.ts runs TLS).
    expect(
      loadConfig({ REDIS_SENTINELS: "rediss://:p@10.0.0.5:26379", REDIS_SENTINEL_NAME: "m" })
        .REDIS_SENTINELS,
    ).toEqual(["rediss://:p@10.0.0.5:26379"]);
    expect(() =>
      loadConfig({ REDIS_SENTINELS: "redis://10.0.0.5", REDIS_SENTINEL_NAME: "m" }),
    ).toThrow(/host:port of each Sentinel/);
  });
});
