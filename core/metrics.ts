import { Counter, collectDefaultMetrics, Gauge, Histogram, Registry } from "prom-client";
import type { ReadinessReport } from "./health.js";

export type { Registry };

// Prometheus metrics, one registry per process (never prom-client's global one, so that
// tests can run an API and a worker side by side and scrape each on its own). The names
// are a contract with the Grafana dashboard in the compose stack: rename nothing here
// without changing it there.
//
// The API registers the RPC, stream and queue metrics; the worker the job metrics. Both
// add Node's process metrics (CPU, memory, event loop lag, GC).

/** A registry holding Node's default process metrics. */
export function createMetricsRegistry(): Registry {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry });
  return registry;
}

/**
 * What /readyz would answer, as gauges, so that an alert can say which replica is not
 * ready and why (a probe only says no). Runs the readiness checks at scrape time, at
 * most once a second however many scrapers there are.
 */
export function registerReadinessMetrics(
  registry: Registry,
  readiness: { run(): Promise<ReadinessReport> },
  closing: () => boolean = () => false,
): void {
  const report = cached(() => readiness.run(), 1000);
  new Gauge({
    name: "readiness_ok",
    help: "1 when this process is ready (its /readyz answers 200), 0 when not.",
    registers: [registry],
    async collect() {
      const r = await report().catch(() => undefined);
      this.set(r?.ready === true && !closing() ? 1 : 0);
    },
  });
  new Gauge({
    name: "readiness_check_ok",
    help: "1 when the readiness check passed, 0 when it failed, by check (redis, s3, ...).",
    labelNames: ["check"] as const,
    registers: [registry],
    async collect() {
      const r = await report().catch(() => undefined);
      for (const [check, result] of Object.entries(r?.checks ?? {}))
        this.set({ check }, result.ok ? 1 : 0);
    },
  });
}

// ---- API ----------------------------------------------------------------------------

/** BullMQ's job states, as `queue_jobs{state}` reports them. */
export const QUEUE_STATES = [
  "waiting",
  "prioritized",
  "active",
  "delayed",
  "completed",
  "failed",
  "waiting-children",
] as const;

export interface ApiMetricsSources {
  /** WatchJob streams open in this process right now. */
  openStreams(): number;
  /** Jobs per BullMQ state; called at most once per `queueCountsTtlMs`. */
  queueCounts(): Promise<Record<string, number>>;
  /** How long one queue count is reused, so that scrapes do not hammer Redis; default 2 s. */
  queueCountsTtlMs?: number;
  /** Told when counting the queue failed (the gauge keeps its last values). */
  onError?(err: unknown): void;
}

export interface ApiMetrics {
  /** One finished RPC: its procedure label, Connect code name and duration. */
  rpc(method: string, code: string, seconds: number): void;
  /** One HTTP/2 connection or stream ended by a limit (server/dual-protocol-listener.ts). */
  http2Limit(event: Http2LimitEvent): void;
}

/**
 * What an HTTP/2 limit did: a new session closed for sending no request in time, an idle
 * session closed, a stream reset for a body that did not end in time, a session sent
 * GOAWAY(ENHANCE_YOUR_CALM) for resetting streams faster than it used them.
 */
export const HTTP2_LIMIT_EVENTS = [
  "head_timeout",
  "idle_close",
  "body_timeout",
  "rapid_reset",
] as const;
export type Http2LimitEvent = (typeof HTTP2_LIMIT_EVENTS)[number];

