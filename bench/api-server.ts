import { loadConfig } from "../core/config.js";
import { createLogger } from "../core/logger.js";
import { startApiServer } from "../server/server.js";

// The API for the benchmarks: server/main.ts's startApiServer, with the lean Connect
// paths on or (BENCH_FAST_PATHS=0) off, so one run can compare them with connect-node.
// Prints "listening <port>" once it serves; SIGTERM stops it gracefully.

const cfg = loadConfig();
const log = createLogger(cfg.LOG_LEVEL, "bench-api");
const server = await startApiServer(cfg, log, {
  leanTransport: process.env.BENCH_FAST_PATHS !== "0",
});
process.stdout.write(`listening ${server.port}\n`);
process.on("SIGTERM", () => {
  server.close().then(
    () => process.exit(0),
    () => process.exit(1),
  );
});
