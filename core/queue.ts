import { Queue } from "bullmq";
import type { RedisClient } from "./redis.js";

// The BullMQ queue that carries job ids from the API to the workers. The job record in
// Redis (job-store.ts) is the source of truth for state; BullMQ only schedules work,
// retries it with backoff and hands a crashed worker's job to another.

export const QUEUE_NAME = "bundles";

export interface BundleJobData {
  jobId: string;
  fileIds: number[];
}

export interface QueueOptions {
  prefix: string;
  attempts: number;
  backoffMs: number;
}

export function createBundleQueue(connection: RedisClient, opts: QueueOptions): Queue<BundleJobData> {
  return new Queue<BundleJobData>(QUEUE_NAME, {
    connection,
    prefix: opts.prefix,
    defaultJobOptions: {
      attempts: opts.attempts,
      // Exponential backoff with jitter, so a burst of failures does not retry in lockstep.
      backoff: { type: "exponential", delay: opts.backoffMs, jitter: 0.5 },
      removeOnComplete: { count: 1000 },
      removeOnFail: { count: 5000 },
    },
  });
}
