import { Redis, type RedisOptions } from "ioredis";

/**
 * A Redis connection for commands. `maxRetriesPerRequest: null` is what BullMQ wants on
 * worker connections; API connections instead fail fast (`enableOfflineQueue: false`)
 * so a caller gets UNAVAILABLE while Redis is down rather than a hung request.
 */
export function createRedis(url: string, opts: { role: "api" | "worker" | "subscriber"; name?: string }): Redis {
  const base: RedisOptions = {
    connectionName: opts.name ?? `download-jobs:${opts.role}`,
    lazyConnect: false,
    retryStrategy: (times) => Math.min(50 * 2 ** times, 2000),
  };
  if (opts.role === "api") {
    return new Redis(url, { ...base, maxRetriesPerRequest: 1, enableOfflineQueue: true, connectTimeout: 2000 });
  }
  return new Redis(url, { ...base, maxRetriesPerRequest: null });
}

/** Resolves once the connection is ready, or rejects after `timeoutMs`. */
export async function waitForRedis(redis: Redis, timeoutMs = 10_000): Promise<void> {
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
