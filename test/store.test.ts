import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { decodeJob, JobStore } from "../core/job-store.js";
import { JobNotFoundError, JobStateError, newJobId } from "../core/jobs.js";
import { createRedis } from "../core/redis.js";
import { type Services, startServices, uniquePrefix } from "./helpers/services.js";

let svc: Services;
beforeAll(async () => {
  svc = await startServices();
});
afterAll(async () => {
  await svc?.stop();
});

describe("JobStore", () => {
  test("every update bumps the version and is published whole on the job's channel", async () => {
    const redis = createRedis(svc.redis.url, { role: "api" });
    const sub = createRedis(svc.redis.url, { role: "subscriber" });
    try {
      const store = new JobStore(redis, { prefix: uniquePrefix(), recordTtlSeconds: 60 });
      const id = newJobId();
      const created = await store.create(id, [1, 2], "owner-a");
      expect(created.version).toBe(1);
      const seen: number[] = [];
      await sub.subscribe(store.channel(id));
      sub.on("message", (_ch: string, msg: string) =>
        seen.push(decodeJob(JSON.parse(msg)).version),
      );
      const started = await store.update(
        id,
        { state: "PROCESSING" },
        { from: ["QUEUED"], addAttempts: 1 },
      );
      expect(started).toMatchObject({
        state: "PROCESSING",
        version: 2,
        attempts: 1,
        fileIds: [1, 2],
      });
      const done = await store.update(id, { state: "COMPLETED" }, { from: ["PROCESSING"] });
      expect(done.version).toBe(3);
      await expect(
        store.update(id, { state: "CANCELLED" }, { from: ["QUEUED", "PROCESSING"] }),
      ).rejects.toBeInstanceOf(JobStateError);
      expect((await store.get(id)).state).toBe("COMPLETED");
      expect(await redis.ttl(store.key(id))).toBeGreaterThan(0);
      await expect.poll(() => seen).toEqual([2, 3]);
      await expect(store.get(newJobId())).rejects.toBeInstanceOf(JobNotFoundError);
    } finally {
      redis.disconnect();
      sub.disconnect();
    }
  });

  test("ifAbsent fields are written once: a retried start keeps the first start time", async () => {
    const redis = createRedis(svc.redis.url, { role: "api" });
    try {
      const store = new JobStore(redis, { prefix: uniquePrefix(), recordTtlSeconds: 60 });
      const id = newJobId();
      await store.create(id, [1], "owner-a");
      const first = await store.update(
        id,
        { state: "PROCESSING" },
        { from: ["QUEUED", "PROCESSING"], addAttempts: 1, ifAbsent: { startedAt: 1000 } },
      );
      expect(first).toMatchObject({
        state: "PROCESSING",
        startedAt: 1000,
        attempts: 1,
        version: 2,
      });
      const retry = await store.update(
        id,
        { state: "PROCESSING" },
        { from: ["QUEUED", "PROCESSING"], addAttempts: 1, ifAbsent: { startedAt: 2000 } },
      );
      expect(retry).toMatchObject({ startedAt: 1000, attempts: 2, version: 3 });
    } finally {
      redis.disconnect();
    }
  });

  test("expireResultAt registers the result for deletion in the same step, even when the state check refuses", async () => {
    const redis = createRedis(svc.redis.url, { role: "api" });
    try {
      const store = new JobStore(redis, { prefix: uniquePrefix(), recordTtlSeconds: 60 });
      const done = newJobId();
      await store.create(done, [1], "owner-a");
      await store.update(done, { state: "PROCESSING" }, { from: ["QUEUED"] });
      await store.write(
        done,
        { state: "COMPLETED" },
        { from: ["PROCESSING"], expireResultAt: 5000 },
      );
      const cancelled = newJobId();
      await store.create(cancelled, [1], "owner-a");
      await store.update(cancelled, { state: "CANCELLED" }, { from: ["QUEUED"] });
      await expect(
        store.write(
          cancelled,
          { state: "COMPLETED" },
          { from: ["PROCESSING"], expireResultAt: 6000 },
        ),
      ).rejects.toBeInstanceOf(JobStateError);
      expect(await store.dueResultExpiries(10_000, 10)).toEqual([done, cancelled]);
      expect((await store.get(cancelled)).state).toBe("CANCELLED");
    } finally {
      redis.disconnect();
    }
  });
});
