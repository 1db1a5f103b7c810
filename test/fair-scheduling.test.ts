import { createHash } from "node:crypto";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createConnectTransport, createGrpcTransport } from "@connectrpc/connect-node";
import { type Queue, Worker } from "bullmq";
import { pino } from "pino";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { loadConfig, type OwnerSettings, ownerSettingsFrom } from "../core/config.js";
import { JobService } from "../core/job-service.js";
import { JobStore } from "../core/job-store.js";
import type { JobRecord } from "../core/jobs.js";
import {
  type BundleJobData,
  createBundleQueue,
  QUEUE_NAME,
  type SchedulerOptions,
} from "../core/queue.js";
import { createRedis, type RedisClient } from "../core/redis.js";
import { DownloadService } from "../gen/downloads/v1/download_service_pb.js";
import { type RunningWorker, startWorker } from "../worker/worker.js";
import { type ApiStack, startApiStack } from "./helpers/api.js";
import { type Services, startServices } from "./helpers/services.js";
import { bearer } from "./helpers/trust.js";

// Fair scheduling across owners (core/queue.ts, core/lua/fair-enqueue.lua): an owner's
// backlog cannot make another owner's job wait behind all of it. Checked on the order
// in which jobs leave the queue, never on elapsed time.

const silent = pino({ level: "silent" });

interface Stack {
  redis: RedisClient;
  store: JobStore;
  queue: Queue<BundleJobData>;
  prefix: string;
  initiate(owner: string, priority?: number): Promise<JobRecord>;
  /** Job ids in the order the workers will take them, the next one first. */
  order(): Promise<string[]>;
  close(): Promise<void>;
}

let svc: Services;
const open: Stack[] = [];

beforeAll(async () => {
  svc = await startServices();
  await svc.putSource(1, 512);
});

afterAll(async () => {
  for (const s of open) await s.close();
  await svc?.stop();
});

async function stack(
  scheduling: SchedulerOptions,
  settings: Record<string, Partial<OwnerSettings>> = {},
  prefix = svc.config().QUEUE_PREFIX,
): Promise<Stack> {
  const redis = createRedis(svc.redisTarget, { role: "api" });
  const store = new JobStore(redis, { prefix, recordTtlSeconds: 3600 });
  const queue = createBundleQueue(redis, { prefix, attempts: 3, backoffMs: 50 });
  const service = new JobService({
    store,
    queue,
    redis,
    maxFilesPerJob: 10,
    policy: { dedupInFlight: false, reuseResults: false },
    scheduling,
    ownerSettings: (owner) => ({ maxPriority: 9, weight: 1, ...settings[owner] }),
  });
  const s: Stack = {
    redis,
    store,
    queue,
    prefix,
    initiate: async (owner, priority = 0) =>
      (await service.initiate(owner, { fileIds: [1], priority })).job,
    async order() {
      const wait = await redis.lrange(queue.keys.wait as string, 0, -1);
      const prio = await redis.zrange(queue.keys.prioritized as string, 0, -1);
      return [...wait.reverse(), ...prio];
    },
    async close() {
      await queue.close();
      redis.disconnect();
    },
  };
  open.push(s);
  return s;
}

async function initiateMany(s: Stack, owner: string, n: number, priority = 0): Promise<string[]> {
  const ids: string[] = [];
  for (let i = 0; i < n; i++) ids.push((await s.initiate(owner, priority)).id);
  return ids;
}

