import { Queue } from "bullmq";
import type { RedisClient } from "./redis.js";

// The BullMQ queue that carries job ids from the API to the workers. The job record in
// Redis (job-store.ts) is the source of truth for state; BullMQ only schedules work,
// retries it with backoff and hands a crashed worker's job to another.

export const QUEUE_NAME = "bundles";

export interface BundleJobData {
  jobId: string;
  fileIds: number[];
  /** For the worker's log lines; absent in jobs queued before it was added. */
  owner?: string;
  /** W3C trace context of the Initiate call, when tracing is on: the worker's spans join it. */
  traceparent?: string;
}

export interface QueueOptions {
  prefix: string;
  attempts: number;
  backoffMs: number;
}

export function createBundleQueue(
  connection: RedisClient,
  opts: QueueOptions,
): Queue<BundleJobData> {
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

/** Terminal-state callbacks, delivered by the workers with retries and backoff. */
export const WEBHOOK_QUEUE_NAME = "webhooks";

export interface WebhookJobData {
  jobId: string;
}

export function createWebhookQueue(
  connection: RedisClient,
  opts: QueueOptions,
): Queue<WebhookJobData> {
  return new Queue<WebhookJobData>(WEBHOOK_QUEUE_NAME, {
    connection,
    prefix: opts.prefix,
    defaultJobOptions: {
      attempts: opts.attempts,
      backoff: { type: "exponential", delay: opts.backoffMs, jitter: 0.2 },
      // Gone once settled, so that a callback owed again (the outbox lease ran out
      // before its entry was removed) is a new delivery, not a silently ignored re-add.
      removeOnComplete: true,
      removeOnFail: true,
    },
  });
}

/** Housekeeping run by a BullMQ job scheduler in the workers: result retention. */
export const MAINTENANCE_QUEUE_NAME = "maintenance";

export function createMaintenanceQueue(connection: RedisClient, prefix: string): Queue {
  return new Queue(MAINTENANCE_QUEUE_NAME, {
    connection,
    prefix,
    defaultJobOptions: { removeOnComplete: { count: 10 }, removeOnFail: { count: 50 } },
  });
}
