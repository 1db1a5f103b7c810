import { setTimeout as sleep } from "node:timers/promises";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { JobStore } from "../core/job-store.js";
import { createJob, markProcessing } from "../core/job-transitions.js";
import { newJobId } from "../core/jobs.js";
import { createLogger } from "../core/logger.js";
import { createRedis, type RedisClient, waitForRedis } from "../core/redis.js";
import { type WatchEvent, WatchHub } from "../server/watch-hub.js";
import { TEST_CONNECTION_NAME } from "./helpers/api.js";
import { type Services, startServices } from "./helpers/services.js";

// The watch hub when Redis is slow or its connection comes back (what a failover does
// to it): a watcher must still hear of every change of its job, above all its end.

const OWNER = "hub-test";
let svc: Services;
let redis: RedisClient;
let store: JobStore;

beforeAll(async () => {
  svc = await startServices();
  redis = createRedis(svc.redis.url, { role: "api", name: TEST_CONNECTION_NAME });
  await waitForRedis(redis);
  store = new JobStore(redis, { prefix: `hub${process.pid}`, recordTtlSeconds: 600 });
});

afterAll(async () => {
  redis?.disconnect();
  await svc?.stop();
});

async function newHub(heartbeatMs: number) {
  const sub = createRedis(svc.redis.url, { role: "subscriber", name: TEST_CONNECTION_NAME });
  sub.on("error", () => undefined);
  await waitForRedis(sub);
  const hub = new WatchHub(sub, store, { heartbeatMs, log: createLogger("silent", "test") });
  return {
    hub,
    close() {
      hub.close(new Error("test over"));
      sub.disconnect();
    },
  };
}

async function newJob(): Promise<string> {
  const id = newJobId();
  await createJob(store, id, [1], OWNER);
  return id;
}

function start(id: string) {
  return markProcessing(
    store,
    { jobId: id, token: "hub-test", checkLock: false },
    {
      progress: { filesDone: 0, filesTotal: 1, bytesDone: 0, bytesTotal: 1, bytesPerSecond: 0 },
      files: [],
      startedAt: Date.now(),
    },
  );
}

/** The stream's next event, or "nothing" if none comes within `ms`. */
async function nextWithin(
  stream: AsyncGenerator<WatchEvent>,
  ms: number,
): Promise<WatchEvent | "nothing"> {
  const next = await Promise.race([stream.next(), sleep(ms).then(() => "nothing" as const)]);
  return next === "nothing" ? next : (next.value as WatchEvent);
}

describe("WatchHub under a slow or failing Redis", () => {
  test("a watcher that comes back to its job while Redis is stalled still hears of every change", async () => {
    // What the Sentinel failover drill caught: during the outage a watch joins, fails
    // and leaves, so its channel's UNSUBSCRIBE is queued behind a SUBSCRIBE batch that
    // Redis has not answered yet. The client's retry must not join that earlier batch,
    // or it is subscribed, then unsubscribed, and never hears of its job again.
    const { hub, close } = await newHub(60_000);
    const abort = new AbortController();
    const first = new AbortController();
    const [a, x, y] = [await newJob(), await newJob(), await newJob()];
    let stopped = false;
    try {
      const w1 = hub.watch(a, 0, first.signal);
      expect(await w1.next()).toMatchObject({ value: { job: { id: a, version: 1 } } });

      // Redis stops answering: X's SUBSCRIBE is written and waits; Y's batch queues behind it.
      process.kill(svc.redis.pid, "SIGSTOP");
      stopped = true;
      const wx = hub.watch(x, 0, abort.signal);
      const px = wx.next();
      await sleep(50);
      const wy = hub.watch(y, 0, abort.signal);
      const py = wy.next();
      await sleep(50);
      // The watcher of A hangs up; its channel's UNSUBSCRIBE is queued after Y's batch.
      first.abort();
      expect(await w1.next()).toMatchObject({ done: true });
      await sleep(400);
      // ...and comes back (a client's retry) before Redis answers again.
      const w2 = hub.watch(a, 0, abort.signal);
      const p2 = w2.next();
      await sleep(50);
      process.kill(svc.redis.pid, "SIGCONT");
      stopped = false;

      expect(await p2).toMatchObject({ value: { job: { id: a, version: 1 } } });
      await Promise.all([px, py]);
      await start(a);
      expect(await nextWithin(w2, 20_000)).toMatchObject({
        job: { id: a, state: "PROCESSING", version: 2 },
      });
    } finally {
      if (stopped) process.kill(svc.redis.pid, "SIGCONT");
      abort.abort();
      close();
    }
  }, 60_000);

  test("a job that went back to an older version and then ended still ends its watch", async () => {
    // The watcher saw versions 2 and 3, then the primary died before they reached the
    // replica: the promoted one has version 1, and the job ends there at version 2, a
    // version the watcher has passed. Its end must still reach the watcher.
    const { hub, close } = await newHub(60_000);
    const abort = new AbortController();
    try {
      const id = await newJob();
      const stream = hub.watch(id, 0, abort.signal);
      expect(await stream.next()).toMatchObject({ value: { job: { id, version: 1 } } });
      const v1 = (await redis.hgetall(store.key(id))) as Record<string, string>;
      const seen: Array<[number, string]> = [];
      const drained = (async () => {
        for await (const ev of stream) if (ev.job) seen.push([ev.job.version, ev.job.state]);
      })();
      // Should the test fail before awaiting it, closing the hub ends it with an error.
      drained.catch(() => undefined);
      // One at a time: two changes of the same state that reach a watcher before it reads
      // are coalesced into the later one (as for any slow reader), and then the watcher
      // would not have passed version 2 before the job ends there.
      for (const version of [2, 3]) {
        await redis.publish(
          store.channel(id),
          JSON.stringify({ ...v1, state: "PROCESSING", version: String(version) }),
        );
        await expect.poll(() => seen.length, { timeout: 20_000 }).toBe(version - 1);
      }
      await redis.hset(store.key(id), { state: "COMPLETED", version: "2" });
      await redis.publish(
        store.channel(id),
        JSON.stringify({ ...v1, state: "COMPLETED", version: "2" }),
      );
      await drained;
      expect(seen).toEqual([
        [2, "PROCESSING"],
        [3, "PROCESSING"],
        [2, "COMPLETED"],
      ]);
    } finally {
      abort.abort();
      close();
    }
  }, 60_000);

  test("a job whose change was lost without a trace is re-read after a few silent heartbeats", async () => {
    // The last message of a job lost with nothing to show for it (no version gap after
    // it, no reconnect noticed): the watcher would wait for ever; the hub re-reads a
    // job it has heard nothing of for a few heartbeats.
    const { hub, close } = await newHub(200);
    const abort = new AbortController();
    try {
      const id = await newJob();
      const stream = hub.watch(id, 0, abort.signal);
      expect(await stream.next()).toMatchObject({ value: { job: { id, version: 1 } } });
      // The record changes and its message never comes.
      await redis.hset(store.key(id), {
        state: "CANCELLED",
        version: "2",
        endedAt: String(Date.now()),
      });
      const seen: Array<[number, string]> = [];
      for await (const ev of stream) if (ev.job) seen.push([ev.job.version, ev.job.state]);
      expect(seen).toEqual([[2, "CANCELLED"]]);
    } finally {
      abort.abort();
      close();
    }
  }, 60_000);
});