describe("the queue's order", () => {
  test("200 jobs of A, then 1 of B: B is second in line; without fair scheduling, last", async () => {
    const fair = await stack({ fair: true });
    await initiateMany(fair, "owner-a", 200);
    const b = await fair.initiate("owner-b");
    const order = await fair.order();
    expect(order).toHaveLength(201);
    expect(order.indexOf(b.id)).toBeLessThanOrEqual(1);

    const fifo = await stack({ fair: false });
    await initiateMany(fifo, "owner-a", 200);
    const late = await fifo.initiate("owner-b");
    expect((await fifo.order()).indexOf(late.id)).toBe(200);
  });

  test("owners with backlogs take turns, one job each per round", async () => {
    const s = await stack({ fair: true });
    const a = await initiateMany(s, "a", 6);
    const b = await initiateMany(s, "b", 3);
    const c = await initiateMany(s, "c", 2);
    const owner = new Map<string, string>();
    for (const [name, ids] of [
      ["a", a],
      ["b", b],
      ["c", c],
    ] as const)
      for (const id of ids) owner.set(id, name);
    const order = (await s.order()).map((id) => owner.get(id));
    expect(order.join("")).toBe("abcabcabaaa");
  });

  test("a higher priority goes first; within it owners still take turns", async () => {
    const s = await stack({ fair: true });
    const low = await initiateMany(s, "a", 3);
    const highA = await initiateMany(s, "a", 3, 5);
    const highB = await s.initiate("b", 5);
    const top = await s.initiate("b", 9);
    const order = await s.order();
    expect(order[0]).toBe(top.id);
    expect(order.slice(1, 5)).toEqual([highA[0], highB.id, highA[1], highA[2]]);
    expect(order.slice(5)).toEqual(low);
    // The job carries its priority.
    expect((await s.store.get(top.id)).priority).toBe(9);
  });

  test("FIFO mode still puts a higher priority first", async () => {
    const s = await stack({ fair: false });
    const low = await initiateMany(s, "a", 2);
    const high = await s.initiate("b", 3);
    expect(await s.order()).toEqual([high.id, ...low]);
  });

  test("an owner of weight 3 gets three places per round against weight 1", async () => {
    const s = await stack({ fair: true }, { heavy: { weight: 3 } });
    const heavy = new Set(await initiateMany(s, "heavy", 40));
    await initiateMany(s, "light", 40);
    const first = (await s.order()).slice(0, 40);
    const heavyShare = first.filter((id) => heavy.has(id)).length;
    expect(heavyShare).toBeGreaterThanOrEqual(29);
    expect(heavyShare).toBeLessThanOrEqual(31);
  });

  test("turns stay right while rounds are moved down many times (a band of 8 rounds)", async () => {
    const s = await stack({ fair: true, bandSize: 8 });
    const conn = createRedis(svc.redisTarget, { role: "worker" });
    const worker = new Worker<BundleJobData>(QUEUE_NAME, null, {
      connection: conn,
      prefix: s.prefix,
      autorun: false,
    });
    try {
      const taken: string[] = [];
      const aIds: string[] = [];
      const waitsOfB: number[] = [];
      const take = async () => {
        const job = await worker.getNextJob("test-token", { block: false });
        if (job?.id === undefined) throw new Error("nothing to take");
        taken.push(job.id);
        await job.moveToCompleted("done", "test-token", false);
      };
      // A keeps one or two jobs waiting; B adds one every third step; one job leaves per
      // step. Rounds grow by about one a step, so the 8-round band is shifted about every
      // four steps.
      await initiateMany(s, "a", 1).then((ids) => aIds.push(...ids));
      for (let step = 0; step < 60; step++) {
        aIds.push((await s.initiate("a")).id);
        if (step % 3 === 0) {
          const b = await s.initiate("b");
          const before = taken.length;
          while (!taken.includes(b.id)) await take();
          waitsOfB.push(taken.length - before - 1);
        } else {
          await take();
        }
        const prio = await s.redis.zrange(s.queue.keys.prioritized as string, 0, -1, "WITHSCORES");
        for (let i = 1; i < prio.length; i += 2) {
          const p = Math.floor(Number(prio[i]) / 2 ** 32);
          expect(p).toBeGreaterThanOrEqual(9 * 8 + 1);
          expect(p).toBeLessThan(10 * 8 + 1);
        }
      }
      // B never waits behind more than A's job of the current round.
      expect(Math.max(...waitsOfB)).toBeLessThanOrEqual(1);
      // A's own jobs leave in the order A queued them.
      const aTaken = taken.filter((id) => aIds.includes(id));
      expect(aTaken).toEqual(aIds.slice(0, aTaken.length));
    } finally {
      await worker.close();
      conn.disconnect();
    }
  });
});

