import { isIP } from "node:net";
import { connect as tlsConnect } from "node:tls";
import { Cluster, type ClusterOptions, Redis, type RedisOptions } from "ioredis";

/** One Redis server or a Redis Cluster: the commands we use behave the same on both. */
export type RedisClient = Redis | Cluster;

/**
 * Where Redis is: a `redis://` URL, the seed nodes of a cluster (REDIS_CLUSTER_NODES),
 * or the Sentinels that know the current primary (REDIS_SENTINELS, REDIS_SENTINEL_NAME).
 */
export type RedisTarget =
  | string
  | { clusterNodes: readonly string[] }
  | {
      sentinels: readonly string[];
      name: string;
      /** Credentials of the primary and replicas (the Sentinels' own ride in their URLs). */
      username?: string;
      password?: string;
    };

type Role = "api" | "worker" | "subscriber";

/** The target the configuration names (the configuration allows only one of them). */
export function redisTargetFrom(cfg: {
  REDIS_URL?: string | undefined;
  REDIS_CLUSTER_NODES?: readonly string[] | undefined;
  REDIS_SENTINELS?: readonly string[] | undefined;
  REDIS_SENTINEL_NAME?: string | undefined;
  REDIS_USERNAME?: string | undefined;
  REDIS_PASSWORD?: string | undefined;
}): RedisTarget | undefined {
  if (cfg.REDIS_SENTINELS !== undefined && cfg.REDIS_SENTINELS.length > 0) {
    return {
      sentinels: cfg.REDIS_SENTINELS,
      name: cfg.REDIS_SENTINEL_NAME ?? "mymaster",
      ...(cfg.REDIS_USERNAME !== undefined ? { username: cfg.REDIS_USERNAME } : {}),
      ...(cfg.REDIS_PASSWORD !== undefined ? { password: cfg.REDIS_PASSWORD } : {}),
    };
  }
  if (cfg.REDIS_CLUSTER_NODES !== undefined && cfg.REDIS_CLUSTER_NODES.length > 0) {
    return { clusterNodes: cfg.REDIS_CLUSTER_NODES };
  }
  return cfg.REDIS_URL;
}

/**
 * A seed node (or Sentinel) is `host:port` or a `redis://` / `rediss://` URL; a URL's
 * user, password and TLS apply to every node of the cluster (they share them in every
 * managed offering).
 */
function seed(entry: string): { node: { host: string; port: number }; options: RedisOptions } {
  if (!/^rediss?:\/\//.test(entry)) {
    const i = entry.lastIndexOf(":");
    return { node: { host: entry.slice(0, i), port: Number(entry.slice(i + 1)) }, options: {} };
  }
  const u = new URL(entry);
  const options: RedisOptions = {};
  if (u.username !== "") options.username = decodeURIComponent(u.username);
  if (u.password !== "") options.password = decodeURIComponent(u.password);
  if (u.protocol === "rediss:") options.tls = {};
  return { node: { host: u.hostname, port: Number(u.port || 6379) }, options };
}

/**
 * The Sentinels and every credential of a Sentinel target: the Sentinels' own from
 * their URLs (they share one in practice: the first URL that has one), the primary's
 * and replicas' from REDIS_USERNAME and REDIS_PASSWORD. rediss:// Sentinels (all of
 * them, as the configuration checks) mean TLS to the Sentinels and to the data nodes
 * they name, whose certificates are checked against Node's CAs (NODE_EXTRA_CA_CERTS
 * adds a private one).
 */
function sentinelAuth(
  target: Extract<RedisTarget, { sentinels: readonly string[] }>,
): RedisOptions {
  const seeds = target.sentinels.map(seed);
  const own = seeds.find((s) => s.options.username ?? s.options.password)?.options ?? {};
  const tls = seeds.some((s) => s.options.tls !== undefined);
  return {
    sentinels: seeds.map((s) => s.node),
    ...(own.username !== undefined ? { sentinelUsername: own.username } : {}),
    ...(own.password !== undefined ? { sentinelPassword: own.password } : {}),
    ...(target.username !== undefined ? { username: target.username } : {}),
    ...(target.password !== undefined ? { password: target.password } : {}),
    ...(tls ? { sentinelTLS: {}, tls: {}, enableTLSForSentinelMode: true } : {}),
  };
}

/** At most one TLS check of a Sentinel per this many ms per connection. */
const TLS_CHECK_EVERY_MS = 30_000;

