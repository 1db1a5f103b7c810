import { createHash, randomBytes } from "node:crypto";
import { PutObjectCommand } from "@aws-sdk/client-s3";
import { type Config, loadConfig } from "../../core/config.js";
import type { RedisTarget } from "../../core/redis.js";
import { Storage, storageOptionsFrom } from "../../core/storage.js";
import {
  type LocalRedisCluster,
  type LocalRedisClusterOptions,
  startRedisCluster,
} from "../../local/redis-cluster.js";
import {
  type LocalRedisSentinel,
  type LocalRedisSentinelOptions,
  startRedisSentinel,
} from "../../local/redis-sentinel.js";
import { type LocalRedis, startRedis } from "../../local/redis-server.js";
import { LOCAL_S3_CREDENTIALS, type LocalS3, startS3 } from "../../local/s3-server.js";
import { testLogLevel } from "./test-log.js";

// Real Redis and a real S3 server on free loopback ports, one set per test file.
// Each caller gets its own QUEUE_PREFIX so tests never see each other's keys.

export interface Services {
  /** With a cluster: its first node (url, pid), and stop()/kill() act on every node. */
  redis: LocalRedis;
  /** What createRedis takes to reach these services: a URL, or the cluster's nodes. */
  redisTarget: RedisTarget;
  /** The cluster, when one was asked for (failover tests kill its nodes). */
  cluster?: LocalRedisCluster;
  /** The Sentinel set-up, when one was asked for. */
  sentinel?: LocalRedisSentinel;
  s3: LocalS3;
  /** Environment for child processes (API, worker) pointing at these services. */
  env: Record<string, string>;
  /** A config for in-process use, with optional overrides. */
  config(overrides?: Record<string, string>): Config;
  storage: Storage;
  /** Puts a source object for `fileId` and returns its bytes. */
  putSource(fileId: number, bytes: Buffer | number, fileName?: string): Promise<Buffer>;
  stop(): Promise<void>;
}

/** The owner every test server knows, and its bearer token (AUTH_TOKENS holds its hash). */
export const TEST_OWNER = "test-owner";
export const TEST_TOKEN = "test-token-3f1c9a7e5b2d4c6a8e0f1b3d5a7c9e2f";

/**
 * What every test server runs with unless a test overrides it: auth on with the test
 * owner's token, and no per-owner limits or dedup, which only the trust tests are about
 * (elsewhere they would make unrelated tests depend on each other's jobs).
 */
export const TEST_SERVER_ENV: Record<string, string> = {
  AUTH_TOKENS: `${TEST_OWNER}:${createHash("sha256").update(TEST_TOKEN).digest("hex")}`,
  DEDUP_IN_FLIGHT: "false",
  REUSE_RESULTS: "false",
  MAX_ACTIVE_JOBS_PER_OWNER: "0",
  INITIATE_RATE_PER_MINUTE: "0",
  MAX_QUEUE_DEPTH: "0",
};

let prefixCounter = 0;

export function uniquePrefix(name = "t"): string {
  prefixCounter += 1;
  return `${name}${process.pid}x${prefixCounter}x${randomBytes(3).toString("hex")}`;
}

/**
 * `cluster: true` runs a three-master Redis Cluster instead of one redis-server, hands
 * out REDIS_CLUSTER_NODES and hash-tagged prefixes; REDIS_CLUSTER=1 in the environment
 * makes that the default, to run any suite against a cluster.
 */
export async function startServices(
  opts: {
    appendonlyDir?: string;
    /** A cluster instead of one redis-server; options (replicas) for failover tests. */
    cluster?: boolean | LocalRedisClusterOptions;
    /** A primary, replicas and Sentinels instead of one redis-server. */
    sentinel?: LocalRedisSentinelOptions;
  } = {},
): Promise<Services> {
  const cluster = (opts.cluster ?? process.env.REDIS_CLUSTER === "1") !== false;
  let redis: LocalRedis;
  let redisTarget: RedisTarget;
  let redisEnv: Record<string, string>;
  let localCluster: LocalRedisCluster | undefined;
  let localSentinel: LocalRedisSentinel | undefined;
  if (opts.sentinel !== undefined) {
    const sn = await startRedisSentinel(opts.sentinel);
    localSentinel = sn;
    const first = sn.nodes[0] as LocalRedis;
    redis = {
      ...first,
      stop: sn.stop,
      kill: () => {
        for (const n of sn.nodes) n.kill();
      },
    };
    redisTarget = { sentinels: sn.sentinels, name: sn.name };
    redisEnv = { REDIS_SENTINELS: sn.sentinels.join(","), REDIS_SENTINEL_NAME: sn.name };
  } else if (cluster) {
    const c = await startRedisCluster(typeof opts.cluster === "object" ? opts.cluster : {});
    localCluster = c;
    const first = c.nodes[0] ?? "";
    redis = {
      url: `redis://${first}`,
      port: Number(first.split(":")[1]),
      pid: c.pids[0] ?? 0,
      stop: c.stop,
      kill: c.kill,
    };
    redisTarget = { clusterNodes: c.nodes };
    redisEnv = { REDIS_CLUSTER_NODES: c.nodes.join(",") };
  } else {
    redis = await startRedis(
      opts.appendonlyDir !== undefined ? { dir: opts.appendonlyDir, appendonly: true } : {},
    );
    redisTarget = redis.url;
    redisEnv = { REDIS_URL: redis.url };
  }
  let s3: LocalS3;
  try {
    s3 = await startS3({ buckets: ["download-sources", "download-results"] });
  } catch (err) {
    await redis.stop();
    throw err;
  }
  const env: Record<string, string> = {
    ...redisEnv,
    S3_ENDPOINT: s3.endpoint,
    S3_ACCESS_KEY_ID: LOCAL_S3_CREDENTIALS.accessKeyId,
    S3_SECRET_ACCESS_KEY: LOCAL_S3_CREDENTIALS.secretAccessKey,
    LOG_LEVEL: testLogLevel(),
    ...TEST_SERVER_ENV,
  };
  const config = (overrides: Record<string, string> = {}) =>
    // In a cluster every key of a deployment must share one hash slot: {prefix}.
    loadConfig({
      QUEUE_PREFIX: cluster ? `{${uniquePrefix()}}` : uniquePrefix(),
      ...env,
      ...overrides,
    });
  const storage = new Storage(storageOptionsFrom(config()));
  return {
    redis,
    redisTarget,
    ...(localCluster !== undefined ? { cluster: localCluster } : {}),
    ...(localSentinel !== undefined ? { sentinel: localSentinel } : {}),
    s3,
    env,
    config,
    storage,
    async putSource(fileId, bytes, fileName) {
      const body = typeof bytes === "number" ? randomBytes(bytes) : bytes;
      await storage.client.send(
        new PutObjectCommand({
          Bucket: storage.opts.sourceBucket,
          Key: storage.sourceKey(fileId),
          Body: body,
          ...(fileName !== undefined ? { Metadata: { filename: fileName } } : {}),
        }),
      );
      return body;
    },
    async stop() {
      storage.destroy();
      await Promise.allSettled([redis.stop(), s3.stop()]);
    },
  };
}