export function registerApiMetrics(registry: Registry, sources: ApiMetricsSources): ApiMetrics {
  const requests = new Counter({
    name: "rpc_requests_total",
    help: "RPCs served, by procedure and Connect code (ok, not_found, ...).",
    labelNames: ["method", "code"] as const,
    registers: [registry],
  });
  const duration = new Histogram({
    name: "rpc_duration_seconds",
    help: "RPC duration from the request's arrival to the response's end; for WatchJob, the stream's lifetime.",
    labelNames: ["method"] as const,
    // Unary calls take milliseconds; the top buckets are there for streams.
    buckets: [
      0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900,
    ],
    registers: [registry],
  });
  new Gauge({
    name: "watch_streams_open",
    help: "WatchJob streams open in this API process.",
    registers: [registry],
    collect() {
      this.set(sources.openStreams());
    },
  });
  const limits = new Counter({
    name: "http2_limit_events_total",
    help: "HTTP/2 connections and streams ended by a limit: head_timeout, idle_close, body_timeout, rapid_reset.",
    labelNames: ["event"] as const,
    registers: [registry],
  });
  // Every series from the start, so that an alert on rate() sees the first event.
  for (const event of HTTP2_LIMIT_EVENTS) limits.inc({ event }, 0);
  const counts = cached(sources.queueCounts, sources.queueCountsTtlMs ?? 2000);
  new Gauge({
    name: "queue_jobs",
    help: "Jobs in the BullMQ queue by state (the same in every API process: aggregate with max, not sum).",
    labelNames: ["state"] as const,
    registers: [registry],
    async collect() {
      try {
        const byState = await counts();
        for (const state of QUEUE_STATES) this.set({ state }, byState[state] ?? 0);
      } catch (err) {
        sources.onError?.(err);
      }
    },
  });
  // Each call's series, looked up by a plain string key: prom-client hashes a labels
  // object on every inc and observe (sorting its keys), which a poll would pay twice.
  const series = new Map<
    string,
    { count: ReturnType<typeof requests.labels>; time: ReturnType<typeof duration.labels> }
  >();
  return {
    rpc(method, code, seconds) {
      const key = `${method} ${code}`;
      let s = series.get(key);
      if (s === undefined) {
        s = { count: requests.labels({ method, code }), time: duration.labels({ method }) };
        series.set(key, s);
      }
      s.count.inc();
      s.time.observe(seconds);
    },
    http2Limit(event) {
      limits.inc({ event });
    },
  };
}

/** The last result while it is younger than `ttlMs`; concurrent callers share one call. */
function cached<T>(load: () => Promise<T>, ttlMs: number): () => Promise<T> {
  let value: { at: number; data: T } | undefined;
  let inFlight: Promise<T> | undefined;
  return () => {
    if (value !== undefined && Date.now() - value.at < ttlMs) return Promise.resolve(value.data);
    inFlight ??= load()
      .then((data) => {
        value = { at: Date.now(), data };
        return data;
      })
      .finally(() => {
        inFlight = undefined;
      });
    return inFlight;
  };
}

// ---- worker -------------------------------------------------------------------------

/** How one run of a job ended. */
/** How one run ended; "superseded": another run took the job (this run had lost its lock). */
export type JobOutcome = "completed" | "failed" | "cancelled" | "retry" | "superseded";

/** What the processor reports; every method is cheap and never throws. */
export interface JobMetrics {
  /** A run ended (a retried attempt is one run, with outcome "retry"). */
  runEnded(outcome: JobOutcome, seconds: number): void;
  /** Bytes read from source files into a ZIP. */
  bytesRead(bytes: number): void;
  /** A job reached FAILED with this error code (not_found, unavailable, ...). */
  failed(code: string): void;
  /** An attempt failed and BullMQ will run the job again. */
  retried(): void;
  /** From the moment the API recorded the cancel to the moment the processor stopped. */
  cancelStopped(seconds: number): void;
}

