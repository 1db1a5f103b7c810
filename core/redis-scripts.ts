import { readFileSync } from "node:fs";
import type { RedisClient } from "./redis.js";

// Our Lua scripts live in core/lua/*.lua (as BullMQ keeps its own in src/commands) and are
// defined as ioredis commands on each connection that runs them: ioredis sends EVALSHA
// and falls back to EVAL on NOSCRIPT (a restarted or failed-over Redis has an empty
// script cache), on one Redis and on a Cluster alike, where every key of one call shares
// the slot of QUEUE_PREFIX's hash tag.

const SCRIPTS = {
  /** One named change of a job record (core/job-transitions.ts). */
  djTransition: { file: "transition.lua", keys: 6 },
  /** Initiate's admission and the new record (core/admission.ts). */
  djAdmit: { file: "admit.lua", keys: 6 },
  /** The BullMQ priority that lets owners take turns (core/queue.ts, FairScheduler). */
  djFairEnqueue: { file: "fair-enqueue.lua", keys: 6 },
  /** An owner's webhook delivery slots (worker/webhooks.ts). */
  djWebhookSlot: { file: "webhook-slot.lua", keys: 2 },
  /** A new QUEUED record outside Initiate (tests, tools). */
  djCreateJob: { file: "create-job.lua", keys: 2 },
  /** DeleteJob: a finished job and every pointer to it (core/job-transitions.ts). */
  djDeleteJob: { file: "delete-job.lua", keys: 7 },
  /** A page of an owner's jobs (core/job-index.ts). */
  djListJobs: { file: "list-jobs.lua", keys: 1 },
  /** A completed run's duration into the queue forecast's measurements (core/forecast.ts). */
  djRecordRun: { file: "record-run.lua", keys: 2 },
  /** A job's record and its per-file hash in one step (core/job-store.ts get). */
  djReadJob: { file: "read-job.lua", keys: 2 },
} as const;

type ScriptName = keyof typeof SCRIPTS;

export type ScriptCommands = {
  [K in ScriptName]: (...keysThenArgs: string[]) => Promise<unknown>;
};

let sources: Record<ScriptName, string> | undefined;
const defined = new WeakSet<RedisClient>();

function load(): Record<ScriptName, string> {
  sources ??= Object.fromEntries(
    Object.entries(SCRIPTS).map(([name, s]) => [
      name,
      readFileSync(new URL(`./lua/${s.file}`, import.meta.url), "utf8"),
    ]),
  ) as Record<ScriptName, string>;
  return sources;
}

/**
 * Defines every script on `redis` (once per connection) and returns it typed with them.
 * Called when a store is built, so a missing or unreadable .lua file stops the process
 * at start-up, not at its first job.
 */
export function withScripts(redis: RedisClient): ScriptCommands {
  if (!defined.has(redis)) {
    const lua = load();
    for (const [name, s] of Object.entries(SCRIPTS)) {
      redis.defineCommand(name, { numberOfKeys: s.keys, lua: lua[name as ScriptName] });
    }
    defined.add(redis);
  }
  return redis as unknown as ScriptCommands;
}
