import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { type Readiness, serveHealth } from "../core/health.js";
import type { Logger } from "../core/logger.js";

// The worker serves no RPCs, so it gets a small HTTP port of its own for probes:
// /healthz (the process and its event loop answer) and /readyz (its Redis connections
// and S3 answer). Off unless WORKER_HEALTH_PORT is set; compose sets it.

export interface WorkerHealthOptions {
  host: string;
  /** 0 picks a free port (tests). */
  port: number;
  readiness: Readiness;
  /** True once the worker is stopping: probes answer 503. */
  closing(): boolean;
  log: Logger;
  /** Serves further paths (e.g. /metrics); returns false to fall through to 404. */
  extra?: (req: IncomingMessage, res: ServerResponse) => boolean;
}

export interface WorkerHealthServer {
  port: number;
  close(): Promise<void>;
}

export async function startWorkerHealthServer(
  opts: WorkerHealthOptions,
): Promise<WorkerHealthServer> {
  const server = createServer((req, res) => {
    if (serveHealth(req, res, { closing: opts.closing, readiness: opts.readiness })) return;
    if (opts.extra?.(req, res) === true) return;
    res.writeHead(404);
    res.end();
  });
  // Probes are tiny; nothing legitimate holds a connection open for long.
  server.headersTimeout = 5_000;
  server.requestTimeout = 10_000;
  server.keepAliveTimeout = 5_000;
  server.on("clientError", (_err, socket) => socket.destroy());
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(opts.port, opts.host, () => {
      server.off("error", reject);
      resolve();
    });
  });
  const port = (server.address() as AddressInfo).port;
  opts.log.info({ host: opts.host, port }, "worker health listening");
  return {
    port,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}
