import { createHmac } from "node:crypto";
import http from "node:http";
import https from "node:https";
import type { LookupFunction } from "node:net";
import { create, toJsonString } from "@bufbuild/protobuf";
import { DelayedError, Job, type Queue, UnrecoverableError } from "bullmq";
import type { DownloadLinks } from "../core/download-link.js";
import type { JobStore } from "../core/job-store.js";
import { hasLiveResult, toProtoJob } from "../core/job-to-proto.js";
import { recordWebhook } from "../core/job-transitions.js";
import {
  InvalidInputError,
  JobNotFoundError,
  type JobRecord,
  type WebhookRecord,
} from "../core/jobs.js";
import type { Logger } from "../core/logger.js";
import { type WebhookJobData, webhookScheduler } from "../core/queue.js";
import type { RedisClient } from "../core/redis.js";
import type { Storage } from "../core/storage.js";
import {
  checkWebhookUrl,
  type WebhookTarget,
  type WebhookTargetPolicy,
} from "../core/webhook-target.js";
import { GetStatusResponseSchema } from "../gen/downloads/v1/download_service_pb.js";

// Terminal-state callbacks. The transition that ends a job with a callback_url puts it
// into an outbox (a sorted set) in the same step as the state change
// (core/lua/transition.lua), so a crash cannot lose the callback, and only the run that
// owned the job (its fenced write succeeded) can owe one. The dispatcher here turns due outbox entries into
// BullMQ jobs of the `webhooks` queue (one per job id), whose processor POSTs the job
// and retries with exponential backoff; the entry leaves the outbox only once the
// delivery is settled (delivered, or given up). Delivery is at least once: a receiver
// deduplicates on job_id (the body's state is final).
//
// Fair across owners: deliveries are queued in owner turns (core/queue.ts, the same
// fair scheduling as bundle jobs), and each owner has at most WEBHOOK_MAX_IN_FLIGHT_PER_OWNER
// deliveries in flight across all workers (core/lua/webhook-slot.lua). A delivery that
// finds its owner's slots taken is parked (moved to BullMQ's delayed set, its attempt not
// counted) and promoted as soon as one of them frees, so 60 receivers that never answer
// hold their owner's slots for WEBHOOK_TIMEOUT_MS, and everyone else's deliveries pass.

export const SIGNATURE_HEADER = "download-jobs-signature";

/** `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`, as the receiver verifies it. */
export function signWebhook(secret: string, body: string, unixSeconds: number): string {
  const mac = createHmac("sha256", secret).update(`${unixSeconds}.${body}`).digest("hex");
  return `t=${unixSeconds},v1=${mac}`;
}

export interface WebhookDeliveryDeps {
  store: JobStore;
  storage: Pick<Storage, "presignResult">;
  secret: string;
  /** Stable download links (DOWNLOAD_LINK_SECRET): the body carries result.linkUrl. */
  links?: DownloadLinks | undefined;
  policy: WebhookTargetPolicy;
  timeoutMs: number;
  log: Logger;
  /** WEBHOOK_MAX_IN_FLIGHT_PER_OWNER: one owner's deliveries in flight at once; 0 = no cap. */
  maxInFlightPerOwner?: number;
  /** The webhooks queue: a freed slot promotes the owner's longest-parked delivery. */
  queue?: Queue<WebhookJobData>;
}

/** How long a parked delivery waits when no freed slot promotes it earlier. */
const PARK_MS = 1000;
/** Slot and parking keys outlive their last use by this much. */
const SLOT_KEY_TTL_MS = 10 * 60_000;

interface Answer {
  status: number;
}

/** The receiver's answer is not read beyond this: it only has to say 2xx. */
const MAX_ANSWER_BYTES = 64 * 1024;

