import http from "node:http";
import type { AddressInfo, Socket } from "node:net";
import { pino } from "pino";
import { afterAll, beforeAll, expect, test } from "vitest";
import { JobService } from "../core/job-service.js";
import { JobStore } from "../core/job-store.js";
import { createBundleQueue } from "../core/queue.js";
import { createRedis, type RedisClient } from "../core/redis.js";
import { checkWebhookUrl } from "../core/webhook-target.js";
import { type RunningWorker, startWorker } from "../worker/worker.js";
import { type Services, startServices } from "./helpers/services.js";

// Webhook delivery is fair across owners: receivers of one owner that never answer hold
// that owner's delivery slots (WEBHOOK_MAX_IN_FLIGHT_PER_OWNER), not the workers'. Before,
// 60 such jobs delayed another owner's webhook from 0.4 s to 27 s. Checked on what the
// receivers see and what the jobs record, never on elapsed time.

const silent = pino({ level: "silent" });
const CAP = 3;
const HUNG_JOBS = 40;

let svc: Services;
let worker: RunningWorker | undefined;
let redis: RedisClient;
let receiver: http.Server;
let base: string;
const sockets = new Set<Socket>();
/** Requests to /hang/... that are open right now, and the most ever open at once. */
let hangingNow = 0;
let hangingMax = 0;
let hangingSeen = 0;
const delivered: string[] = [];
/** Set when the test is over: a delivery that comes now is cut at once. */
let closing = false;

beforeAll(async () => {
  svc = await startServices();
  receiver = http.createServer((req, res) => {
    req.resume();
    if (closing) {
      req.socket.destroy();
      return;
    }
    if (req.url?.startsWith("/hang/")) {
      // Never answers: the delivery waits for WEBHOOK_TIMEOUT_MS.
      hangingNow += 1;
      hangingSeen += 1;
      hangingMax = Math.max(hangingMax, hangingNow);
      req.socket.once("close", () => {
        hangingNow -= 1;
      });
      return;
    }
    req.on("end", () => {
      delivered.push(req.url ?? "");
      res.writeHead(200).end();
    });
  });
  receiver.on("connection", (s: Socket) => {
    sockets.add(s);
    s.once("close", () => sockets.delete(s));
  });
  await new Promise<void>((ok) => receiver.listen(0, "127.0.0.1", ok));
  base = `http://127.0.0.1:${(receiver.address() as AddressInfo).port}`;
});

afterAll(async () => {
  // The hung deliveries end once their sockets do; then the worker can close.
  closing = true;
  for (const s of sockets) s.destroy();
  await worker?.close();
  redis?.disconnect();
  await new Promise<void>((ok) => receiver.close(() => ok()));
  await svc?.stop();
});

test("one owner's receivers that never answer do not hold up another owner's webhook", async () => {
  const cfg = svc.config({
    WEBHOOK_SECRET: "webhook-secret-for-fairness-tests",
    WEBHOOK_ALLOWED_HOSTS: "127.0.0.1/32",
    // Longer than the test: a hung delivery stays hung.
    WEBHOOK_TIMEOUT_MS: "600000",
    WEBHOOK_MAX_IN_FLIGHT_PER_OWNER: String(CAP),
  });
  redis = createRedis(svc.redisTarget, { role: "api" });
  const store = new JobStore(redis, { prefix: cfg.QUEUE_PREFIX, recordTtlSeconds: 3600 });
  const queue = createBundleQueue(redis, { prefix: cfg.QUEUE_PREFIX, attempts: 1, backoffMs: 0 });
  const jobs = new JobService({
    store,
    queue,
    redis,
    maxFilesPerJob: 10,
    policy: { dedupInFlight: false, reuseResults: false },
    checkCallbackUrl: async (url) =>
      (await checkWebhookUrl(url, { allowPrivate: false, allowedHosts: ["127.0.0.1/32"] })).url
        .href,
  });
  worker = await startWorker(cfg, silent);
  // Jobs of files that do not exist fail at once, and their webhooks are owed.
  const hung: string[] = [];
  for (let i = 0; i < HUNG_JOBS; i++) {
    const { job } = await jobs.initiate("owner-a", {
      fileIds: [900_000 + i],
      callbackUrl: `${base}/hang/${i}`,
    });
    hung.push(job.id);
  }
  // A's deliveries have started and hang.
  await expect
    .poll(() => hangingSeen, { timeout: 60_000, interval: 50 })
    .toBeGreaterThanOrEqual(CAP);
  await expect
    .poll(
      async () => {
        const states = await Promise.all(hung.map(async (id) => (await store.get(id)).state));
        return states.every((s) => s === "FAILED");
      },
      { timeout: 60_000, interval: 100 },
    )
    .toBe(true);

  const { job: b } = await jobs.initiate("owner-b", {
    fileIds: [999_999],
    callbackUrl: `${base}/ok/b`,
  });
  await expect
    .poll(async () => (await store.get(b.id)).webhook?.state, { timeout: 60_000, interval: 50 })
    .toBe("DELIVERED");
  expect(delivered).toEqual(["/ok/b"]);
  // Every one of A's deliveries is still waiting on its receiver or for a slot: none
  // ended, and never more than A's cap were open at once.
  for (const id of hung) expect((await store.get(id)).webhook?.state).toBe("PENDING");
  expect(hangingMax).toBeLessThanOrEqual(CAP);
  expect(hangingNow).toBe(CAP);
  await queue.close();
});
