import { Code, ConnectError } from "@connectrpc/connect";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import type { Logger } from "pino";
import { type Config, ownerSettingsFrom } from "../core/config.js";
import { DownloadLinks } from "../core/download-link.js";
import { QueueForecaster } from "../core/forecast.js";
import { Readiness, redisCheck, redisWriteCheck, s3Check, serveHealth } from "../core/health.js";
import { HistoryDb } from "../core/history.js";
import { HistoryReader } from "../core/history-reader.js";
import { JobService } from "../core/job-service.js";
import { JobStore } from "../core/job-store.js";
import {
  createMetricsRegistry,
  QUEUE_STATES,
  registerApiMetrics,
  registerReadinessMetrics,
  serveMetrics,
} from "../core/metrics.js";
import { createBundleQueue } from "../core/queue.js";
import { createRedis, type RedisClient, redisTargetFrom, waitForRedis } from "../core/redis.js";
import { ReplicaAck } from "../core/replica-ack.js";
import { Storage, storageOptionsFrom } from "../core/storage.js";
import { checkWebhookUrl } from "../core/webhook-target.js";
import { DownloadService } from "../gen/downloads/v1/download_service_pb.js";
import { authInterceptor, createAuthenticator } from "./auth.js";
import { connectRoutes } from "./connect/connect-routes.js";
import { connectionKey, connectionOf } from "./connect/grpc-health.js";
import { guardRequests } from "./connect/request-guard.js";
import { rpcInterceptor } from "./connect/rpc-interceptor.js";
import { createDualProtocolListener } from "./dual-protocol-listener.js";
import { createAdminBoard } from "./http/admin-board.js";
import { createDownloadLinkRoute } from "./http/download-link.js";
import { createJobEvents } from "./http/job-events.js";
import { createStaticSite } from "./http/static-site.js";
import { createLeanTransport } from "./lean/lean-transport.js";
import { downloadRpcs } from "./rpc/download-rpcs.js";
import { JobPresenter } from "./rpc/presenter.js";
import { WatchTokens } from "./rpc/watch-token.js";
import { type NodeHandler, rpcContextValues, withRpcLog } from "./rpc-log.js";
import { WatchHub } from "./watch-hub.js";

export interface ApiServer {
  port: number;
  /** http://host:port, for clients. */
  url: string;
  /** Graceful stop: see startApiServer. Safe to call more than once. */
  close(): Promise<void>;
}

export interface ApiServerOptions {
  /** Request-head deadline (slow-loris); default cfg.HTTP_HEADERS_TIMEOUT_MS. */
  headersTimeoutMs?: number;
  /** Whole-request deadline (an HTTP/2 stream's body); default cfg.HTTP_REQUEST_TIMEOUT_MS. */
  requestTimeoutMs?: number;
  /** How often HTTP/1.1 connections are checked against those deadlines; default 1 s. */
  connectionsCheckingIntervalMs?: number;
  /** How long close() lets in-flight calls finish before cutting connections. */
  drainTimeoutMs?: number;
  /** One trace span per RPC (main.ts passes whether startTracing turned tracing on). */
  tracing?: boolean;
  /**
   * Serve DownloadService through the lean transport (lean/lean-transport.ts) as well as
   * connect-node; default true. False leaves every call to connect-node, for comparisons.
   */
  leanTransport?: boolean;
}

/** The message open WatchJob streams end with when the server stops. */
export const SHUTDOWN_MESSAGE = "server shutting down, reconnect";

/**
 * Starts the API on one port (cfg.HOST, cfg.PORT; 0 picks a free port): Connect, gRPC
 * and gRPC-Web over HTTP/1.1 and h2c. Needs cfg.REDIS_URL (or REDIS_CLUSTER_NODES); S3 is only used to presign.
 *
 * close() stops accepting, ends every open WatchJob stream with UNAVAILABLE so clients
 * reconnect elsewhere, lets in-flight calls finish (up to drainTimeoutMs), closes the
 * connections, then the queue and Redis.
 */
