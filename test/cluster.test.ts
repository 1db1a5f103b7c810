import { HeadObjectCommand } from "@aws-sdk/client-s3";
import { createClient } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { ConfigError, loadConfig } from "../core/config.js";
import { createJob, markProcessing } from "../core/job-transitions.js";
import { newJobId } from "../core/jobs.js";
import { createLogger } from "../core/logger.js";
import { createRedis, waitForRedis } from "../core/redis.js";
import { DownloadService, type Job, JobState } from "../gen/downloads/v1/download_service_pb.js";
import { waitUntil } from "../local/ports.js";
import { WatchHub } from "../server/watch-hub.js";
import {
  type ApiStack,
  startApiStack,
  TEST_CONNECTION_NAME,
  withTestToken,
} from "./helpers/api.js";
import { STARTUP_MS } from "./helpers/deadline.js";
import { startServices } from "./helpers/services.js";
import { spawnWorker, type WorkerProcess } from "./helpers/worker-process.js";
import { readZip } from "./helpers/zip.js";

// The core flows on a Redis Cluster of three masters (Debian's redis-server, started
// here): the API in this process and a worker in another, both given only
// REDIS_CLUSTER_NODES and a hash-tagged QUEUE_PREFIX, as an operator would.

let st: ApiStack;
let worker: WorkerProcess;
const sources = new Map<number, Buffer>();

beforeAll(async () => {
  const svc = await startServices({ cluster: true });
  st = await startApiStack({ WATCH_HEARTBEAT_MS: "1000" }, { services: svc });
  for (const [id, size, name] of [
    [701, 1024 * 1024, "one.bin"],
    [702, 333_333, "two.txt"],
    [703, 6 * 1024 * 1024, "big.bin"],
  ] as const) {
    sources.set(id, await svc.putSource(id, size, name));
  }
  worker = spawnWorker({
    ...svc.env,
    QUEUE_PREFIX: st.cfg.QUEUE_PREFIX,
    LOG_LEVEL: "info",
    LOG_FORMAT: "json",
    THROTTLE_BYTES_PER_SECOND: String(4 * 1024 * 1024),
    PROGRESS_INTERVAL_MS: "100",
  });
  await waitUntil("worker ready", async () => worker.output().includes("worker ready"), STARTUP_MS);
});

afterAll(async () => {
  await worker?.kill("SIGTERM");
  await st?.stop();
  await st?.svc.stop();
});

const client = () =>
  createClient(
    DownloadService,
    createConnectTransport({
      baseUrl: st.server.url,
      httpVersion: "1.1",
      interceptors: [withTestToken],
    }),
  );

async function watchToEnd(jobId: string): Promise<Job[]> {
  const seen: Job[] = [];
  for await (const msg of client().watchJob({ jobId }))
    if (msg.event.case === "job") seen.push(msg.event.value);
  return seen;
}