describe("with a real worker", () => {
  let worker: RunningWorker | undefined;
  afterAll(async () => {
    await worker?.close();
  });

  test("200 jobs of A are running; B's single job starts within the next job slots", async () => {
    const concurrency = 2;
    // Each job reads its 512-byte file at 2 KB/s, so A's backlog lasts far longer than
    // the test takes to add B's job.
    const cfg = svc.config({
      WORKER_CONCURRENCY: String(concurrency),
      THROTTLE_BYTES_PER_SECOND: "2048",
    });
    const s = await stack({ fair: true }, {}, cfg.QUEUE_PREFIX);
    worker = await startWorker(cfg, silent);
    const a = await initiateMany(s, "owner-a", 200);
    // The workers are well into A's backlog.
    await expect
      .poll(async () => (await s.store.get(a[3] ?? "")).state, { timeout: 60_000, interval: 50 })
      .toBe("COMPLETED");
    const b = await s.initiate("owner-b");
    await expect
      .poll(async () => (await s.store.get(b.id)).state, { timeout: 60_000, interval: 50 })
      .toBe("COMPLETED");
    // BullMQ's event stream has every job's "added" and "active" in the order they
    // happened: count A's starts between B's arrival and B's start.
    const events = await s.redis.xrange(`${s.prefix}:${QUEUE_NAME}:events`, "-", "+");
    const seq = events.map(([, fields]) => {
      const f = new Map<string, string>();
      for (let i = 0; i + 1 < fields.length; i += 2) f.set(fields[i] ?? "", fields[i + 1] ?? "");
      return { event: f.get("event"), jobId: f.get("jobId") };
    });
    const added = seq.findIndex((e) => e.event === "added" && e.jobId === b.id);
    const started = seq.findIndex((e) => e.event === "active" && e.jobId === b.id);
    expect(added).toBeGreaterThanOrEqual(0);
    expect(started).toBeGreaterThan(added);
    const aStartsBetween = seq
      .slice(added, started)
      .filter((e) => e.event === "active" && e.jobId !== b.id).length;
    expect(aStartsBetween).toBeLessThanOrEqual(concurrency);
    // And A's backlog was still long when B came: B did not simply wait for it.
    const before = seq.slice(0, added);
    const aWaiting =
      before.filter((e) => e.event === "added").length -
      before.filter((e) => e.event === "active").length;
    expect(aWaiting).toBeGreaterThan(100);
  });
});

