import { Worker } from "bullmq";
import type { Config } from "../core/config.js";
import { DownloadLinks } from "../core/download-link.js";
import { recordRun } from "../core/forecast.js";
import { type ReadinessCheck, redisCheck, redisWriteCheck, s3Check } from "../core/health.js";
import { HistoryDb } from "../core/history.js";
import { JobStore } from "../core/job-store.js";
import { markAbandoned } from "../core/job-transitions.js";
import { isTerminal } from "../core/jobs.js";
import type { Logger } from "../core/logger.js";
import {
  createMetricsRegistry,
  type Registry,
  registerHistoryMetrics,
  registerWebhookMetrics,
  registerWorkerMetrics,
} from "../core/metrics.js";
import {
  type BundleJobData,
  createMaintenanceQueue,
  createWebhookQueue,
  MAINTENANCE_QUEUE_NAME,
  QUEUE_NAME,
  WEBHOOK_QUEUE_NAME,
  type WebhookJobData,
} from "../core/queue.js";
import {
  createRedis,
  onSubscriptionsRestored,
  redisTargetFrom,
  waitForRedis,
} from "../core/redis.js";
import { ReplicaAck } from "../core/replica-ack.js";
import { Storage, storageOptionsFrom } from "../core/storage.js";
import { historyOutboxState, startHistoryWriter } from "./history-writer.js";
import { CancelledError, createProcessor } from "./processor.js";
import { sweepExpiredResults } from "./retention.js";
import {
  createWebhookProcessor,
  type OutboxDispatcher,
  startOutboxDispatcher,
} from "./webhooks.js";

/** How often each worker looks for callbacks that became due. */
const OUTBOX_INTERVAL_MS = 500;
/** A callback queued this long ago and still unsettled is queued again. */
const OUTBOX_LEASE_MS = 60_000;

export interface RunningWorker {
  /** Stops taking jobs, lets running ones finish (up to the grace) and closes Redis. */
  close(): Promise<void>;
  /** Job ids running in this process right now. */
  running(): string[];
  /** What the worker's /readyz checks: its own Redis connections, S3, the BullMQ loop. */
  readinessChecks: ReadinessCheck[];
  /** This process's Prometheus metrics, served at /metrics on the worker's health port. */
  metrics: Registry;
}

