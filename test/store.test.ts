import type { Redis } from "ioredis";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { JobIndex } from "../core/job-index.js";
import { decodeJob, FilesFollower, JobStore } from "../core/job-store.js";
import {
  type Attempt,
  createJob,
  deleteJob,
  markCancelled,
  markCompleted,
  markExpired,
  markFailed,
  markProcessing,
  recordProgress,
} from "../core/job-transitions.js";
import {
  FencedError,
  type FileProgress,
  JobNotFoundError,
  type JobRecord,
  JobStateError,
  newJobId,
} from "../core/jobs.js";
import { expiryMember } from "../core/keys.js";
import { createRedis, type RedisClient, waitForRedis } from "../core/redis.js";
import { type Services, startServices, uniquePrefix } from "./helpers/services.js";

// The job record's transitions against a real Redis: what each one allows, what a run
// that lost the job can still do (nothing), and what watchers are sent.

let svc: Services;
let redis: RedisClient;
beforeAll(async () => {
  svc = await startServices();
  redis = createRedis(svc.redis.url, { role: "api" });
});
afterAll(async () => {
  redis?.disconnect();
  await svc?.stop();
});

const newStore = () => new JobStore(redis, { prefix: uniquePrefix(), recordTtlSeconds: 60 });
const runOf = (jobId: string, token: string, checkLock = false): Attempt => ({
  jobId,
  token,
  checkLock,
});
const start = (rec: JobRecord, startedAt = Date.now()) => ({
  progress: rec.progress,
  files: rec.files,
  startedAt,
});
const result = (key: string, expiresAt = Date.now() + 60_000) => ({
  key,
  fileName: "x.zip",
  sizeBytes: 22,
  sha256: "0".repeat(64),
  expiresAt,
});
const finish = (rec: JobRecord, key: string, expiresAt?: number) => ({
  endedAt: Date.now(),
  progress: rec.progress,
  files: rec.files,
  result: result(key, expiresAt),
});