export async function startApiServer(
  cfg: Config,
  log: Logger,
  opts: ApiServerOptions = {},
): Promise<ApiServer> {
  const target = redisTargetFrom(cfg);
  if (target === undefined)
    throw new Error(
      "REDIS_URL, REDIS_CLUSTER_NODES or REDIS_SENTINELS is required to start the API server",
    );
  // Before any connection: a server without tokens (and not explicitly open) must not start.
  const auth = createAuthenticator({
    tokens: cfg.AUTH_TOKENS ?? [],
    disabled: cfg.AUTH_DISABLED,
    log,
  });
  const redis = createRedis(target, { role: "api", name: "download-jobs:api" });
  // WAIT blocks its connection, so durability gets one of its own (core/replica-ack.ts).
  const ackConn =
    cfg.REDIS_MIN_REPLICAS_ACK > 0
      ? createRedis(target, { role: "api", name: "download-jobs:api-replica-ack" })
      : undefined;
  ackConn?.on("error", (err: Error) => log.warn({ err: err.message }, "redis connection error"));
  // Exactly one subscriber connection per process, whatever the number of watchers.
  const sub = createRedis(target, { role: "subscriber", name: "download-jobs:api-events" });
  for (const [name, conn] of [
    ["redis", redis],
    ["redis-subscriber", sub],
  ] as const) {
    conn.on("error", (err: Error) =>
      log.warn({ err: err.message, conn: name }, "redis connection error"),
    );
  }
  const storage = new Storage(storageOptionsFrom(cfg));
  const queue = createBundleQueue(redis, {
    prefix: cfg.QUEUE_PREFIX,
    attempts: cfg.JOB_ATTEMPTS,
    backoffMs: cfg.JOB_BACKOFF_MS,
  });
  // The queue shares the command connection, whose errors are logged above.
  queue.on("error", (err) => log.debug({ err: err.message }, "queue error"));

  // Read only by the two history RPCs, never on the job path: a small pool, and a
  // statement that outlasts its timeout fails (UNAVAILABLE) instead of holding a call.
  const historyDb =
    cfg.HISTORY_DATABASE_URL === undefined
      ? undefined
      : new HistoryDb(cfg.HISTORY_DATABASE_URL, { max: 2, statementTimeoutMs: 5000 });

  const closeBackends = async () => {
    await historyDb?.close().catch((err: unknown) => log.warn({ err }, "history close failed"));
    await queue.close().catch((err: unknown) => log.warn({ err }, "queue close failed"));
    storage.destroy();
    await Promise.all([quit(redis), quit(sub), ...(ackConn ? [quit(ackConn)] : [])]);
  };

  try {
    await Promise.all([waitForRedis(redis), waitForRedis(sub)]);
  } catch (err) {
    await closeBackends();
    throw err;
  }

  const store = new JobStore(redis, {
    prefix: cfg.QUEUE_PREFIX,
    recordTtlSeconds: cfg.JOB_RECORD_TTL_SECONDS,
    historyOutboxMaxEntries: cfg.HISTORY_OUTBOX_MAX_ENTRIES,
    // The jobs being polled: an unchanged one is a version check, not a read and decode.
    readCache: 5000,
  });
  const webhookPolicy = {
    allowPrivate: cfg.WEBHOOK_ALLOW_PRIVATE,
    allowedHosts: cfg.WEBHOOK_ALLOWED_HOSTS ?? [],
  };
  const jobs = new JobService({
    store,
    queue,
    redis,
    maxFilesPerJob: cfg.MAX_FILES_PER_JOB,
    policy: {
      idempotencyTtlSeconds: cfg.IDEMPOTENCY_TTL_SECONDS,
      dedupInFlight: cfg.DEDUP_IN_FLIGHT,
      reuseResults: cfg.REUSE_RESULTS,
      // The dedup index must outlive a completed job's result, or reuse would miss it.
      dedupTtlSeconds: cfg.RESULT_TTL_SECONDS + 24 * 3600,
      maxActivePerOwner: cfg.MAX_ACTIVE_JOBS_PER_OWNER,
      ratePerMinute: cfg.INITIATE_RATE_PER_MINUTE,
    },
    maxQueueDepth: cfg.MAX_QUEUE_DEPTH,
    deleteResult: (key) => storage.deleteResult(key),
    ownerSettings: ownerSettingsFrom(cfg.AUTH_TOKENS ?? [], {
      maxPriority: cfg.DEFAULT_MAX_PRIORITY,
      weight: 1,
    }),
    scheduling: { fair: cfg.FAIR_SCHEDULING },
    replicaAck:
      ackConn &&
      new ReplicaAck(ackConn, {
        prefix: cfg.QUEUE_PREFIX,
        replicas: cfg.REDIS_MIN_REPLICAS_ACK,
        timeoutMs: cfg.REDIS_REPLICAS_ACK_TIMEOUT_MS,
      }),
    checkCallbackUrl:
      cfg.WEBHOOK_SECRET === undefined
        ? undefined
        : async (url) => (await checkWebhookUrl(url, webhookPolicy)).url.href,
  });
  const hub = new WatchHub(sub, store, {
    heartbeatMs: cfg.WATCH_HEARTBEAT_MS,
    queuedHeartbeatMs: cfg.WATCH_QUEUED_HEARTBEAT_MS,
    maxStreamMs: cfg.WATCH_MAX_STREAM_MS,
    log: log.child({ part: "watch-hub" }),
  });
  // /readyz and grpc.health.v1 report the same checks; from close() on, both say no.
  const stopping = new AbortController();
  const readiness = new Readiness(
    [
      redisWriteCheck("redis", redis, cfg.QUEUE_PREFIX),
      redisCheck("redis-events", sub, { ping: false }),
      s3Check(storage),
    ],
    cfg.READY_TIMEOUT_MS,
  );

  const registry = createMetricsRegistry();
  const metrics = registerApiMetrics(registry, {
    openStreams: () => hub.size.watchers,
    queueCounts: () => queue.getJobCounts(...QUEUE_STATES),
    onError: (err) => log.debug({ err }, "queue counts for /metrics failed"),
  });
  registerReadinessMetrics(registry, readiness, () => listener.closing);
  const admin =
    cfg.ADMIN_TOKEN_SHA256 === undefined
      ? undefined
      : createAdminBoard({
          tokenSha256: cfg.ADMIN_TOKEN_SHA256,
          bundles: queue,
          connection: redis,
          prefix: cfg.QUEUE_PREFIX,
        });
  // Filled when the adapter builds its router: the paths that count as RPCs in /metrics.
  const procedures = new Set<string>();

  const rpcLog = log.child({ part: "rpc" });
  const links =
    cfg.DOWNLOAD_LINK_SECRET === undefined
      ? undefined
      : new DownloadLinks(cfg.DOWNLOAD_LINK_SECRET, cfg.PUBLIC_URL);
  const downloadLinks = createDownloadLinkRoute({
    links,
    getJob: (id) => store.get(id),
    presignResult: (key, fileName) => storage.presignResult(key, fileName),
    onError: (err) => log.warn({ err }, "download link failed"),
  });
  const watchTokens = new WatchTokens(cfg.WATCH_TOKEN_SECRET);
  // Every RPC once, served by both ways in: connect-node and the lean transport.
  const rpcs = downloadRpcs({
    jobs,
    hub,
    presenter: new JobPresenter(storage, cfg.PRESIGN_EXPIRY_SECONDS, {
      links,
      forecast: new QueueForecaster(store, {
        sourceSize: async (fileId) => (await storage.headSource(fileId))?.sizeBytes,
      }),
      onError: (err) => log.debug({ err }, "queue estimate failed"),
    }),
    statusMaxWaitMs: cfg.STATUS_MAX_WAIT_MS,
    watchTokens,
    history:
      historyDb && new HistoryReader(historyDb, cfg.HISTORY_PAGE_TOKEN_SECRET ?? historyDb.url),
  });
  const site =
    cfg.WEB_ROOT === ""
      ? undefined
      : createStaticSite(cfg.WEB_ROOT, { onError: (err) => log.warn({ err }, "page") });
  const adapter = connectNodeAdapter({
    routes: (router) => {
      // A bad request body is the caller's error (INVALID_ARGUMENT), not ours (INTERNAL).
      guardRequests(
        connectRoutes(rpcs, {
          health: {
            readiness,
            stopping: stopping.signal,
            watchLimits: {
              maxStreams: cfg.HEALTH_WATCH_MAX_STREAMS,
              maxPerConnection: cfg.HEALTH_WATCH_MAX_PER_CONNECTION,
              maxStreamMs: cfg.HEALTH_WATCH_MAX_STREAM_MS,
            },
          },
        }),
        cfg.MAX_REQUEST_BYTES,
      )(router);
      for (const h of router.handlers) procedures.add(h.requestPath);
    },
    readMaxBytes: cfg.MAX_REQUEST_BYTES,
    // connect-es ignores unknown JSON fields by default; protobuf's own default (and
    // what a caller with a typo wants) is an error naming the field.
    jsonOptions: { ignoreUnknownFields: false },
    // Auth inside the error interceptor, so UNAUTHENTICATED is logged like any code;
    // only our own service is protected (health checks and reflection stay open).
    interceptors: [
      rpcInterceptor(rpcLog),
      authInterceptor(auth, (service) => service === DownloadService.typeName),
    ],
    contextValues: (req) => rpcContextValues(req).set(connectionKey, connectionOf(req)),
    fallback: (req, res) => {
      // Liveness (/healthz) and readiness (/readyz) probes; everything else is not ours.
      if (serveHealth(req, res, { closing: () => listener.closing, readiness })) return;
      // Prometheus; the edge proxy routes only the API's own paths, never this one.
      if (serveMetrics(req, res, registry)) return;
      if (admin?.handle(req, res) === true) return;
      // Stable download links (/d/<job>?exp=..&sig=..): the signature is the credential.
      if (downloadLinks.handle(req, res)) return;
      // The browser page (clients/web), on the same origin as the API it calls.
      if (site?.handle(req, res) === true) return;
      res.writeHead(404);
      res.end();
    },
  });

  // A job's events as text/event-stream, for EventSource and curl -N.
  const events = createJobEvents({
    rows: rpcs,
    store,
    tokens: watchTokens,
    authenticate: (headers) => auth.authenticate(headers),
    log: rpcLog,
  });
  const lean =
    opts.leanTransport === false
      ? undefined
      : createLeanTransport({
          rows: rpcs,
          authenticate: (headers) => auth.authenticate(headers),
          readMaxBytes: cfg.MAX_REQUEST_BYTES,
          log: rpcLog,
        });
  const handler: NodeHandler = (req, res) => {
    if (events(req, res)) return;
    if (lean === undefined || !lean(req, res)) adapter(req as never, res as never);
  };

  const listener = createDualProtocolListener(
    withRpcLog(handler, rpcLog, { procedures, metrics, tracing: opts.tracing ?? false }),
    {
      headersTimeoutMs: opts.headersTimeoutMs ?? cfg.HTTP_HEADERS_TIMEOUT_MS,
      requestTimeoutMs: opts.requestTimeoutMs ?? cfg.HTTP_REQUEST_TIMEOUT_MS,
      keepAliveTimeoutMs: 5_000,
      connectionsCheckingIntervalMs: opts.connectionsCheckingIntervalMs ?? 1_000,
      http2: {
        idleTimeoutMs: cfg.HTTP2_IDLE_TIMEOUT_MS,
        maxConcurrentStreams: cfg.HTTP2_MAX_CONCURRENT_STREAMS,
        maxResetsPerWindow: cfg.HTTP2_MAX_RESETS_PER_10S,
      },
      onHttp2Limit: (event) => metrics.http2Limit(event),
      log: log.child({ part: "listener" }),
    },
  );

  let port: number;
  try {
    port = await listener.listen(cfg.PORT, cfg.HOST);
  } catch (err) {
    await closeBackends();
    throw err;
  }
  const host = cfg.HOST.includes(":") ? `[${cfg.HOST}]` : cfg.HOST;
  const url = `http://${host}:${port}`;
  log.info({ url }, "api listening (HTTP/1.1 and h2c)");

  const drainTimeoutMs =
    opts.drainTimeoutMs ?? Math.max(500, Math.min(5_000, cfg.SHUTDOWN_GRACE_MS - 2_000));
  let closed: Promise<void> | undefined;
  const close = () => {
    closed ??= (async () => {
      log.info("api shutting down");
      stopping.abort();
      hub.close(new ConnectError(SHUTDOWN_MESSAGE, Code.Unavailable));
      await listener.close(drainTimeoutMs);
      await admin?.close();
      await closeBackends();
      log.info("api stopped");
    })();
    return closed;
  };
  return { port, url, close };
}

/** QUIT lets pending replies arrive; a dead connection is simply dropped. */
async function quit(conn: RedisClient): Promise<void> {
  if (conn.status === "end") return;
  if (conn.status !== "ready") {
    conn.disconnect();
    return;
  }
  const timer = setTimeout(() => conn.disconnect(), 1000);
  try {
    await conn.quit();
  } catch {
    conn.disconnect();
  } finally {
    clearTimeout(timer);
  }
}
