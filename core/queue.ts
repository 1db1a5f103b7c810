import { Queue } from "bullmq";
import { MAX_JOB_PRIORITY } from "./config.js";
import type { RedisKeys } from "./keys.js";
import type { RedisClient } from "./redis.js";
import type { ScriptCommands } from "./redis-scripts.js";

// The BullMQ queue that carries job ids from the API to the workers. The job record in
// Redis (job-store.ts) is the source of truth for state; BullMQ only schedules work,
// retries it with backoff and hands a crashed worker's job to another.
//
// Where waiting jobs are (read this before reading the queue's order): BullMQ's own two
// structures, nothing of ours. A worker takes from the `wait` list first (its right end:
// jobs added without a priority, and jobs a stall handed back), then from the
// `prioritized` sorted set, lowest score first; score = BullMQ priority * 2^32 + an
// arrival counter. BundleScheduler gives every new job a BullMQ priority: the job's own
// priority (0-9) picks a band of BullMQ priorities (9 lowest, so first), and within a
// band the owner's turn (its round, core/lua/fair-enqueue.lua) picks the place, so the
// set's order is the start order: Initiate priority first, then owners in turn, then
// arrival. A job's position is its ZRANK in `prioritized` plus the length of `wait`
// (core/forecast.ts, queuePosition). A position can grow while a job waits: a later job
// of a higher priority, or of an owner with fewer jobs waiting (an earlier round), goes
// ahead of it; an owner's own jobs never overtake each other within one priority.
// Delayed retries come back into `prioritized` with the priority they had (ahead of
// later rounds). With FAIR_SCHEDULING=false every job goes to the first round of its band:
// priority first, then arrival (FIFO). Only jobs a stall handed back sit in `wait`.

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

/** BullMQ's largest priority (Job's PRIORITY_LIMIT, 2^21 - 1). */
const BULLMQ_PRIORITY_LIMIT = 2 ** 21 - 1;
/** BullMQ priorities per Initiate priority level: the rounds a level can tell apart. */
export const FAIR_BAND_SIZE = Math.floor((BULLMQ_PRIORITY_LIMIT - 1) / (MAX_JOB_PRIORITY + 1));

export interface SchedulerOptions {
  /** FAIR_SCHEDULING: owners take turns within a priority level; false is FIFO. */
  fair: boolean;
  /** Rounds per level before they are moved down (tests make it small); FAIR_BAND_SIZE. */
  bandSize?: number;
  /**
   * For comparison only (npm run bench): BullMQ's wait list without any priority, the
   * layout from before Initiate had one. It ignores the job's priority.
   */
  plain?: boolean;
}

export interface Placement {
  /** The job's Initiate priority, 0-9. */
  priority: number;
  owner: string;
  /** The owner's weight: rounds hold this many of its jobs. */
  weight: number;
}

/**
 * Adds bundle jobs to the queue in the order owners are served: a higher Initiate
 * priority first, then owners in turn (weighted), then arrival. See the layout above.
 */
export class FairScheduler<T extends { jobId: string }> {
  private readonly bandSize: number;

  constructor(
    private readonly queue: Queue<T>,
    private readonly scripts: ScriptCommands,
    /** The round state of one priority level of this queue. */
    private readonly stateKey: (priority: number) => string,
    private readonly opts: SchedulerOptions,
  ) {
    this.bandSize = Math.max(4, Math.min(opts.bandSize ?? FAIR_BAND_SIZE, FAIR_BAND_SIZE));
  }

  /** The BullMQ priority of a level's first round; higher levels get lower numbers. */
  private base(priority: number): number {
    return (MAX_JOB_PRIORITY - priority) * this.bandSize + 1;
  }

  /**
   * Queues the job (BullMQ id `jobId`) unless BullMQ has it already (a replayed
   * Initiate, an outbox entry dispatched twice).
   */
  async add(name: string, jobId: string, data: T, at: Placement): Promise<void> {
    const level = Math.min(MAX_JOB_PRIORITY, Math.max(0, Math.trunc(at.priority)));
    let priority: number | undefined;
    if (this.opts.plain === true) {
      priority = undefined;
    } else if (this.opts.fair) {
      const q = this.queue.keys;
      priority = Number(
        await this.scripts.djFairEnqueue(
          this.stateKey(level),
          q.prioritized as string,
          this.queue.toKey(jobId),
          q.wait as string,
          q.active as string,
          q.delayed as string,
          at.owner,
          String(Math.max(1, at.weight)),
          String(this.base(level)),
          String(this.bandSize),
          this.queue.toKey(""),
        ),
      );
      if (priority === 0) return;
    } else {
      // Every job in the sorted set (the `wait` list would go before any priority).
      priority = this.base(level);
    }
    // BullMQ's add() is typed by job name; our queues have one name each.
    const add = this.queue.add.bind(this.queue) as (
      n: string,
      d: T,
      o: { jobId: string; priority?: number },
    ) => Promise<unknown>;
    await add(name, data, { jobId, ...(priority !== undefined ? { priority } : {}) });
  }
}

/** Bundle jobs in the order owners are served (FairScheduler on the `bundles` queue). */
export class BundleScheduler {
  private readonly fair: FairScheduler<BundleJobData>;

  constructor(
    queue: Queue<BundleJobData>,
    scripts: ScriptCommands,
    keys: RedisKeys,
    opts: SchedulerOptions,
  ) {
    this.fair = new FairScheduler(queue, scripts, (level) => keys.fairLevel(level), opts);
  }

  add(data: BundleJobData, at: Placement): Promise<void> {
    return this.fair.add("bundle", data.jobId, data, at);
  }
}

/** Terminal-state callbacks, delivered by the workers with retries and backoff. */
export const WEBHOOK_QUEUE_NAME = "webhooks";

export interface WebhookJobData {
  jobId: string;
}

/**
 * Webhook deliveries take turns by owner too (one level, weight 1), so one owner's pile
 * of callbacks does not queue ahead of another's; worker/webhooks.ts also caps each
 * owner's deliveries in flight.
 */
export function webhookScheduler(
  queue: Queue<WebhookJobData>,
  scripts: ScriptCommands,
  keys: RedisKeys,
): FairScheduler<WebhookJobData> {
  return new FairScheduler(queue, scripts, () => keys.webhookFair, { fair: true });
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