describe("job transitions", () => {
  test("every transition bumps the version and is published whole on the job's channel", async () => {
    const sub = createRedis(svc.redis.url, { role: "subscriber" });
    try {
      const store = newStore();
      const id = newJobId();
      const created = await createJob(store, id, [1, 2], "owner-a");
      expect(created.version).toBe(1);
      const seen: [number, string][] = [];
      // SUBSCRIBE before ioredis's ready check has finished breaks the check (INFO is
      // refused in subscriber mode) and the subscription with it: a busy machine did.
      await waitForRedis(sub);
      await sub.subscribe(store.channel(id));
      sub.on("message", (_ch: string, msg: string) => {
        const rec = decodeJob(JSON.parse(msg));
        seen.push([rec.version, rec.state]);
      });
      const run = runOf(id, "run-1");
      const started = await markProcessing(store, run, start(created));
      expect(started).toMatchObject({
        state: "PROCESSING",
        version: 2,
        attempts: 1,
        lease: "run-1",
      });
      await recordProgress(store, run, { progress: started.progress, files: started.files });
      await markCompleted(store, run, finish(started, "k1"));
      await expect(markCancelled(store, id)).rejects.toBeInstanceOf(JobStateError);
      expect((await store.get(id)).state).toBe("COMPLETED");
      expect(await redis.ttl(store.key(id))).toBeGreaterThan(0);
      await expect
        .poll(() => seen)
        .toEqual([
          [2, "PROCESSING"],
          [3, "PROCESSING"],
          [4, "COMPLETED"],
        ]);
      await expect(store.get(newJobId())).rejects.toBeInstanceOf(JobNotFoundError);
    } finally {
      sub.disconnect();
    }
  });

  test("with a read cache, an unchanged record is the one kept; a change, another store's write or a delete is seen", async () => {
    const prefix = uniquePrefix();
    const api = new JobStore(redis, { prefix, recordTtlSeconds: 60, readCache: 2 });
    // The workers write through stores of their own.
    const worker = new JobStore(redis, { prefix, recordTtlSeconds: 60 });
    const id = newJobId();
    await createJob(worker, id, [1, 2], "owner-a");
    const first = await api.get(id);
    expect(await api.get(id)).toBe(first);

    const run = runOf(id, "run-1");
    const started = await markProcessing(worker, run, start(first));
    const seen = await api.get(id);
    expect(seen).not.toBe(first);
    expect(seen).toMatchObject({ state: "PROCESSING", version: started.version });
    expect(first.state).toBe("QUEUED");
    const files: FileProgress[] = (started.files ?? []).map((f, i) =>
      i === 0 ? { ...f, state: "DONE", bytesDone: 7 } : f,
    );
    await recordProgress(worker, run, { progress: started.progress, files });
    expect((await api.get(id)).files?.[0]).toMatchObject({ state: "DONE", bytesDone: 7 });

    // Two more jobs push the first out of a cache of two; it is read whole again.
    const others = [newJobId(), newJobId()];
    for (const other of others) {
      await createJob(worker, other, [3], "owner-a");
      await api.get(other);
    }
    const again = await api.get(id);
    expect(again).toMatchObject({ state: "PROCESSING", files: [{ state: "DONE" }, {}] });
    expect(await api.get(id)).toBe(again);

    await markCancelled(worker, id);
    await deleteJob(worker, await worker.get(id), undefined);
    await expect(api.get(id)).rejects.toBeInstanceOf(JobNotFoundError);
  });

  test("a second run's claim keeps the first start time and counts the run", async () => {
    const store = newStore();
    const id = newJobId();
    const rec = await createJob(store, id, [1], "owner-a");
    const first = await markProcessing(store, runOf(id, "a"), start(rec, 1000));
    expect(first).toMatchObject({ startedAt: 1000, attempts: 1, version: 2, lease: "a" });
    const retry = await markProcessing(store, runOf(id, "b"), start(rec, 2000));
    expect(retry).toMatchObject({ startedAt: 1000, attempts: 2, version: 3, lease: "b" });
  });

  test("a claim sent twice by one run (a resend after a reconnect) counts the run once", async () => {
    const store = newStore();
    const id = newJobId();
    const rec = await createJob(store, id, [1], "owner-a");
    await markProcessing(store, runOf(id, "a"), start(rec));
    const again = await markProcessing(store, runOf(id, "a"), start(rec));
    expect(again).toMatchObject({ attempts: 1, lease: "a" });
  });

  test("a run that lost the job to another run can change nothing", async () => {
    const store = newStore();
    const id = newJobId();
    const rec = await createJob(store, id, [1], "owner-a");
    const a = runOf(id, "a");
    const b = runOf(id, "b");
    await markProcessing(store, a, start(rec));
    await markProcessing(store, b, start(rec));
    const before = await store.get(id);
    await expect(
      recordProgress(store, a, { progress: rec.progress, files: rec.files }),
    ).rejects.toBeInstanceOf(FencedError);
    await expect(markCompleted(store, a, finish(rec, "a.zip"))).rejects.toBeInstanceOf(FencedError);
    const after = await store.get(id);
    expect(after.version).toBe(before.version);
    expect(after.lease).toBe("b");
    await markCompleted(store, b, finish(rec, "b.zip"));
    expect((await store.get(id)).result?.key).toBe("b.zip");
  });

  test("a claim needs BullMQ's lock to hold the run's token", async () => {
    const store = newStore();
    const id = newJobId();
    const rec = await createJob(store, id, [1], "owner-a");
    await expect(markProcessing(store, runOf(id, "t1", true), start(rec))).rejects.toBeInstanceOf(
      FencedError,
    );
    await redis.set(store.keys.bundleLock(id), "t1");
    await expect(markProcessing(store, runOf(id, "t2", true), start(rec))).rejects.toBeInstanceOf(
      FencedError,
    );
    expect((await store.get(id)).state).toBe("QUEUED");
    const claimed = await markProcessing(store, runOf(id, "t1", true), start(rec));
    expect(claimed).toMatchObject({ state: "PROCESSING", lease: "t1", attempts: 1 });
  });

  test("a completion sent twice (a resend after a reconnect) succeeds twice and writes once", async () => {
    const store = newStore();
    const id = newJobId();
    const rec = await createJob(store, id, [1], "owner-a");
    const run = runOf(id, "a");
    await markProcessing(store, run, start(rec));
    await markCompleted(store, run, finish(rec, "a.zip"));
    const once = await store.get(id);
    await markCompleted(store, run, finish(rec, "a.zip"));
    expect(await store.get(id)).toEqual(once);
  });

  test("a result object is registered for deletion even when the completion is refused", async () => {
    const store = newStore();
    const done = newJobId();
    const doneRec = await createJob(store, done, [1], "owner-a");
    await markProcessing(store, runOf(done, "a"), start(doneRec));
    await markCompleted(store, runOf(done, "a"), finish(doneRec, "done.zip", 5000));
    const cancelled = newJobId();
    const cancelledRec = await createJob(store, cancelled, [1], "owner-a");
    await markProcessing(store, runOf(cancelled, "a"), start(cancelledRec));
    await markCancelled(store, cancelled);
    await expect(
      markCompleted(store, runOf(cancelled, "a"), finish(cancelledRec, "cancelled.zip", 6000)),
    ).rejects.toBeInstanceOf(JobStateError);
    expect(await store.dueResultExpiries(10_000, 10)).toEqual([
      expiryMember(done, "done.zip"),
      expiryMember(cancelled, "cancelled.zip"),
    ]);
    expect((await store.get(cancelled)).state).toBe("CANCELLED");
  });

  test("markExpired marks only the object the record names", async () => {
    const store = newStore();
    const id = newJobId();
    const rec = await createJob(store, id, [1], "owner-a");
    await markProcessing(store, runOf(id, "a"), start(rec));
    await markCompleted(store, runOf(id, "a"), finish(rec, "won.zip"));
    await expect(markExpired(store, id, result("lost.zip"))).rejects.toBeInstanceOf(JobStateError);
    expect((await store.get(id)).result?.expired).toBeUndefined();
    const named = (await store.get(id)).result;
    if (named === undefined) throw new Error("no result");
    await markExpired(store, id, named);
    expect((await store.get(id)).result).toMatchObject({ key: "won.zip", expired: true });
  });

  test("the scripts are reloaded after Redis forgets them (SCRIPT FLUSH, a restart)", async () => {
    const store = newStore();
    const id = newJobId();
    await createJob(store, id, [1], "owner-a");
    await redis.script("FLUSH");
    await markCancelled(store, id);
    expect((await store.get(id)).state).toBe("CANCELLED");
  });

  test("per-file state: a tick writes only the files that changed, and reads and watchers see every file", async () => {
    const sub = createRedis(svc.redis.url, { role: "subscriber" });
    try {
      const store = newStore();
      const id = newJobId();
      const created = await createJob(store, id, [1, 2, 3], "owner-a");
      const follower = new FilesFollower();
      const watched: JobRecord[] = [];
      await waitForRedis(sub);
      await sub.subscribe(store.channel(id));
      sub.on("message", (_ch: string, msg: string) => {
        const rec = follower.event(JSON.parse(msg));
        if (rec !== undefined) watched.push(rec);
      });
      const run = runOf(id, "a");
      const started = await markProcessing(store, run, start(created));
      const file = (i: number, change: Partial<FileProgress>): [number, FileProgress] => [
        i,
        { ...(started.files[i] as FileProgress), ...change },
      ];
      // The record itself holds no per-file state once the job runs.
      expect(await redis.hexists(store.key(id), "files")).toBe(0);
      expect(await redis.hlen(store.keys.jobFiles(id))).toBe(3);
      const reads: JobRecord[] = [await store.get(id)];
      const commands: string[][] = [];
      const monitor = await (redis as Redis).monitor();
      monitor.on("monitor", (_t: string, args: string[]) => {
        if (args.includes(store.keys.jobFiles(id))) commands.push(args);
      });
      await recordProgress(store, run, {
        progress: { ...started.progress, bytesDone: 5 },
        filesPatch: [file(1, { state: "IN_PROGRESS", bytesDone: 5 })],
      });
      reads.push(await store.get(id));
      await recordProgress(store, run, {
        progress: { ...started.progress, bytesDone: 9, filesDone: 1 },
        filesPatch: [file(1, { state: "DONE", bytesDone: 9 }), file(0, { state: "IN_PROGRESS" })],
      });
      reads.push(await store.get(id));
      const { files: _all, ...finished } = finish(started, "k.zip");
      await markCompleted(store, run, {
        ...finished,
        filesPatch: [file(0, { state: "DONE" }), file(2, { state: "DONE" })],
      });
      reads.push(await store.get(id));
      monitor.disconnect();
      expect(reads.map((r) => r.files.map((f) => [f.fileId, f.state, f.bytesDone]))).toEqual([
        [
          [1, "PENDING", 0],
          [2, "PENDING", 0],
          [3, "PENDING", 0],
        ],
        [
          [1, "PENDING", 0],
          [2, "IN_PROGRESS", 5],
          [3, "PENDING", 0],
        ],
        [
          [1, "IN_PROGRESS", 0],
          [2, "DONE", 9],
          [3, "PENDING", 0],
        ],
        [
          [1, "DONE", 0],
          [2, "DONE", 9],
          [3, "DONE", 0],
        ],
      ]);
      // Each tick sent only the entries it changed.
      // (The transition script takes 6 keys; a read, also a script, takes 2.)
      const ticks = commands.filter(
        (c) => c[0]?.toLowerCase().startsWith("evalsha") && c[2] === "6",
      );
      expect(ticks.length).toBe(3);
      expect(ticks.map((c) => c.join(" ").split('{"fileId"').length - 1)).toEqual([1, 2, 2]);
      // A watcher following the messages sees the same records as a reader.
      await expect.poll(() => watched.length).toBe(4);
      expect(watched.map((r) => [r.version, r.files])).toEqual(
        [started, ...reads.slice(1)].map((r) => [r.version, r.files]),
      );
      // The per-file state expires with the record.
      expect(await redis.ttl(store.keys.jobFiles(id))).toBeGreaterThan(0);
      // A message that follows a version this follower never saw cannot be completed.
      const late = new FilesFollower();
      const tick = decodeJob({ version: "9", state: "PROCESSING", filesPatch: "[]" });
      expect(late.event({ version: "9", state: "PROCESSING", filesPatch: "[]" })).toBeUndefined();
      late.base({ ...tick, version: 8, files: reads[3]?.files ?? [] });
      expect(late.event({ version: "9", state: "PROCESSING", filesPatch: "[]" })?.files).toEqual(
        reads[3]?.files,
      );
    } finally {
      sub.disconnect();
    }
  });

  test("a cancel answers with every file's state", async () => {
    const store = newStore();
    const id = newJobId();
    const created = await createJob(store, id, [4, 5], "owner-a");
    const run = runOf(id, "a");
    const started = await markProcessing(store, run, start(created));
    await recordProgress(store, run, {
      progress: started.progress,
      filesPatch: [[1, { ...(started.files[1] as FileProgress), state: "IN_PROGRESS" }]],
    });
    const cancelled = await markCancelled(store, id);
    expect(cancelled.files.map((f) => f.state)).toEqual(["PENDING", "IN_PROGRESS"]);
    expect(await store.get(id)).toEqual(cancelled);
  });

  test("a listed running job shows every file; deleting a job deletes its per-file state", async () => {
    const store = newStore();
    const id = newJobId();
    const created = await createJob(store, id, [6, 7], "owner-l");
    await redis.zadd(store.keys.ownerJobs("owner-l"), created.createdAt, id);
    const run = runOf(id, "a");
    const started = await markProcessing(store, run, start(created));
    await recordProgress(store, run, {
      progress: started.progress,
      filesPatch: [[0, { ...(started.files[0] as FileProgress), state: "IN_PROGRESS" }]],
    });
    const page = await new JobIndex(store).list("owner-l", {
      pageSize: 10,
      pageToken: "",
      states: [],
      labels: {},
    });
    expect(page.jobs.map((j) => j.files)).toEqual([(await store.get(id)).files]);
    expect(page.jobs[0]?.files.map((f) => f.state)).toEqual(["IN_PROGRESS", "PENDING"]);
    const done = await store.get(id);
    await markFailed(store, run, {
      claimed: true,
      error: { code: "unavailable", message: "x", retryable: true },
    });
    await deleteJob(store, done, undefined);
    expect(await redis.exists(store.key(id), store.keys.jobFiles(id))).toBe(0);
  });

  test("a job of 70,000 files is claimed, ticked and read whole", async () => {
    const store = newStore();
    const id = newJobId();
    const ids = Array.from({ length: 70_000 }, (_, i) => i + 1);
    const created = await createJob(store, id, ids, "owner-big");
    const run = runOf(id, "a");
    const started = await markProcessing(store, run, start(created));
    await recordProgress(store, run, {
      progress: started.progress,
      filesPatch: [[69_999, { ...(started.files[69_999] as FileProgress), state: "IN_PROGRESS" }]],
    });
    const rec = await store.get(id);
    expect(rec.files).toHaveLength(70_000);
    expect(rec.files[69_999]).toMatchObject({ fileId: 70_000, state: "IN_PROGRESS" });
    expect(rec.files[0]).toMatchObject({ fileId: 1, state: "PENDING" });
  });
});
