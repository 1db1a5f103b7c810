import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { Redis } from "ioredis";
import { describe, expect, test } from "vitest";
import { JobStore } from "../core/job-store.js";
import { createJob, markCompleted, markProcessing } from "../core/job-transitions.js";
import { newJobId } from "../core/jobs.js";
import { createRedis } from "../core/redis.js";
import { ReplicaAck } from "../core/replica-ack.js";
import { DownloadService, JobState } from "../gen/downloads/v1/download_service_pb.js";
import { RetryInfoSchema } from "../gen/google/rpc/error_details_pb.js";
import { waitUntil } from "../local/ports.js";
import { startRedis } from "../local/redis-server.js";
import { startApiStack, withTestToken } from "./helpers/api.js";
import {
  type DrillReport,
  longestOutageMs,
  runFailoverDrill,
  STATE_RANK,
} from "./helpers/failover-drill.js";
import { startServices } from "./helpers/services.js";

// The primary that holds the queue's hash slot dies (`kill -9`) under Initiate load with
// open watchers, and a replica is promoted: what an acknowledged job, a caller, a
// watcher and a load balancer must see through it. On a Redis Cluster of three masters
// and three replicas, and on a primary with a replica and a Sentinel.

function summary(r: DrillReport): string {
  const errors = r.calls.filter((c) => c.code !== undefined);
  const reruns = [...r.started.values()].filter((k) => k > 1).length;
  const lostCompletions = [...r.completed.values()].filter((times) => times.length > 1).length;
  return JSON.stringify({
    initiated: r.calls.length,
    acknowledged: r.calls.length - errors.length,
    errors: errors.length,
    outageMs: Math.round(longestOutageMs(r)),
    promotedAfterMs: Math.round(r.promotedAt - r.killedAt),
    watchers: r.watchers.size,
    reruns,
    lostCompletions,
  });
}

function check(r: DrillReport): void {
  console.log(`failover drill: ${summary(r)}`);
  const acked = r.calls.filter((c) => c.jobId !== undefined).map((c) => c.jobId as string);
  expect(acked.length).toBeGreaterThan(0);

  // Every Initiate that failed said "retry": UNAVAILABLE with a delay, never INTERNAL.
  const errors = r.calls.filter((c) => c.code !== undefined);
  expect(errors.map((c) => Code[c.code as Code])).toEqual(errors.map(() => "Unavailable"));
  for (const e of errors) {
    expect(e.retryAfter).toMatch(/^\d+$/);
    expect(e.retryInfo).toBe(true);
  }

  // Every acknowledged job completed, once, with the ZIP its record describes. Once: a
  // second run may complete a job only when the first run's completion was written to
  // the old primary and lost with it (replication is asynchronous: the write was
  // acknowledged, not yet copied); after the kill, one completion per job at most.
  const notCompleted = acked.filter((id) => r.finals.get(id)?.state !== JobState.COMPLETED);
  expect(notCompleted).toEqual([]);
  for (const id of acked) {
    expect(r.zips.get(id), id).toEqual({ status: 200, sha256Matches: true, sourcesMatch: true });
    const times = r.completed.get(id) ?? [];
    expect(times.length, `${id} completed by a run`).toBeGreaterThanOrEqual(1);
    const afterKill = times.filter((t) => t > r.killedAt).length;
    expect(afterKill, `${id} completed more than once after the kill`).toBeLessThanOrEqual(1);
    expect(
      times.length - afterKill,
      `${id} completed more than once before it`,
    ).toBeLessThanOrEqual(1);
  }

  // No watcher missed its job's end or went back: versions rise, states never go back,
  // and the last one seen is the job's final record.
  for (const [id, w] of r.watchers) {
    expect(w.error, id).toBeUndefined();
    expect(w.versions, id).toEqual([...new Set(w.versions)].sort((a, b) => a - b));
    const ranks = w.states.map((s) => STATE_RANK[s] ?? -1);
    expect(ranks, id).toEqual([...ranks].sort((a, b) => a - b));
    expect(w.states.at(-1), id).toBe(JobState.COMPLETED);
    // What the watcher was handed is a ZIP it can download, with the bytes it was told.
    expect(r.watchedZips.get(id), id).toEqual({
      status: 200,
      sha256Matches: true,
      sourcesMatch: true,
    });
    // It is the job's final record, unless that completion was the one lost with the
    // old primary (see above).
    if ((r.completed.get(id) ?? []).length === 1)
      expect(w.versions.at(-1), id).toBe(r.finals.get(id)?.version);
  }

  // Readiness noticed: not ready on the API (/readyz and gRPC health) and the worker
  // after the kill, ready again after the promotion.
  const after = r.probes.filter((p) => p.at >= r.killedAt);
  for (const key of ["api", "grpc", "worker"] as const) {
    const down = after.findIndex((p) => p[key] !== 200);
    expect(down, `${key} /readyz went not-ready`).toBeGreaterThanOrEqual(0);
    expect(
      after.slice(down).some((p) => p[key] === 200),
      `${key} /readyz came back`,
    ).toBe(true);
  }
}

describe("a Redis failover under load", () => {
  test("Cluster (3 masters, 3 replicas): kill -9 of the queue's master loses nothing", async () => {
    check(await runFailoverDrill({ kind: "cluster", rate: 10, warmup: 10, after: 8 }));
  }, 180_000);

  test("Sentinel (primary, replica, one Sentinel): kill -9 of the primary loses nothing", async () => {
    check(await runFailoverDrill({ kind: "sentinel", rate: 8, warmup: 6, after: 5 }));
  }, 180_000);
});