describe("on a Redis Cluster", () => {
  test("runs on three masters, and the prefix puts every key of the deployment in one hash slot", async () => {
    expect(st.cfg.REDIS_CLUSTER_NODES).toHaveLength(3);
    expect(st.cfg.REDIS_URL).toBeUndefined();
    const info = (await st.redis.cluster("INFO")) as string;
    expect(info).toContain("cluster_state:ok");
    expect(info).toMatch(/cluster_size:3/);
    const { job } = await client().initiate({ fileIds: [702] });
    const jobId = job?.jobId ?? "";
    const slot = (key: string) => st.redis.cluster("KEYSLOT", key) as Promise<number>;
    const jobSlot = await slot(st.store.key(jobId));
    expect(await slot(`${st.cfg.QUEUE_PREFIX}:bundles:${jobId}`)).toBe(jobSlot);
    expect(await slot(`${st.cfg.QUEUE_PREFIX}:bundles:wait`)).toBe(jobSlot);
    await watchToEnd(jobId);
  });

  test("Initiate, then WatchJob through the cluster's pub/sub to COMPLETED, and the ZIP holds the exact sources", async () => {
    const { job } = await client().initiate({ fileIds: [701, 702] });
    const seen = await watchToEnd(job?.jobId ?? "");
    // Progress reached this API through the cluster's pub/sub, in version order.
    expect(seen.map((j) => j.state)).toContain(JobState.PROCESSING);
    const versions = seen.map((j) => j.version);
    expect(versions).toEqual([...versions].sort((x, y) => x - y));
    const last = seen.at(-1) as Job;
    expect(last.state).toBe(JobState.COMPLETED);
    const zip = await readZip(
      Buffer.from(await (await fetch(last.result?.downloadUrl ?? "")).arrayBuffer()),
    );
    expect(zip.get("one.bin")?.equals(sources.get(701) as Buffer)).toBe(true);
    expect(zip.get("two.txt")?.equals(sources.get(702) as Buffer)).toBe(true);
  });

  test("Cancel stops the running job in the worker process and leaves no result object", async () => {
    const c = client();
    const { job } = await c.initiate({ fileIds: [703] });
    const jobId = job?.jobId ?? "";
    await expect
      .poll(
        async () => {
          const j = (await c.getStatus({ jobId })).job;
          return j?.state === JobState.PROCESSING && (j.progress?.bytesDone ?? 0n) > 0n;
        },
        { interval: 50 },
      )
      .toBe(true);
    expect((await c.cancel({ jobId })).job?.state).toBe(JobState.CANCELLED);
    await expect.poll(() => st.queue.getJobState(jobId)).toBe("failed");
    expect((await st.queue.getJob(jobId))?.failedReason).toBe("cancelled");
    expect(worker.output()).toMatch(new RegExp(`"jobId":"${jobId}"[^\\n]*"msg":"cancel received"`));
    const head = await st.svc.storage.client
      .send(
        new HeadObjectCommand({
          Bucket: st.cfg.RESULT_BUCKET,
          Key: st.svc.storage.resultKey(jobId),
        }),
      )
      .then(
        () => "exists",
        (err: { name?: string }) => err.name,
      );
    expect(head).toBe("NotFound");
  });

  test("a missing source file fails the job with not_found", async () => {
    const { job } = await client().initiate({ fileIds: [702, 799_999] });
    const last = (await watchToEnd(job?.jobId ?? "")).at(-1);
    expect(last?.state).toBe(JobState.FAILED);
    expect(last?.error).toMatchObject({
      code: "not_found",
      retryable: false,
      missingFileIds: [799_999],
    });
  });

  test("a QUEUE_PREFIX without a hash tag is refused at start, naming the variable", async () => {
    const nodes = (st.cfg.REDIS_CLUSTER_NODES ?? []).join(",");
    expect(() => loadConfig({ REDIS_CLUSTER_NODES: nodes, QUEUE_PREFIX: "dj" })).toThrow(
      ConfigError,
    );
    expect(() => loadConfig({ REDIS_CLUSTER_NODES: nodes, QUEUE_PREFIX: "{}dj" })).toThrow(
      /QUEUE_PREFIX/,
    );
    expect(loadConfig({ REDIS_CLUSTER_NODES: nodes, QUEUE_PREFIX: "{dj}" }).QUEUE_PREFIX).toBe(
      "{dj}",
    );
    const bad = spawnWorker({ ...st.svc.env, QUEUE_PREFIX: "dj" });
    const code = await new Promise<number | null>((resolve) =>
      bad.child.once("exit", (c) => resolve(c)),
    );
    expect(code).toBe(2);
    expect(bad.output()).toContain("QUEUE_PREFIX");
  });
});

describe("WatchHub on a cluster's pub/sub", () => {
  test("many streams opened at the same moment on a fresh events connection all start", async () => {
    // The cluster client opens its pub/sub connection with the first SUBSCRIBE; a second
    // SUBSCRIBE written during that connection's handshake used to break it ("Connection
    // in subscriber mode, only subscriber commands may be used") and fail the streams
    // waiting on it with UNAVAILABLE. Each round is a fresh API process's first watchers.
    const store = st.store;
    const failures: string[] = [];
    for (let round = 0; round < 6; round++) {
      const sub = createRedis(st.svc.redisTarget, {
        role: "subscriber",
        name: TEST_CONNECTION_NAME,
      });
      sub.on("error", () => undefined);
      await waitForRedis(sub);
      const hub = new WatchHub(sub, store, {
        heartbeatMs: 60_000,
        log: createLogger("silent", "test"),
      });
      const abort = new AbortController();
      try {
        const ids = await Promise.all(
          Array.from({ length: 12 }, async () => {
            const id = newJobId();
            await createJob(store, id, [1], st.owner);
            return id;
          }),
        );
        // "At the same moment": within a few turns of the event loop, as requests that
        // arrive together are read.
        await Promise.all(
          ids.map(async (id, i) => {
            for (let k = 0; k < i % 4; k++) await new Promise((r) => setImmediate(r));
            try {
              const stream = hub.watch(id, 0, abort.signal);
              const first = await stream.next();
              expect(first.value).toMatchObject({ job: { id, version: 1 } });
              await stream.return(undefined);
            } catch (err) {
              failures.push(String((err as Error).cause ?? err));
            }
          }),
        );
      } finally {
        abort.abort();
        hub.close(new Error("test over"));
        sub.disconnect();
      }
    }
    expect(failures).toEqual([]);
  });
});

