import { mkdtempSync, rmSync } from "node:fs";
import { loadavg, tmpdir } from "node:os";
import { join } from "node:path";
import { loadConfig } from "../core/config.js";
import { JobService } from "../core/job-service.js";
import { JobStore } from "../core/job-store.js";
import { createBundleQueue } from "../core/queue.js";
import { createRedis } from "../core/redis.js";
import { S3_PROFILES } from "../local/realistic-s3.js";
import { startRedis } from "../local/redis-server.js";
import { LOCAL_S3_CREDENTIALS } from "../local/s3-server.js";
import { fmt, procCpuMs, type Row, startNodeServer } from "./lib.js";

// One job of many small files (70,000; 10,000 with --quick), read from generated objects
// at loopback speed, while the run's progress ticks are measured from Redis's side: the
// bytes Redis took in per record change (INFO total_net_input_bytes over the version's
// growth) and Redis's CPU, and BullMQ's lock of the job, sampled every 50 ms (PTTL):
// how often it was renewed, the longest time between two renewals and the least time it
// had left. A tick that rewrote the whole per-file list (megabytes) kept Redis and the
// worker's event loop busy enough to delay the renewals; JOB_LOCK_MS bounds the gap.

export async function benchJobFiles(
  opts: { quick?: boolean } = {},
): Promise<{ rows: Row[]; data: unknown }> {
  const files = Number(process.env.BENCH_JOB_FILES ?? (opts.quick ? 10_000 : 70_000));
  const fileBytes = 1024;
  const dir = mkdtempSync(join(tmpdir(), "dj-bench-job-files-"));
  const redis = await startRedis();
  const s3 = await startNodeServer("bench/s3-server.ts", { S3_DIR: join(dir, "s3") });
  const s3Endpoint = `http://127.0.0.1:${s3.port}`;
  const fixture = await startNodeServer("bench/s3-server.ts", {
    FIXTURE_TARGET: s3Endpoint,
    FIXTURE_BEHAVIOUR: JSON.stringify(S3_PROFILES.loopback),
    GENERATED: `download-sources/files/ 1-${files}:${fileBytes}`,
  });
  const base = {
    REDIS_URL: redis.url,
    S3_PUBLIC_ENDPOINT: s3Endpoint,
    S3_ACCESS_KEY_ID: LOCAL_S3_CREDENTIALS.accessKeyId,
    S3_SECRET_ACCESS_KEY: LOCAL_S3_CREDENTIALS.secretAccessKey,
    QUEUE_PREFIX: "benchjobfiles",
    LOG_LEVEL: "warn",
    MAX_FILES_PER_JOB: "100000",
  };
  const cfg = loadConfig({ ...base, S3_ENDPOINT: s3Endpoint });
  const conn = createRedis(redis.url, { role: "api" });
  const store = new JobStore(conn, { prefix: cfg.QUEUE_PREFIX, recordTtlSeconds: 3600 });
  const queue = createBundleQueue(conn, { prefix: cfg.QUEUE_PREFIX, attempts: 3, backoffMs: 200 });
  const jobs = new JobService({
    store,
    queue,
    redis: conn,
    maxFilesPerJob: 100_000,
    policy: { dedupInFlight: false, reuseResults: false },
  });
  let worker: Awaited<ReturnType<typeof startNodeServer>> | undefined;
  try {
    worker = await startNodeServer(
      "worker/main.ts",
      {
        ...base,
        S3_ENDPOINT: `http://127.0.0.1:${fixture.port}`,
        WORKER_CONCURRENCY: "1",
        LOG_LEVEL: "info",
      },
      { ready: "worker ready", timeoutMs: 120_000 },
    );
    let workerLog = "";
    worker.child.stdout?.on("data", (d: Buffer) => (workerLog += d.toString()));
    const info = async (section: string, field: string) => {
      const text = await conn.info(section);
      return Number(new RegExp(`${field}:([\\d.]+)`).exec(text)?.[1] ?? 0);
    };
    const load = loadavg();
    const pid = worker.child.pid as number;
    const ids = Array.from({ length: files }, (_, i) => i + 1);
    const { job } = await jobs.initiate("bench", { fileIds: ids });
    const lockKey = store.keys.bundleLock(job.id);
    const jobKey = store.key(job.id);
    // From the first progress tick on: the claim and the HEADs come before it.
    let startVersion = 0;
    let startBytes = 0;
    let startCpu = 0;
    let startedAt = 0;
    let workerCpu0 = 0;
    let last = -1;
    let lastRenewal = 0;
    let renewals = 0;
    let longestGap = 0;
    let leastLeft = Number.POSITIVE_INFINITY;
    let lost = 0;
    let state = "QUEUED";
    let version = 0;
    while (state === "QUEUED" || state === "PROCESSING") {
      await new Promise((r) => setTimeout(r, 50));
      const [[, pttl], [, fields]] = (await conn
        .multi()
        .pttl(lockKey)
        .hmget(jobKey, "state", "version", "progress")
        .exec()) as [[null, number], [null, (string | null)[]]];
      state = fields[0] ?? "?";
      version = Number(fields[1]);
      const progress = JSON.parse(fields[2] ?? "{}") as { bytesDone?: number };
      const now = performance.now();
      if (startVersion === 0 && state === "PROCESSING" && (progress.bytesDone ?? 0) > 0) {
        startVersion = version;
        startBytes = await info("stats", "total_net_input_bytes");
        startCpu = (await info("cpu", "used_cpu_sys")) + (await info("cpu", "used_cpu_user"));
        startedAt = now;
        lastRenewal = now;
        workerCpu0 = procCpuMs(pid);
      }
      if (startVersion === 0 || state !== "PROCESSING") continue;
      if (pttl < 0) lost += 1;
      else {
        leastLeft = Math.min(leastLeft, pttl);
        if (last >= 0 && pttl > last + 100) {
          renewals += 1;
          longestGap = Math.max(longestGap, now - lastRenewal);
          lastRenewal = now;
        }
      }
      last = pttl;
    }
    const seconds = (performance.now() - startedAt) / 1000;
    const bytesIn = (await info("stats", "total_net_input_bytes")) - startBytes;
    const cpu =
      (await info("cpu", "used_cpu_sys")) + (await info("cpu", "used_cpu_user")) - startCpu;
    const workerCpu = procCpuMs(pid) - workerCpu0;
    const rec = await store.get(job.id);
    const changes = Math.max(1, version - startVersion);
    const data = {
      files,
      state: rec.state,
      attempts: rec.attempts,
      seconds,
      changes,
      bytesInPerChange: bytesIn / changes,
      redisCpuSeconds: cpu,
      workerCpuSeconds: workerCpu / 1000,
      renewals,
      longestRenewalGapMs: longestGap,
      leastLockLeftMs: leastLeft,
      lockMissingSamples: lost,
      lockMs: cfg.JOB_LOCK_MS,
      lockWarnings: (workerLog.match(/could not renew lock|lock mismatch|stalled/gi) ?? []).length,
      loadAverage: load,
    };
    const scenario = `job of ${files} files × ${fileBytes} B (loopback S3), load ${fmt(load[0] ?? 0)}`;
    const rows: Row[] = [
      { scenario, metric: "outcome (state, runs)", value: `${rec.state}, ${rec.attempts}` },
      { scenario, metric: "progress writes (record changes)", value: String(changes) },
      { scenario, metric: "bytes Redis took in per change", value: fmt(bytesIn / changes, 0) },
      {
        scenario,
        metric: "Redis CPU s / worker CPU s",
        value: `${fmt(cpu, 2)} / ${fmt(workerCpu / 1000, 2)}`,
      },
      { scenario, metric: "job seconds (from the first tick)", value: fmt(seconds) },
      {
        scenario,
        metric: `lock renewals (expected ≈ ${fmt(seconds / (cfg.JOB_LOCK_MS / 2000), 0)})`,
        value: String(renewals),
      },
      { scenario, metric: "longest gap between renewals ms", value: fmt(longestGap, 0) },
      {
        scenario,
        metric: `least lock time left ms (of ${cfg.JOB_LOCK_MS})`,
        value: fmt(leastLeft, 0),
      },
      { scenario, metric: "samples with no lock", value: String(lost), ok: lost === 0 },
    ];
    process.stderr.write(`  ${JSON.stringify(data)}\n`);
    return { rows, data };
  } finally {
    await worker?.stop();
    await fixture.stop();
    await queue.close();
    conn.disconnect();
    await s3.stop();
    await redis.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}
