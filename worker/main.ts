import { Readiness } from "../core/health.js";
import { createLogger, logFormatFor } from "../core/logger.js";
import { registerReadinessMetrics, serveMetrics } from "../core/metrics.js";
import { exitOnStopSignals, loadConfigOrExit } from "../core/process-entry.js";
import { redisTargetFrom } from "../core/redis.js";
import { startTracing } from "../core/tracing.js";
import { startWorkerHealthServer } from "./health.js";
import { startWorker } from "./worker.js";

// Worker process entry: config, the BullMQ worker, signals.

async function main(): Promise<void> {
  const cfg = loadConfigOrExit();
  const log = createLogger(cfg.LOG_LEVEL, "worker", { format: logFormatFor(cfg) });
  if (redisTargetFrom(cfg) === undefined || cfg.S3_ENDPOINT === undefined) {
    log.fatal(
      "REDIS_URL (or REDIS_CLUSTER_NODES, REDIS_SENTINELS) and S3_ENDPOINT must be set for a worker (npm start sets them for you)",
    );
    process.exit(2);
  }
  process.on("unhandledRejection", (err) => log.error({ err }, "unhandled rejection"));
  const tracing = startTracing(cfg, { serviceName: "download-jobs-worker" });
  const worker = await startWorker(cfg, log);
  let stopping = false;
  if (cfg.WORKER_HEALTH_PORT !== 0) {
    const readiness = new Readiness(worker.readinessChecks, cfg.READY_TIMEOUT_MS);
    registerReadinessMetrics(worker.metrics, readiness, () => stopping);
    await startWorkerHealthServer({
      host: cfg.HOST,
      port: cfg.WORKER_HEALTH_PORT,
      readiness,
      closing: () => stopping,
      log,
      extra: (req, res) => serveMetrics(req, res, worker.metrics),
    });
  }
  exitOnStopSignals(
    async () => {
      stopping = true;
      await worker.close();
      await tracing.shutdown();
    },
    {
      log,
      // Jobs still running at the deadline are picked up again by another worker through
      // stall detection, so exiting is safe.
      graceMs: cfg.SHUTDOWN_GRACE_MS,
      timeoutExitCode: 0,
      context: () => ({ running: worker.running() }),
    },
  );
}

void main();