describe("WatchHub when the cluster replaces its pub/sub connection", () => {
  test("a watcher still gets the change published while the connection was being replaced", async () => {
    // The cluster client moves its pub/sub connection to another node without any
    // public event; what was published meanwhile is gone. The hub notices the new
    // connection and re-reads what it follows.
    const name = `resync-${process.pid}`;
    const sub = createRedis(st.svc.redisTarget, { role: "subscriber", name });
    sub.on("error", () => undefined);
    await waitForRedis(sub);
    const hub = new WatchHub(sub, st.store, {
      heartbeatMs: 60_000,
      log: createLogger("silent", "test"),
    });
    const abort = new AbortController();
    try {
      const id = newJobId();
      await createJob(st.store, id, [1], st.owner);
      const stream = hub.watch(id, 0, abort.signal);
      expect((await stream.next()).value).toMatchObject({ job: { id, version: 1 } });

      // Find the hub's pub/sub connection on whichever node holds it, and cut it while
      // the job changes: the change is published before a new connection can subscribe.
      const nodes = (st.redis as import("ioredis").Cluster).nodes("master");
      let cut: Promise<unknown> | undefined;
      for (const node of nodes) {
        const list = (await node.client("LIST")) as string;
        const line = list
          .split("\n")
          .find((l) => l.includes(`name=ioredis-cluster(subscriber):${name} `));
        const clientId = line === undefined ? undefined : /\bid=(\d+)/.exec(line)?.[1];
        if (clientId !== undefined) cut = node.client("KILL", "ID", clientId);
      }
      expect(cut).toBeDefined();
      await Promise.all([
        cut,
        markProcessing(
          st.store,
          { jobId: id, token: "test-driver", checkLock: false },
          { progress: (await st.store.get(id)).progress, files: [], startedAt: Date.now() },
        ),
      ]);
      const next = await Promise.race([
        stream.next(),
        new Promise((resolve) => setTimeout(() => resolve("nothing within 20 s"), 20_000)),
      ]);
      expect(next).toMatchObject({ value: { job: { id, state: "PROCESSING", version: 2 } } });
      await stream.return(undefined);
    } finally {
      abort.abort();
      hub.close(new Error("test over"));
      sub.disconnect();
    }
  }, 60_000);
});

describe("WatchHub when messages are lost", () => {
  test("a version gap makes the watcher re-read the job and get its current state", async () => {
    const sub = createRedis(st.svc.redisTarget, { role: "subscriber", name: TEST_CONNECTION_NAME });
    sub.on("error", () => undefined);
    await waitForRedis(sub);
    const hub = new WatchHub(sub, st.store, {
      heartbeatMs: 60_000,
      log: createLogger("silent", "test"),
    });
    const abort = new AbortController();
    try {
      const id = newJobId();
      await createJob(st.store, id, [1], st.owner);
      const stream = hub.watch(id, 0, abort.signal);
      expect((await stream.next()).value).toMatchObject({ job: { id, version: 1 } });

      // Versions 2 and 4 were published and lost (a failover); only 3 arrives. The
      // record itself is at 4, COMPLETED: nothing more will ever be published.
      const key = st.store.key(id);
      const v1 = (await st.redis.hgetall(key)) as Record<string, string>;
      await st.redis.hset(key, { state: "COMPLETED", version: "4", endedAt: String(Date.now()) });
      await st.redis.publish(
        st.store.channel(id),
        JSON.stringify({ ...v1, state: "PROCESSING", version: "3" }),
      );
      const seen: Array<[number, string]> = [];
      const drained = (async () => {
        for await (const ev of stream) if (ev.job) seen.push([ev.job.version, ev.job.state]);
      })();
      await expect.poll(() => seen.at(-1), { timeout: 20_000 }).toEqual([4, "COMPLETED"]);
      await drained;
      expect(seen[0]).toEqual([3, "PROCESSING"]);
    } finally {
      abort.abort();
      hub.close(new Error("test over"));
      sub.disconnect();
    }
  }, 60_000);
});
