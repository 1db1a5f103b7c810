import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { getCACertificates, setDefaultCACertificates } from "node:tls";
import { Queue, Worker } from "bullmq";
import type { Redis } from "ioredis";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { loadConfig } from "../core/config.js";
import { createRedis, type RedisClient, redisTargetFrom } from "../core/redis.js";
import { type LocalRedisSentinel, startRedisSentinel } from "../local/redis-sentinel.js";
import { makeTestCertificates } from "./helpers/tls.js";

// Sentinels and data nodes reached over TLS (rediss:// Sentinels), as managed and
// hardened Sentinel set-ups run: real redis-server processes with TLS ports and a
// private CA. The Sentinels watch the primary on its TLS port, so the address they name
// is one that only a TLS client can use, and the Sentinels are given by their TLS ports
// only: a command that succeeds went over TLS both ways.

let dir: string;
let sn: LocalRedisSentinel;
let caPem: string;
const open: RedisClient[] = [];

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), "dj-redis-tls-"));
  const tls = makeTestCertificates(dir);
  caPem = readFileSync(tls.ca, "utf8");
  sn = await startRedisSentinel({ replicas: 1, sentinels: 1, tls, downAfterMs: 1000 });
});

afterAll(async () => {
  for (const c of open) c.disconnect();
  await sn?.stop();
  if (dir !== undefined) rmSync(dir, { recursive: true, force: true });
});

function connect(role: "api" | "worker" = "worker"): { conn: Redis; errors: string[] } {
  const target = redisTargetFrom(
    loadConfig({ REDIS_SENTINELS: sn.sentinels.join(","), REDIS_SENTINEL_NAME: sn.name }),
  );
  if (target === undefined) throw new Error("no Redis target");
  const conn = createRedis(target, { role }) as Redis;
  const errors: string[] = [];
  conn.on("error", (err: Error) => errors.push(err.message));
  open.push(conn);
  return { conn, errors };
}

describe("Redis through Sentinels over TLS (rediss://)", () => {
  test("a certificate the client does not trust: no connection, and the log says why", async () => {
    // Before this file trusts the test CA (the next test): Node's own CAs only. ioredis
    // reports the failed handshake only as the Sentinels' connection closing; the
    // connection's own check of the handshake names the reason.
    expect(sn.sentinels[0]).toMatch(/^rediss:\/\/127\.0\.0\.1:\d+$/);
    const { conn, errors } = connect();
    await expect
      .poll(() => errors.join("\n"), { timeout: 30_000 })
      .toMatch(
        /TLS handshake with Sentinel 127\.0\.0\.1:\d+ failed: .*certificate.* \(a private CA goes in NODE_EXTRA_CA_CERTS\)/,
      );
    expect(errors.join("\n")).toMatch(/All sentinels are unreachable/);
    expect(conn.status).not.toBe("ready");
    conn.disconnect();
  });

  test("trusting the CA, commands reach the primary, a BullMQ job runs, and a failover is followed", async () => {
    // What NODE_EXTRA_CA_CERTS does for a deployment's processes.
    setDefaultCACertificates([...getCACertificates("default"), caPem]);
    const { conn } = connect("api");
    await conn.set("tls-check", "yes");
    expect(await conn.get("tls-check")).toBe("yes");
    const first = await sn.primary();
    expect(first).toBe(`127.0.0.1:${sn.tlsPort(sn.nodes[0] as (typeof sn.nodes)[number])}`);

    // BullMQ duplicates the connection it is given: the copies keep TLS.
    const queue = new Queue("tls-q", { connection: connect().conn });
    const worker = new Worker("tls-q", async (job) => `done ${job.data.n}`, {
      connection: connect().conn,
    });
    try {
      const job = await queue.add("one", { n: 3 });
      await expect.poll(async () => (await queue.getJob(job.id ?? ""))?.returnvalue).toBe("done 3");

      // The primary goes away; the Sentinels promote the replica (on its TLS port) and
      // the same connections carry on there.
      await sn.nodes[0]?.stop();
      await expect.poll(() => sn.primary(), { timeout: 60_000 }).not.toBe(first);
      await expect
        .poll(async () => conn.set("tls-after", "yes").then(() => conn.get("tls-after")), {
          timeout: 60_000,
        })
        .toBe("yes");
      const again = await queue.add("two", { n: 4 });
      await expect
        .poll(async () => (await queue.getJob(again.id ?? ""))?.returnvalue, { timeout: 60_000 })
        .toBe("done 4");
    } finally {
      await worker.close();
      await queue.close();
    }
  });

  test("TLS to some Sentinels and not to others is refused at start, saying what to do", () => {
    expect(() =>
      loadConfig({
        REDIS_SENTINELS: "rediss://10.0.0.5:26379,10.0.0.6:26379",
        REDIS_SENTINEL_NAME: "m",
      }),
    ).toThrow(/1 of 2 Sentinels are rediss:\/\/ URLs: .* write all of them as rediss:\/\//);
  });
});