export function registerWorkerMetrics(
  registry: Registry,
  sources: {
    /** When each run in progress in this process started (ms since the epoch). */
    runStarts?: () => Iterable<number>;
  } = {},
): JobMetrics {
  const { runStarts } = sources;
  if (runStarts !== undefined) {
    new Gauge({
      name: "jobs_running",
      help: "Runs of jobs in progress in this worker process.",
      registers: [registry],
      collect() {
        this.set([...runStarts()].length);
      },
    });
    // A run older than MAX_JOB_SECONDS should have been stopped: one that is not is
    // stuck in PROCESSING (an alert watches this).
    new Gauge({
      name: "job_oldest_run_seconds",
      help: "Age of the oldest run in progress in this worker process; 0 when none runs.",
      registers: [registry],
      collect() {
        const oldest = Math.min(Date.now(), ...runStarts());
        this.set((Date.now() - oldest) / 1000);
      },
    });
  }
  const duration = new Histogram({
    name: "job_duration_seconds",
    help: "Duration of one run of a job, by outcome (completed, failed, cancelled, retry, superseded).",
    labelNames: ["outcome"] as const,
    buckets: [0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800],
    registers: [registry],
  });
  const bytes = new Counter({
    name: "job_bytes_total",
    help: "Bytes read from source files into ZIPs.",
    registers: [registry],
  });
  const failures = new Counter({
    name: "job_failures_total",
    help: "Jobs that ended FAILED, by the error code the job shows.",
    labelNames: ["code"] as const,
    registers: [registry],
  });
  const cancelLatency = new Histogram({
    name: "cancel_latency_seconds",
    help: "From the API recording a cancel to the worker stopping the running job.",
    buckets: [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
    registers: [registry],
  });
  const retries = new Counter({
    name: "job_retries_total",
    help: "Failed attempts that BullMQ runs again (after backoff).",
    registers: [registry],
  });
  return {
    runEnded: (outcome, seconds) => duration.observe({ outcome }, seconds),
    bytesRead: (n) => bytes.inc(n),
    failed: (code) => failures.inc({ code }),
    retried: () => retries.inc(),
    cancelStopped: (seconds) => cancelLatency.observe(Math.max(0, seconds)),
  };
}

/** Callbacks owed and not yet settled (delivered or given up), for the backlog alert. */
export function registerWebhookMetrics(
  registry: Registry,
  sources: { outboxEntries: () => Promise<number>; onError?: (err: unknown) => void },
): void {
  const entries = cached(sources.outboxEntries, 2000);
  new Gauge({
    name: "webhook_outbox_entries",
    help: "Job-end callbacks not yet delivered or given up (the same in every worker: aggregate with max).",
    registers: [registry],
    async collect() {
      try {
        this.set(await entries());
      } catch (err) {
        sources.onError?.(err);
      }
    },
  });
}

/** What the history writer tells Prometheus (worker/history-writer.ts). */
export interface HistoryMetrics {
  written(n: number): void;
  /** A batch PostgreSQL did not take (it is retried). */
  writeFailed(): void;
  /** Changes given up: trimmed from the outbox before they were written, or refused as data. */
  skipped(n: number): void;
}

export function registerHistoryMetrics(
  registry: Registry,
  sources: {
    /** Entries in the outbox and the age of the oldest one (ms; 0 when empty). */
    outbox: () => Promise<{ entries: number; oldestAgeMs: number }>;
    onError?: (err: unknown) => void;
  },
): HistoryMetrics {
  const written = new Counter({
    name: "history_changes_written_total",
    help: "Job changes this worker wrote to PostgreSQL.",
    registers: [registry],
  });
  const failures = new Counter({
    name: "history_write_failures_total",
    help: "Batches of job changes PostgreSQL did not take (each is retried).",
    registers: [registry],
  });
  const skipped = new Counter({
    name: "history_changes_skipped_total",
    help: "Job changes never written: trimmed from the outbox at its cap, or refused by PostgreSQL as data.",
    registers: [registry],
  });
  const outbox = cached(sources.outbox, 2000);
  const read = async (pick: (o: { entries: number; oldestAgeMs: number }) => number) => {
    try {
      return pick(await outbox());
    } catch (err) {
      sources.onError?.(err);
      return undefined;
    }
  };
  new Gauge({
    name: "history_outbox_entries",
    help: "Job changes waiting in the Redis outbox for PostgreSQL (the same in every worker: aggregate with max).",
    registers: [registry],
    async collect() {
      const v = await read((o) => o.entries);
      if (v !== undefined) this.set(v);
    },
  });
  new Gauge({
    name: "history_outbox_lag_seconds",
    help: "Age of the oldest job change not yet in PostgreSQL; 0 when the history is up to date.",
    registers: [registry],
    async collect() {
      const v = await read((o) => o.oldestAgeMs / 1000);
      if (v !== undefined) this.set(v);
    },
  });
  return {
    written: (n) => written.inc(n),
    writeFailed: () => failures.inc(),
    skipped: (n) => skipped.inc(n),
  };
}

// ---- HTTP -----------------------------------------------------------------------------

interface MetricsRequest {
  url?: string | undefined;
  method?: string | undefined;
}

interface MetricsResponse {
  readonly headersSent: boolean;
  readonly destroyed: boolean;
  writeHead(status: number, headers: Record<string, string>): unknown;
  end(body: string): unknown;
  end(): unknown;
}

/**
 * Answers `GET /metrics` in Prometheus' text format; false for any other request. Not
 * for the public internet: the edge proxy routes only the API's own paths.
 */
export function serveMetrics(
  req: MetricsRequest,
  res: MetricsResponse,
  registry: Registry,
): boolean {
  const path = (req.url ?? "").split("?", 1)[0];
  if (path !== "/metrics" || (req.method !== "GET" && req.method !== "HEAD")) return false;
  registry.metrics().then(
    (text) => {
      if (res.headersSent || res.destroyed) return;
      res.writeHead(200, { "content-type": registry.contentType, "cache-control": "no-store" });
      if (req.method === "HEAD") res.end();
      else res.end(text);
    },
    (err: unknown) => {
      if (res.headersSent || res.destroyed) return;
      res.writeHead(500, { "content-type": "text/plain" });
      res.end(`metrics failed: ${err instanceof Error ? err.message : String(err)}\n`);
    },
  );
  return true;
}