/**
 * ioredis reports a Sentinel whose TLS handshake failed (an untrusted certificate, a
 * name that does not match) only as "All sentinels are unreachable … Connection is
 * closed.". When that happens, one handshake of our own with the first Sentinel finds
 * the reason, and the connection reports it as an error of its own, so the log says
 * what to fix.
 */
function explainTls(conn: Redis): void {
  let checkedAt = 0;
  conn.on("error", (err: Error) => {
    if (!err.message.startsWith("All sentinels are unreachable")) return;
    if (Date.now() - checkedAt < TLS_CHECK_EVERY_MS) return;
    checkedAt = Date.now();
    const first = conn.options.sentinels?.[0];
    if (first?.host === undefined || first.port === undefined) return;
    const { host, port } = first;
    const socket = tlsConnect({ host, port, servername: isIP(host) === 0 ? host : undefined });
    socket.setTimeout(5000, () => socket.destroy());
    socket.once("secureConnect", () => socket.destroy());
    socket.once("error", (tlsErr: Error) => {
      socket.destroy();
      conn.emit(
        "error",
        new Error(
          `TLS handshake with Sentinel ${host}:${port} failed: ${tlsErr.message} (a private CA goes in NODE_EXTRA_CA_CERTS)`,
        ),
      );
    });
  });
}

/**
 * A Redis connection for commands. `maxRetriesPerRequest: null` is what BullMQ wants on
 * worker connections; API connections give up on a command after one retry, so a
 * caller gets UNAVAILABLE while Redis is down rather than a hung request.
 *
 * With a cluster target the connection is an ioredis `Cluster`: BullMQ accepts it, and
 * pub/sub and the job store's Lua script work on it as long as every key of one call
 * shares a hash slot (QUEUE_PREFIX carries a hash tag, checked by the configuration).
 */
export function createRedis(url: string, opts: { role: Role; name?: string }): Redis;
export function createRedis(target: RedisTarget, opts: { role: Role; name?: string }): RedisClient;
export function createRedis(target: RedisTarget, opts: { role: Role; name?: string }): RedisClient {
  const connectionName = opts.name ?? `download-jobs:${opts.role}`;
  const retry = (times: number) => Math.min(50 * 2 ** times, 2000);
  const roleOptions: RedisOptions =
    opts.role === "api"
      ? { maxRetriesPerRequest: 1, connectTimeout: 2000 }
      : { maxRetriesPerRequest: null };
  if (typeof target === "string" || "sentinels" in target) {
    const common: RedisOptions = {
      connectionName,
      lazyConnect: false,
      retryStrategy: retry,
      ...roleOptions,
      ...(opts.role === "api" ? { enableOfflineQueue: true } : {}),
    };
    const conn =
      typeof target === "string"
        ? new Redis(target, common)
        : new Redis({
            ...common,
            ...sentinelAuth(target),
            name: target.name,
            role: "master",
            sentinelRetryStrategy: retry,
            // Not ioredis's failoverDetector: a +switch-master that arrives while the
            // connection is already reconnecting (the primary died) ends it for good
            // (status "end", "Connection is closed."), which stopped every worker in
            // the failover test. A dead primary closes the socket, and a demoted one
            // answers writes with READONLY: both make the client ask the Sentinels again.
            reconnectOnError: (err: Error) => err.message.startsWith("READONLY"),
          });
    if (opts.role !== "subscriber") coalesceWrites(conn);
    if (typeof target !== "string" && conn.options.sentinelTLS !== undefined) explainTls(conn);
    return conn;
  }
  const seeds = target.clusterNodes.map(seed);
  const shared = seeds.find((s) => Object.keys(s.options).length > 0)?.options ?? {};
  const clusterOptions: ClusterOptions = {
    clusterRetryStrategy: retry,
    enableOfflineQueue: true,
    redisOptions: { connectionName, ...shared, ...roleOptions },
    // A slot map refresh that hangs would stall every command routed by it.
    slotsRefreshTimeout: 2000,
    // While the slot's master is down every try ends in CLUSTERDOWN, a MOVED to the
    // dead node or a closed connection. An API call gives up after a few tries
    // (UNAVAILABLE with Retry-After) instead of ioredis's 16, which held it ~1.8 s.
    ...(opts.role === "api" ? { maxRedirections: 6 } : {}),
  };
  return new Cluster(
    seeds.map((s) => s.node),
    clusterOptions,
  );
}

