import type { RedisClient } from "./redis.js";

// Liveness and readiness, shared by the API and the worker. Liveness (/healthz) says
// only that the process answers; readiness (/readyz) says that what it needs to do its
// work (Redis, S3) answers too, within a short deadline so that a probe never hangs on
// a dependency that is black-holed rather than refusing.

export interface ReadinessCheck {
  name: string;
  /** Resolves when the dependency answered; `signal` aborts at the deadline. */
  run(signal: AbortSignal): Promise<void>;
}

export interface CheckResult {
  ok: boolean;
  ms: number;
  /** Why it failed: "timeout", or an error code/name; never an address or a credential. */
  error?: string;
}

export interface ReadinessReport {
  ready: boolean;
  checks: Record<string, CheckResult>;
}

export class Readiness {
  private inFlight: Promise<ReadinessReport> | undefined;

  constructor(
    private readonly checks: ReadinessCheck[],
    private readonly timeoutMs: number,
  ) {}

  /**
   * Runs every check at once, each bounded by the deadline. Probes that arrive while a
   * round is running share it, so a burst of probes costs one round of pings.
   */
  run(): Promise<ReadinessReport> {
    this.inFlight ??= this.runAll().finally(() => {
      this.inFlight = undefined;
    });
    return this.inFlight;
  }

  private async runAll(): Promise<ReadinessReport> {
    const results = await Promise.all(this.checks.map((c) => runOne(c, this.timeoutMs)));
    const checks: Record<string, CheckResult> = {};
    this.checks.forEach((c, i) => {
      checks[c.name] = results[i] as CheckResult;
    });
    return { ready: results.every((r) => r.ok), checks };
  }
}

async function runOne(check: ReadinessCheck, timeoutMs: number): Promise<CheckResult> {
  const started = performance.now();
  const ctl = new AbortController();
  let timer: NodeJS.Timeout | undefined;
  const deadline = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      const err = new Error("timeout");
      ctl.abort(err);
      reject(err);
    }, timeoutMs);
  });
  try {
    // Not every dependency honours the signal (an ioredis command cannot be
    // withdrawn), so the deadline also wins the race on its own.
    await Promise.race([check.run(ctl.signal), deadline]);
    return { ok: true, ms: Math.round(performance.now() - started) };
  } catch (err) {
    return {
      ok: false,
      ms: Math.round(performance.now() - started),
      error: reason(err, ctl.signal),
    };
  } finally {
    clearTimeout(timer);
  }
}

function reason(err: unknown, signal: AbortSignal): string {
  if (signal.aborted) return "timeout";
  if (typeof err === "object" && err !== null) {
    const { code, name } = err as { code?: unknown; name?: unknown };
    if (typeof code === "string" && code !== "") return code;
    if (typeof name === "string" && name !== "" && name !== "Error") return name;
  }
  return "unavailable";
}

/** A Redis connection is ready and answers PING (or, for a subscriber, is connected). */
export function redisCheck(
  name: string,
  conn: RedisClient,
  opts: { ping?: boolean } = {},
): ReadinessCheck {
  return {
    name,
    async run() {
      assertConnected(conn);
      if (opts.ping !== false) await conn.ping();
    },
  };
}

/**
 * Redis takes a write where the queue lives: a SET with a short expiry on a key that
 * shares the queue's hash tag (`prefix` is QUEUE_PREFIX). A PING proves much less: on a
 * cluster it reaches some node, not the master that owns the queue's slot, and a
 * demoted primary or a replica still answers it. While that master is down (until a
 * replica is promoted) or a Sentinel primary is gone, this check fails, so /readyz and
 * gRPC health move traffic away; it passes again once the new primary takes writes.
 */
export function redisWriteCheck(name: string, conn: RedisClient, prefix: string): ReadinessCheck {
  const key = `${prefix}:readyz`;
  return {
    name,
    async run() {
      assertConnected(conn);
      await conn.set(key, String(Date.now()), "PX", 60_000);
    },
  };
}

function assertConnected(conn: RedisClient): void {
  // While ioredis reconnects it queues commands instead of failing them; a probe
  // must not wait for that.
  if (conn.status !== "ready")
    throw Object.assign(new Error("not connected"), { code: conn.status });
}

/** What serveHealth needs of node:http's and node:http2's request and response. */
interface HealthRequest {
  readonly method?: string | undefined;
  readonly url?: string | undefined;
}
interface HealthResponse {
  readonly headersSent: boolean;
  readonly destroyed: boolean;
  writeHead(status: number, headers: Record<string, string>): unknown;
  end(body: string): unknown;
  end(): unknown;
}

export interface HealthEndpoints {
  /** True once the process is stopping: both endpoints answer 503 so traffic moves away. */
  closing(): boolean;
  readiness: Readiness;
}

/**
 * Answers GET/HEAD /healthz and /readyz; returns false for any other request so the
 * caller can go on. /healthz: 200 "ok" while the process is up and not stopping.
 * /readyz: 200 when every check passed, else 503; the JSON body names each check.
 */
export function serveHealth(
  req: HealthRequest,
  res: HealthResponse,
  health: HealthEndpoints,
): boolean {
  if (req.method !== "GET" && req.method !== "HEAD") return false;
  const path = (req.url ?? "").split("?", 1)[0];
  if (path === "/healthz") {
    const closing = health.closing();
    send(
      req,
      res,
      closing ? 503 : 200,
      "text/plain; charset=utf-8",
      closing ? "shutting down\n" : "ok\n",
    );
    return true;
  }
  if (path === "/readyz") {
    health.readiness.run().then(
      (report) => {
        const closing = health.closing();
        const ready = report.ready && !closing;
        const body = JSON.stringify({
          ready,
          ...(closing ? { closing: true } : {}),
          checks: report.checks,
        });
        send(req, res, ready ? 200 : 503, "application/json", `${body}\n`);
      },
      () => send(req, res, 503, "application/json", '{"ready":false}\n'),
    );
    return true;
  }
  return false;
}

function send(
  req: HealthRequest,
  res: HealthResponse,
  status: number,
  type: string,
  body: string,
): void {
  if (res.headersSent || res.destroyed) return;
  res.writeHead(status, { "content-type": type, "cache-control": "no-store" });
  if (req.method === "HEAD") res.end();
  else res.end(body);
}

/** The S3 endpoint answers for the result bucket (a HEAD, aborted at the deadline). */
export function s3Check(storage: { ping(signal?: AbortSignal): Promise<void> }): ReadinessCheck {
  return { name: "s3", run: (signal) => storage.ping(signal) };
}
