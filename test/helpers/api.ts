import { createHash } from "node:crypto";
import { PutObjectCommand } from "@aws-sdk/client-s3";
import { type Client, createClient, type Interceptor } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import type { Queue } from "bullmq";
import type { Config } from "../../core/config.js";
import { JobStore } from "../../core/job-store.js";
import {
  type Attempt,
  markCompleted,
  markFailed,
  markProcessing,
  recordProgress,
} from "../../core/job-transitions.js";
import type { JobRecord } from "../../core/jobs.js";
import { type BundleJobData, createBundleQueue } from "../../core/queue.js";
import { createRedis, type RedisClient, waitForRedis } from "../../core/redis.js";
import { DownloadService } from "../../gen/downloads/v1/download_service_pb.js";
import { type ApiServer, type ApiServerOptions, startApiServer } from "../../server/server.js";
import { type Services, startServices, TEST_OWNER, TEST_TOKEN } from "./services.js";
import { testLogger } from "./test-log.js";

export { TEST_OWNER, TEST_TOKEN };

/** The header every authorized call carries, for fetch, buf curl and grpc-js metadata. */
export const TEST_AUTH_HEADER = { authorization: `Bearer ${TEST_TOKEN}` } as const;

/** Adds the test owner's token to every call of a Connect, gRPC or gRPC-Web transport. */
export const withTestToken: Interceptor = (next) => (req) => {
  req.header.set("authorization", TEST_AUTH_HEADER.authorization);
  return next(req);
};

// A real API server on port 0 over real Redis and S3, plus what a worker would do to a
// job (the worker lives in another process in production): the tests drive state
// changes through the named transitions (core/job-transitions.ts) as the worker does.

/** Connections the tests open themselves carry this name, so CLIENT LIST can tell them apart. */
export const TEST_CONNECTION_NAME = "test-driver";

export interface ApiStack {
  svc: Services;
  cfg: Config;
  server: ApiServer;
  /** The owner TEST_TOKEN authenticates as; jobs made with store.create need it to be visible. */
  owner: string;
  /** The test's own Redis connection (not the server's). */
  redis: RedisClient;
  store: JobStore;
  queue: Queue<BundleJobData>;
  /** QUEUED -> PROCESSING, as a worker starting the job. */
  startJob(id: string): Promise<JobRecord>;
  /** A progress write, as the worker's throttled updates. */
  progress(id: string, bytesDone: number, bytesTotal: number): Promise<JobRecord>;
  /** Uploads `zip` as the job's result object and marks the job COMPLETED. */
  complete(id: string, zip: Buffer, fileName?: string): Promise<JobRecord>;
  fail(id: string): Promise<JobRecord>;
  stop(): Promise<void>;
}

export async function startApiStack(
  overrides: Record<string, string> = {},
  opts: ApiServerOptions & { services?: Services } = {},
): Promise<ApiStack> {
  const svc = opts.services ?? (await startServices());
  const cfg = svc.config({ PORT: "0", HOST: "127.0.0.1", ...overrides });
  const log = testLogger("api-test");
  const redis = createRedis(svc.redisTarget, { role: "api", name: TEST_CONNECTION_NAME });
  // Tests stop Redis on purpose; its reconnect errors are expected, not news.
  redis.on("error", () => undefined);
  await waitForRedis(redis);
  const store = new JobStore(redis, {
    prefix: cfg.QUEUE_PREFIX,
    recordTtlSeconds: cfg.JOB_RECORD_TTL_SECONDS,
  });
  const queue = createBundleQueue(redis, { prefix: cfg.QUEUE_PREFIX, attempts: 1, backoffMs: 0 });
  queue.on("error", () => undefined);
  let server: ApiServer;
  try {
    server = await startApiServer(cfg, log, opts);
  } catch (err) {
    await queue.close();
    redis.disconnect();
    if (opts.services === undefined) await svc.stop();
    throw err;
  }

  // The tests play one run of each job, without BullMQ (so without its lock to check).
  const run = (jobId: string): Attempt => ({ jobId, token: "test-driver", checkLock: false });

  const startJob = async (id: string) => {
    const rec = await store.get(id);
    return markProcessing(store, run(id), {
      progress: rec.progress,
      files: rec.files,
      startedAt: Date.now(),
    });
  };

  const progress = async (id: string, bytesDone: number, bytesTotal: number) => {
    const rec = await store.get(id);
    await recordProgress(store, run(id), {
      progress: { ...rec.progress, bytesDone, bytesTotal, bytesPerSecond: 1000 },
      files: rec.files,
    });
    return store.get(id);
  };

  const complete = async (id: string, zip: Buffer, fileName = `download-${id.slice(0, 8)}.zip`) => {
    const key = svc.storage.resultKey(id);
    await svc.storage.client.send(
      new PutObjectCommand({
        Bucket: cfg.RESULT_BUCKET,
        Key: key,
        Body: zip,
        ContentType: "application/zip",
      }),
    );
    const rec = await store.get(id);
    await markCompleted(store, run(id), {
      endedAt: Date.now(),
      progress: {
        ...rec.progress,
        filesDone: rec.fileIds.length,
        bytesDone: zip.length,
        bytesTotal: zip.length,
      },
      files: rec.files,
      result: {
        key,
        fileName,
        sizeBytes: zip.length,
        sha256: createHash("sha256").update(zip).digest("hex"),
        expiresAt: Date.now() + cfg.RESULT_TTL_SECONDS * 1000,
      },
    });
    return store.get(id);
  };

  const fail = async (id: string) => {
    const rec = await store.get(id);
    return markFailed(store, run(id), {
      claimed: rec.lease === run(id).token,
      error: {
        code: "not_found",
        message: "source files 9 do not exist",
        retryable: false,
        missingFileIds: [9],
      },
    });
  };

  return {
    svc,
    cfg,
    server,
    owner: TEST_OWNER,
    redis,
    store,
    queue,
    startJob,
    progress,
    complete,
    fail,
    async stop() {
      await server.close();
      await queue.close();
      redis.disconnect();
      if (opts.services === undefined) await svc.stop();
    },
  };
}

/** A Connect client (JSON over HTTP/1.1) of DownloadService with the test owner's token. */
export function testClient(baseUrl: string): Client<typeof DownloadService> {
  return createClient(
    DownloadService,
    createConnectTransport({ baseUrl, httpVersion: "1.1", interceptors: [withTestToken] }),
  );
}