/**
 * Sends every command a connection is given in one turn of the event loop with one
 * write. Under load one turn handles many requests, and each sent its commands with a
 * system call of its own: on a busy API process the socket writes to Redis were the
 * largest single cost after the HTTP ones (and Redis reads fewer, fuller packets too).
 * The socket is corked at the turn's first command and uncorked in the same turn's
 * check phase (setImmediate), so no command waits for another turn. ioredis's
 * autopipelining does not help here: it flushes on process.nextTick, which Node runs
 * between the callbacks of two sockets.
 */
function coalesceWrites(conn: Redis): void {
  const send = conn.sendCommand.bind(conn);
  let corked = false;
  conn.sendCommand = (...args: Parameters<Redis["sendCommand"]>) => {
    const socket = conn.stream as import("node:net").Socket | undefined;
    if (!corked && socket !== undefined && conn.status === "ready") {
      corked = true;
      socket.cork();
      setImmediate(() => {
        corked = false;
        socket.uncork();
      });
    }
    return send(...args);
  };
}

/** Resolves once the connection is ready, or rejects after `timeoutMs`. */
export async function waitForRedis(redis: RedisClient, timeoutMs = 10_000): Promise<void> {
  if (redis.status === "ready") return;
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => {
      cleanup();
      reject(new Error(`Redis not ready after ${timeoutMs} ms`));
    }, timeoutMs);
    const onReady = () => {
      cleanup();
      resolve();
    };
    const cleanup = () => {
      clearTimeout(timer);
      redis.off("ready", onReady);
    };
    redis.on("ready", onReady);
  });
}

/** What ioredis's Cluster keeps of its pub/sub connection (not part of its typed API). */
interface ClusterSubscriberInternals {
  getInstance(): Redis | null;
  selectSubscriber(): void;
}

function clusterSubscriber(sub: Cluster): ClusterSubscriberInternals | undefined {
  const inner = (sub as unknown as { subscriber?: Partial<ClusterSubscriberInternals> }).subscriber;
  return typeof inner?.getInstance === "function" && typeof inner.selectSubscriber === "function"
    ? (inner as ClusterSubscriberInternals)
    : undefined;
}

/**
 * The connection that really carries `sub`'s subscriptions: `sub` itself, or on a
 * cluster the one node connection that ioredis picks for pub/sub (and replaces when
 * that node goes away).
 */
export function subscriberConnection(sub: RedisClient): Redis | undefined {
  if (sub instanceof Cluster) return clusterSubscriber(sub)?.getInstance() ?? undefined;
  return sub;
}

/**
 * Resolves when a (P)SUBSCRIBE may be sent on `sub`. ioredis writes SUBSCRIBE straight
 * away while a connection is still in its handshake (status "connect"), because Redis
 * accepts it while loading; the reply puts the connection in subscriber mode, ioredis's
 * own ready check (INFO) is then refused with "Connection in subscriber mode, only
 * subscriber commands may be used", and the connection is torn down with every pending
 * command failed. On a cluster the pub/sub connection is opened lazily by the first
 * SUBSCRIBE, so a second one sent a moment later hit exactly that window. Waiting for
 * the handshake to finish (at most `timeoutMs`) avoids it.
 */
export async function untilSubscribable(sub: RedisClient, timeoutMs = 5_000): Promise<void> {
  const conn = subscriberConnection(sub);
  if (conn === undefined || conn.status !== "connect") return;
  await new Promise<void>((resolve) => {
    const done = () => {
      clearTimeout(timer);
      for (const ev of ["ready", "close", "end"]) conn.off(ev, done);
      resolve();
    };
    const timer = setTimeout(done, timeoutMs);
    for (const ev of ["ready", "close", "end"]) conn.once(ev, done);
  });
}

/**
 * Calls `onRestored` each time the connection carrying `sub`'s subscriptions is
 * established again after a loss (a reconnect, or on a cluster a new pub/sub node after
 * a failover). Whatever was published in between is gone: the caller re-subscribes to
 * be sure and re-reads what it follows. ioredis's cluster client replaces its pub/sub
 * connection without any public event, hence the hook on its (pinned) internals.
 */
export function onSubscriptionsRestored(sub: RedisClient, onRestored: () => void): void {
  if (sub instanceof Cluster) {
    const inner = clusterSubscriber(sub);
    if (inner === undefined) return;
    const select = inner.selectSubscriber.bind(inner);
    inner.selectSubscriber = () => {
      select();
      inner.getInstance()?.once("ready", onRestored);
    };
    return;
  }
  let wasReady = sub.status === "ready";
  sub.on("ready", () => {
    if (wasReady) onRestored();
    wasReady = true;
  });
}