/** POSTs `body` to the checked address of `target`, never following redirects. */
function post(
  target: WebhookTarget,
  body: string,
  headers: Record<string, string>,
  timeoutMs: number,
): Promise<Answer> {
  // Connect to the address that was checked, whatever the name resolves to now; the
  // Host header and TLS server name still carry the name.
  const lookup: LookupFunction = (_host, opts, cb) => {
    if ((opts as { all?: boolean }).all === true) {
      (cb as unknown as (e: null, a: { address: string; family: number }[]) => void)(null, [
        { address: target.address, family: target.family },
      ]);
    } else {
      cb(null, target.address, target.family);
    }
  };
  const mod = target.url.protocol === "https:" ? https : http;
  return new Promise((resolve, reject) => {
    const req = mod.request(
      target.url,
      {
        method: "POST",
        lookup,
        headers: { ...headers, "content-length": String(Buffer.byteLength(body)) },
        signal: AbortSignal.timeout(timeoutMs),
        agent: false,
      },
      (res) => {
        let seen = 0;
        res.on("data", (chunk: Buffer) => {
          seen += chunk.length;
          if (seen > MAX_ANSWER_BYTES) res.destroy();
        });
        res.on("error", () => undefined);
        res.on("close", () => resolve({ status: res.statusCode ?? 0 }));
      },
    );
    req.on("error", reject);
    req.end(body);
  });
}

/** The BullMQ processor of the `webhooks` queue. */
export function createWebhookProcessor(deps: WebhookDeliveryDeps) {
  const { store, log } = deps;

  const record = (jobId: string, webhook: WebhookRecord) => recordWebhook(store, jobId, webhook);

  const settle = (jobId: string) => store.settleWebhook(jobId);

  const cap = deps.maxInFlightPerOwner ?? 0;
  const slot = (op: "acquire" | "release", owner: string, member: string) => {
    const now = Date.now();
    return store.scripts.djWebhookSlot(
      store.keys.webhookInFlight(owner),
      store.keys.webhookParked(owner),
      op,
      member,
      String(now),
      // The delivery's own deadline plus the reads and writes around it.
      String(now + deps.timeoutMs + 30_000),
      String(cap),
      String(SLOT_KEY_TTL_MS),
    );
  };
  const release = async (owner: string, member: string) => {
    const next = await slot("release", owner, member);
    if (typeof next !== "string" || deps.queue === undefined) return;
    // Best effort: a parked delivery not yet in the delayed set comes back after PARK_MS.
    const parked = await Job.fromId(deps.queue, next);
    await parked?.promote().catch(() => undefined);
  };

  return async (job: Job<WebhookJobData>, token?: string): Promise<"delivered" | "gone"> => {
    const { jobId } = job.data;
    let rec: JobRecord;
    try {
      rec = await store.get(jobId);
    } catch (err) {
      if (err instanceof JobNotFoundError) {
        await settle(jobId);
        return "gone";
      }
      throw err;
    }
    if (rec.callbackUrl === undefined || rec.webhook?.state === "DELIVERED") {
      await settle(jobId);
      return "gone";
    }
    const member = job.id ?? `wh-${jobId}`;
    if (cap > 0 && (await slot("acquire", rec.owner, member)) !== 1) {
      await job.moveToDelayed(Date.now() + PARK_MS, token);
      throw new DelayedError();
    }
    try {
      return await deliver(job, rec);
    } finally {
      if (cap > 0)
        await release(rec.owner, member).catch((err: unknown) =>
          log.warn({ err, jobId }, "could not release a webhook slot; its lease frees it"),
        );
    }
  };

  async function deliver(job: Job<WebhookJobData>, rec: JobRecord): Promise<"delivered"> {
    const { jobId } = job.data;
    const attempts = job.opts.attempts ?? 1;
    const last = job.attemptsMade + 1 >= attempts;
    const callbackUrl = rec.callbackUrl as string;
    const previous = rec.webhook ?? { state: "PENDING", attempts: 0, lastStatus: 0 };
    const now = Date.now();
    let status = 0;
    let failure: string | undefined;
    let permanent = false;
    try {
      const target = await checkWebhookUrl(callbackUrl, deps.policy);
      const download = hasLiveResult(rec)
        ? await deps.storage.presignResult(rec.result.key, rec.result.fileName)
        : undefined;
      const body = toJsonString(
        GetStatusResponseSchema,
        create(GetStatusResponseSchema, {
          job: toProtoJob(rec, download, { linkUrl: deps.links?.linkFor(rec) }),
        }),
      );
      const answer = await post(
        target,
        body,
        {
          "content-type": "application/json",
          "user-agent": "download-jobs-webhook/1",
          [SIGNATURE_HEADER]: signWebhook(deps.secret, body, Math.floor(now / 1000)),
          // Stable per job: the receiver can drop a repeated delivery.
          "download-jobs-delivery": `${jobId}.${rec.state.toLowerCase()}`,
        },
        deps.timeoutMs,
      );
      status = answer.status;
      if (status < 200 || status > 299) failure = `answered HTTP ${status}`;
      // 410 Gone: the receiver says this endpoint will never take it.
      if (status === 410) permanent = true;
    } catch (err) {
      // The URL now fails the address check (e.g. DNS now points inside): never retried.
      if (err instanceof InvalidInputError) permanent = true;
      failure = err instanceof Error ? err.message : String(err);
    }
    const attempt: WebhookRecord = {
      ...previous,
      attempts: previous.attempts + 1,
      lastStatus: status,
      lastAttemptAt: now,
      ...(failure !== undefined ? { lastError: failure.slice(0, 300) } : {}),
    };
    if (failure === undefined) {
      const { lastError: _drop, ...ok } = attempt;
      await record(jobId, { ...ok, state: "DELIVERED", deliveredAt: Date.now() });
      await settle(jobId);
      log.info({ jobId, status, attempts: attempt.attempts }, "webhook delivered");
      return "delivered";
    }
    const givingUp = permanent || last;
    await record(jobId, { ...attempt, state: givingUp ? "FAILED" : "PENDING" }).catch(
      (err: unknown) => log.warn({ err, jobId }, "could not record webhook attempt"),
    );
    if (givingUp) {
      await settle(jobId);
      log.warn({ jobId, failure, attempts: attempt.attempts }, "webhook given up");
      throw new UnrecoverableError(`webhook failed: ${failure}`);
    }
    log.info({ jobId, failure, attempt: attempt.attempts }, "webhook attempt failed; will retry");
    throw new Error(`webhook failed: ${failure}`);
  }
}

