import { createLogger, logFormatFor } from "../core/logger.js";
import { exitOnStopSignals, loadConfigOrExit } from "../core/process-entry.js";
import { redisTargetFrom } from "../core/redis.js";
import { startTracing } from "../core/tracing.js";
import { startApiServer } from "./server.js";

// The API process: config, listen, and a graceful stop on SIGTERM/SIGINT. Open watches
// end with UNAVAILABLE so clients reconnect to another instance; if anything hangs the
// process still exits before the orchestrator's kill (SHUTDOWN_GRACE_MS, under 10 s).

async function main(): Promise<void> {
  const cfg = loadConfigOrExit();
  const missing = [
    ...(redisTargetFrom(cfg) === undefined ? ["REDIS_URL"] : []),
    ...(cfg.S3_ENDPOINT === undefined ? ["S3_ENDPOINT"] : []),
  ];
  if (missing.length > 0) {
    console.error(
      `${missing.join(" and ")} must be set to run the API on its own ` +
        "(e.g. REDIS_URL=redis://127.0.0.1:6379 S3_ENDPOINT=http://127.0.0.1:9000), " +
        "or run `npm start` to bring up the whole stack with embedded Redis and S3.",
    );
    process.exit(2);
  }
  const log = createLogger(cfg.LOG_LEVEL, "api", { format: logFormatFor(cfg) });
  // Before the server: spans need the provider registered when the first call arrives.
  const tracing = startTracing(cfg, { serviceName: "download-jobs-api" });
  const server = await startApiServer(cfg, log, { tracing: tracing.enabled });

  exitOnStopSignals(
    async () => {
      await server.close();
      await tracing.shutdown();
    },
    { log, graceMs: Math.min(cfg.SHUTDOWN_GRACE_MS, 9_500), timeoutExitCode: 1 },
  );
}

main().catch((err: unknown) => {
  console.error("api failed to start:", err instanceof Error ? err.message : err);
  process.exit(1);
});