describe("REDIS_MIN_REPLICAS_ACK", () => {
  test("Initiate answers only once the replica holds the job", async () => {
    const svc = await startServices();
    const replica = await startRedis({
      extraArgs: ["--replicaof", "127.0.0.1", String(svc.redis.port)],
    });
    const st = await startApiStack(
      { REDIS_MIN_REPLICAS_ACK: "1", REDIS_REPLICAS_ACK_TIMEOUT_MS: "30000" },
      { services: svc },
    );
    const onReplica = new Redis(replica.url);
    try {
      await waitUntil("replica in sync", async () =>
        (await onReplica.info("replication")).includes("master_link_status:up"),
      );
      const client = createClient(
        DownloadService,
        createConnectTransport({
          baseUrl: st.server.url,
          httpVersion: "1.1",
          interceptors: [withTestToken],
        }),
      );
      for (let i = 0; i < 3; i++) {
        // The replica stops for a moment (as one busy or behind would): Initiate must
        // not answer before it is back and has the job. SIGSTOP holds it before Initiate
        // is sent, whatever the machine's load (a DEBUG SLEEP sent first could still
        // reach it after the job had).
        let replicaBack = false;
        process.kill(replica.pid, "SIGSTOP");
        const resume = setTimeout(() => {
          replicaBack = true;
          process.kill(replica.pid, "SIGCONT");
        }, 500);
        try {
          const { job } = await client.initiate({ fileIds: [1, i + 2] });
          expect(replicaBack).toBe(true);
          expect((await onReplica.hgetall(st.store.key(job?.jobId ?? ""))).id).toBe(job?.jobId);
        } finally {
          clearTimeout(resume);
          if (!replicaBack) process.kill(replica.pid, "SIGCONT");
        }
      }
    } finally {
      onReplica.disconnect();
      await st.stop();
      await replica.stop();
      await svc.stop();
    }
  });

  test("a worker's completion returns only once the replica holds it, and says so when none does", async () => {
    const svc = await startServices();
    const replica = await startRedis({
      extraArgs: ["--replicaof", "127.0.0.1", String(svc.redis.port)],
    });
    const primary = createRedis(svc.redis.url, { role: "worker" });
    const ackConn = createRedis(svc.redis.url, { role: "api" });
    const onReplica = new Redis(replica.url);
    const prefix = `ack${process.pid}`;
    const store = (timeoutMs: number) =>
      new JobStore(primary, {
        prefix,
        recordTtlSeconds: 600,
        replicaAck: new ReplicaAck(ackConn, { prefix, replicas: 1, timeoutMs }),
      });
    const finish = async (s: JobStore) => {
      const id = newJobId();
      const run = { jobId: id, token: "ack-test", checkLock: false };
      await createJob(s, id, [1], "ack-owner");
      const progress = {
        filesDone: 1,
        filesTotal: 1,
        bytesDone: 1,
        bytesTotal: 1,
        bytesPerSecond: 0,
      };
      await markProcessing(s, run, { progress, files: [], startedAt: Date.now() });
      const key = `bundles/${id}.zip`;
      const outcome = await markCompleted(s, run, {
        endedAt: Date.now(),
        progress,
        files: [],
        result: {
          key,
          fileName: "a.zip",
          sizeBytes: 1,
          sha256: "00",
          expiresAt: Date.now() + 60_000,
        },
      });
      return { id, outcome };
    };
    try {
      await waitUntil("replica in sync", async () =>
        (await onReplica.info("replication")).includes("master_link_status:up"),
      );
      // The replica stops for a moment: the completion must not be reported before it
      // is back and holds it (else a failover now would lose it and rerun the job).
      // SIGSTOP holds it before the completion is written, whatever the machine's load.
      let replicaBack = false;
      let stopped = true;
      process.kill(replica.pid, "SIGSTOP");
      const resume = setTimeout(() => {
        replicaBack = true;
        stopped = false;
        process.kill(replica.pid, "SIGCONT");
      }, 500);
      try {
        const held = await finish(store(30_000));
        expect(held.outcome).toEqual({ replicated: true });
        expect(replicaBack).toBe(true);
        expect((await onReplica.hgetall(store(1).key(held.id))).state).toBe("COMPLETED");

        // No replica answers in time: the job is COMPLETED all the same (watchers may
        // have seen it), and the caller is told the completion is not yet safe.
        process.kill(replica.pid, "SIGSTOP");
        stopped = true;
        const unsafe = await finish(store(50));
        expect(unsafe.outcome.replicated).toBe(false);
        expect((await primary.hgetall(store(1).key(unsafe.id))).state).toBe("COMPLETED");
      } finally {
        clearTimeout(resume);
        if (stopped) process.kill(replica.pid, "SIGCONT");
      }
    } finally {
      primary.disconnect();
      ackConn.disconnect();
      onReplica.disconnect();
      await replica.stop();
      await svc.stop();
    }
  });

  test("without enough replicas, Initiate is UNAVAILABLE with a retry delay", async () => {
    const st = await startApiStack({
      REDIS_MIN_REPLICAS_ACK: "1",
      REDIS_REPLICAS_ACK_TIMEOUT_MS: "50",
    });
    try {
      const client = createClient(
        DownloadService,
        createConnectTransport({
          baseUrl: st.server.url,
          httpVersion: "1.1",
          interceptors: [withTestToken],
        }),
      );
      const err = ConnectError.from(
        await client.initiate({ fileIds: [1] }).catch((e: unknown) => e),
      );
      expect(err.code).toBe(Code.Unavailable);
      expect(err.metadata.get("retry-after")).toMatch(/^\d+$/);
      expect(err.findDetails(RetryInfoSchema)).toHaveLength(1);
    } finally {
      await st.stop();
    }
  });
});