export async function startWorker(cfg: Config, log: Logger): Promise<RunningWorker> {
  const target = redisTargetFrom(cfg);
  if (target === undefined)
    throw new Error("REDIS_URL, REDIS_CLUSTER_NODES or REDIS_SENTINELS is required for the worker");
  const redis = createRedis(target, { role: "worker", name: "download-jobs:worker" });
  const sub = createRedis(target, { role: "subscriber", name: "download-jobs:worker-cancel" });
  // Without a listener ioredis prints every reconnect error of a failover to stderr.
  sub.on("error", (err: Error) => log.warn({ err: err.message }, "redis connection error"));
  // WAIT blocks its connection, so a completion's durability gets one of its own
  // (core/replica-ack.ts); it fails fast like an API connection rather than queueing.
  const ackConn =
    cfg.REDIS_MIN_REPLICAS_ACK > 0
      ? createRedis(target, { role: "api", name: "download-jobs:worker-replica-ack" })
      : undefined;
  ackConn?.on("error", (err: Error) => log.warn({ err: err.message }, "redis connection error"));
  await Promise.all([waitForRedis(redis), waitForRedis(sub)]);
  const store = new JobStore(redis, {
    prefix: cfg.QUEUE_PREFIX,
    recordTtlSeconds: cfg.JOB_RECORD_TTL_SECONDS,
    historyOutboxMaxEntries: cfg.HISTORY_OUTBOX_MAX_ENTRIES,
    replicaAck:
      ackConn &&
      new ReplicaAck(ackConn, {
        prefix: cfg.QUEUE_PREFIX,
        replicas: cfg.REDIS_MIN_REPLICAS_ACK,
        timeoutMs: cfg.REDIS_REPLICAS_ACK_TIMEOUT_MS,
      }),
  });
  const storage = new Storage(storageOptionsFrom(cfg));
  const running = new Map<string, AbortController>();

  // Cancel reaches the process that runs the job through Redis pub/sub: every worker
  // hears every cancel and acts on the ones it runs.
  await sub.subscribe(store.cancelChannel);
  // ioredis re-subscribes by itself after a reconnect, but on a cluster it swallows the
  // errors of doing so: subscribe again to be sure. A cancel published in between is
  // still caught by the run's own ownership check (ownershipCheckMs below).
  onSubscriptionsRestored(sub, () => {
    sub.subscribe(store.cancelChannel).catch((err: Error) => {
      log.warn({ err: err.message }, "re-subscribing to cancels failed");
    });
  });
  sub.on("message", (channel: string, jobId: string) => {
    if (channel !== store.cancelChannel) return;
    const ctl = running.get(jobId);
    if (ctl !== undefined) {
      log.info({ jobId }, "cancel received");
      ctl.abort(new CancelledError("cancelled"));
    }
  });

  const registry = createMetricsRegistry();
  // One entry per run in progress (a Set, not a map by job id: a stalled job can be
  // run again by this same process while its first run is still winding down).
  const runs = new Set<{ startedAt: number }>();
  const jobMetrics = registerWorkerMetrics(registry, {
    runStarts: () => [...runs].map((r) => r.startedAt),
  });
  const runJob = createProcessor({
    metrics: jobMetrics,
    store,
    storage,
    log,
    running,
    zipLevel: cfg.ZIP_LEVEL,
    throttleBytesPerSecond: cfg.THROTTLE_BYTES_PER_SECOND,
    progressIntervalMs: cfg.PROGRESS_INTERVAL_MS,
    maxJobBytes: cfg.MAX_JOB_BYTES,
    resultTtlSeconds: cfg.RESULT_TTL_SECONDS,
    // Half the lock: a run whose cancel message was lost stops well within one lock term.
    ownershipCheckMs: Math.max(250, Math.floor(cfg.JOB_LOCK_MS / 2)),
    read: {
      windowBytes: cfg.READ_AHEAD_BYTES,
      windowObjects: cfg.READ_AHEAD_OBJECTS,
      rangeBytes: cfg.READ_RANGE_BYTES,
      stallMs: cfg.S3_STALL_MS,
      attempts: cfg.S3_READ_ATTEMPTS,
    },
    maxJobSeconds: cfg.MAX_JOB_SECONDS,
    // At real S3 a HEAD costs a first-byte latency and carries no body: a job of 1,000
    // small files spent 3.7 s on them 8 at a time and 1.0 s 32 at a time (at 30 ms); 64
    // at a time is ~2,000 HEADs/s, well inside S3's 5,500 per prefix.
    headConcurrency: Math.max(16, cfg.READ_AHEAD_OBJECTS * 4),
  });

  // All three parameters declared: BullMQ makes the AbortSignal only for such processors.
  const processor: typeof runJob = async (job, token, signal) => {
    const run = { startedAt: Date.now() };
    runs.add(run);
    try {
      const outcome = await runJob(job, token, signal);
      // The queue forecast's measurements (core/forecast.ts): what this run took.
      if (outcome === "completed") {
        const ms = Date.now() - run.startedAt;
        store
          .get(job.data.jobId)
          .then((rec) => recordRun(store, rec, ms))
          .catch((err: unknown) => log.debug({ err }, "run not measured"));
      }
      return outcome;
    } finally {
      runs.delete(run);
    }
  };

  const worker = new Worker<BundleJobData>(QUEUE_NAME, processor, {
    connection: redis,
    prefix: cfg.QUEUE_PREFIX,
    concurrency: cfg.WORKER_CONCURRENCY,
    // BullMQ's defaults hand a dead worker's job to another only after ~60 s; a 6 s lock
    // checked every 3 s brings that to 6-9 s (the issue asks for 15 s, result included).
    lockDuration: cfg.JOB_LOCK_MS,
    stalledInterval: cfg.JOB_STALLED_INTERVAL_MS,
    maxStalledCount: cfg.JOB_MAX_STALLED,
  });
  worker.on("error", (err) => log.error({ err }, "worker error"));
  // A job BullMQ fails without our processor deciding (stalled too often) still needs
  // a terminal state in its record, or its watchers would wait forever.
  // BullMQ emits "failed" for every failed attempt, retried or not: act only on the final.
  worker.on("failed", (job, err) => {
    if (job === undefined) return;
    const jobId = job.data.jobId;
    job
      .getState()
      .then(async (state) => {
        if (state !== "failed") return;
        const rec = await store.get(jobId);
        if (isTerminal(rec.state)) return;
        await markAbandoned(store, jobId, {
          code: "unavailable",
          message: `processing failed: ${err.message}`,
          retryable: true,
        });
        jobMetrics.failed("unavailable");
      })
      .catch((e: unknown) => log.warn({ err: e, jobId }, "could not record failure"));
  });
  // Retention: one scheduler for the whole deployment (every worker upserts the same
  // one), so a sweep runs in one worker at a time.
  const maintenanceQueue = createMaintenanceQueue(redis, cfg.QUEUE_PREFIX);
  await maintenanceQueue.upsertJobScheduler(
    "result-retention",
    { every: cfg.RETENTION_INTERVAL_MS },
    { name: "result-retention" },
  );
  const maintenance = new Worker(
    MAINTENANCE_QUEUE_NAME,
    async () => sweepExpiredResults({ store, storage, log: log.child({ part: "retention" }) }),
    { connection: redis, prefix: cfg.QUEUE_PREFIX, concurrency: 1 },
  );
  maintenance.on("error", (err) => log.error({ err }, "maintenance worker error"));
  maintenance.on("failed", (_job, err) =>
    log.warn({ err }, "retention sweep failed; the next one retries"),
  );

  // Webhooks only with a signing secret: an unsigned callback could not be trusted.
  let webhooks: Worker<WebhookJobData> | undefined;
  let webhookQueue: ReturnType<typeof createWebhookQueue> | undefined;
  let dispatcher: OutboxDispatcher | undefined;
  if (cfg.WEBHOOK_SECRET !== undefined) {
    webhookQueue = createWebhookQueue(redis, {
      prefix: cfg.QUEUE_PREFIX,
      attempts: cfg.WEBHOOK_ATTEMPTS,
      backoffMs: cfg.WEBHOOK_BACKOFF_MS,
    });
    webhooks = new Worker<WebhookJobData>(
      WEBHOOK_QUEUE_NAME,
      createWebhookProcessor({
        store,
        storage,
        secret: cfg.WEBHOOK_SECRET,
        links:
          cfg.DOWNLOAD_LINK_SECRET === undefined
            ? undefined
            : new DownloadLinks(cfg.DOWNLOAD_LINK_SECRET, cfg.PUBLIC_URL),
        policy: {
          allowPrivate: cfg.WEBHOOK_ALLOW_PRIVATE,
          allowedHosts: cfg.WEBHOOK_ALLOWED_HOSTS ?? [],
        },
        timeoutMs: cfg.WEBHOOK_TIMEOUT_MS,
        log: log.child({ part: "webhooks" }),
        maxInFlightPerOwner: cfg.WEBHOOK_MAX_IN_FLIGHT_PER_OWNER,
        queue: webhookQueue,
      }),
      { connection: redis, prefix: cfg.QUEUE_PREFIX, concurrency: 16 },
    );
    webhooks.on("error", (err) => log.error({ err }, "webhook worker error"));
    registerWebhookMetrics(registry, {
      outboxEntries: () => redis.zcard(store.webhookOutboxKey),
      onError: (err) => log.debug({ err }, "webhook outbox metrics unavailable"),
    });
    dispatcher = startOutboxDispatcher({
      redis,
      store,
      queue: webhookQueue,
      intervalMs: OUTBOX_INTERVAL_MS,
      leaseMs: OUTBOX_LEASE_MS,
      log,
    });
  }

  // History (HISTORY_DATABASE_URL): its own blocking connection; never in a job's path.
  const history =
    cfg.HISTORY_DATABASE_URL !== undefined
      ? startHistoryWriter({
          redis: createRedis(target, { role: "worker", name: "download-jobs:history" }),
          stream: store.keys.historyOutbox,
          db: new HistoryDb(cfg.HISTORY_DATABASE_URL),
          log: log.child({ part: "history" }),
          retentionDays: cfg.HISTORY_RETENTION_DAYS,
          metrics: registerHistoryMetrics(registry, {
            outbox: () => historyOutboxState(redis, store.keys.historyOutbox),
            onError: (err) => log.debug({ err }, "history outbox metrics unavailable"),
          }),
        })
      : undefined;

  await worker.waitUntilReady();
  log.info(
    { queue: QUEUE_NAME, concurrency: cfg.WORKER_CONCURRENCY, webhooks: webhooks !== undefined },
    "worker ready",
  );

  return {
    running: () => [...running.keys()],
    metrics: registry,
    readinessChecks: [
      redisWriteCheck("redis", redis, cfg.QUEUE_PREFIX),
      redisCheck("redis-events", sub, { ping: false }),
      s3Check(storage),
      {
        name: "worker",
        run: async () => {
          if (!worker.isRunning()) throw new Error("worker is not taking jobs");
        },
      },
    ],
    async close() {
      dispatcher?.stop();
      await Promise.all([worker.close(), maintenance.close(), webhooks?.close(), history?.stop()]);
      await Promise.all([maintenanceQueue.close(), webhookQueue?.close()]);
      await sub.quit().catch(() => undefined);
      await redis.quit().catch(() => undefined);
      await ackConn?.quit().catch(() => undefined);
      storage.destroy();
    },
  };
}