export interface OutboxDispatcher {
  stop(): void;
}

/**
 * Moves due outbox entries into the webhooks queue. Each entry is leased for
 * `leaseMs`: if it is still there when the lease ends (a worker died mid-delivery, or
 * its BullMQ job was lost), it is queued again. Every worker runs one; the BullMQ job id
 * (`wh-<job id>`) keeps them from queueing one callback twice.
 */
export function startOutboxDispatcher(opts: {
  redis: RedisClient;
  store: JobStore;
  queue: Queue<WebhookJobData>;
  intervalMs: number;
  leaseMs: number;
  log: Logger;
}): OutboxDispatcher {
  const { redis, store, queue, log } = opts;
  const scheduler = webhookScheduler(queue, store.scripts, store.keys);
  let running = false;
  const tick = async () => {
    if (running) return;
    running = true;
    try {
      const due = await redis.zrangebyscore(
        store.webhookOutboxKey,
        "-inf",
        Date.now(),
        "LIMIT",
        0,
        200,
      );
      for (const jobId of due) {
        // Owners take turns in the queue; a vanished record is settled by the processor.
        const owner = (await redis.hget(store.key(jobId), "owner")) ?? "-";
        await scheduler.add("deliver", `wh-${jobId}`, { jobId }, { priority: 0, owner, weight: 1 });
        await redis.zadd(store.webhookOutboxKey, "XX", Date.now() + opts.leaseMs, jobId);
      }
    } catch (err) {
      log.debug({ err }, "webhook outbox dispatch failed; next tick retries");
    } finally {
      running = false;
    }
  };
  const timer = setInterval(() => void tick(), opts.intervalMs);
  timer.unref();
  void tick();
  return { stop: () => clearInterval(timer) };
}