describe("Initiate's priority, over the API", () => {
  const BOSS = "boss-token-7d1e4a9c2b5f8e3a";
  const PLAIN = "plain-token-2c9f5e1a7b3d8c4e";
  let st: ApiStack;
  beforeAll(async () => {
    const hash = (t: string) => createHash("sha256").update(t).digest("hex");
    st = await startApiStack(
      { AUTH_TOKENS: `boss:${hash(BOSS)}:max_priority=5:weight=2,plain:${hash(PLAIN)}` },
      { services: svc },
    );
  });
  afterAll(async () => {
    await st?.stop();
  });

  const client = (token: string, kind: "connect" | "grpc" = "connect") =>
    createClient(
      DownloadService,
      kind === "connect"
        ? createConnectTransport({
            baseUrl: st.server.url,
            httpVersion: "1.1",
            interceptors: [bearer(token)],
          })
        : createGrpcTransport({ baseUrl: st.server.url, interceptors: [bearer(token)] }),
    );
  const errorOf = async (p: Promise<unknown>) =>
    ConnectError.from(
      await p.then(
        () => new Error("succeeded"),
        (e: unknown) => e,
      ),
    );

  test("up to the owner's maximum it is kept and returned on the job; above it PERMISSION_DENIED names the maximum", async () => {
    const made = await client(BOSS).initiate({ fileIds: [1], priority: 5 });
    expect(made.job?.priority).toBe(5);
    const status = await client(BOSS, "grpc").getStatus({ jobId: made.job?.jobId ?? "" });
    expect(status.job?.priority).toBe(5);
    // A job of priority 5 goes before the priority-0 ones queued earlier.
    const low = await client(BOSS).initiate({ fileIds: [1] });
    expect(low.job?.priority).toBe(0);
    const top = await client(BOSS).initiate({ fileIds: [1], priority: 4 });
    const order = await st.redis.zrange(st.queue.keys.prioritized as string, 0, -1);
    expect(order.indexOf(top.job?.jobId ?? "")).toBeLessThan(order.indexOf(low.job?.jobId ?? ""));

    const above = await errorOf(client(BOSS).initiate({ fileIds: [1], priority: 6 }));
    expect(above.code).toBe(Code.PermissionDenied);
    expect(above.rawMessage).toMatch(/your maximum is 5/);
    const plain = await errorOf(client(PLAIN, "grpc").initiate({ fileIds: [1], priority: 1 }));
    expect(plain.code).toBe(Code.PermissionDenied);
    expect(plain.rawMessage).toMatch(/your maximum is 0/);
  });

  test("plain JSON callers send and read it too; out of range is INVALID_ARGUMENT", async () => {
    const post = (token: string, body: unknown) =>
      fetch(`${st.server.url}/downloads.v1.DownloadService/Initiate`, {
        method: "POST",
        headers: { "content-type": "application/json", authorization: `Bearer ${token}` },
        body: JSON.stringify(body),
      });
    const ok = await post(BOSS, { fileIds: [1], priority: 3 });
    expect(ok.status).toBe(200);
    expect(((await ok.json()) as { job: { priority: number } }).job.priority).toBe(3);
    const denied = await post(PLAIN, { fileIds: [1], priority: 2 });
    expect(denied.status).toBe(403);
    expect(((await denied.json()) as { code: string }).code).toBe("permission_denied");
    const bad = await post(BOSS, { fileIds: [1], priority: 10 });
    expect(bad.status).toBe(400);
    expect(((await bad.json()) as { message: string }).message).toMatch(/0 .* to 9/);
  });
});

describe("per-owner settings in AUTH_TOKENS", () => {
  const h = "a".repeat(64);
  test.each([
    [`a:${h}:max_priority=3:weight=2`, { owner: "a", sha256: h, maxPriority: 3, weight: 2 }],
    [`a:${h}:weight=7`, { owner: "a", sha256: h, weight: 7 }],
    [`a:${h}`, { owner: "a", sha256: h }],
  ])("%s is read", (raw, entry) => {
    expect(loadConfig({ AUTH_TOKENS: raw }).AUTH_TOKENS).toEqual([entry]);
  });

  test.each([
    [`a:${h}:max_priority=10`, /"max_priority=10" is not a setting/],
    [`a:${h}:weight=0`, /"weight=0" is not a setting/],
    [`a:${h}:speed=3`, /"speed=3" is not a setting/],
    [`a:${h}:max_priority=2,a:${"b".repeat(64)}:max_priority=3`, /different max_priority/],
  ])("%s is refused: %s", (raw, message) => {
    expect(() => loadConfig({ AUTH_TOKENS: raw })).toThrow(message);
  });

  test("owners without settings get DEFAULT_MAX_PRIORITY and weight 1", () => {
    const cfg = loadConfig({
      AUTH_TOKENS: `a:${h}:max_priority=4,b:${"b".repeat(64)}`,
      DEFAULT_MAX_PRIORITY: "2",
    });
    const of = ownerSettingsFrom(cfg.AUTH_TOKENS ?? [], {
      maxPriority: cfg.DEFAULT_MAX_PRIORITY,
      weight: 1,
    });
    expect(of("a")).toEqual({ maxPriority: 4, weight: 1 });
    expect(of("b")).toEqual({ maxPriority: 2, weight: 1 });
    expect(of("anonymous")).toEqual({ maxPriority: 2, weight: 1 });
  });
});
