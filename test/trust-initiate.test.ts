import { createHash } from "node:crypto";
import { HeadObjectCommand } from "@aws-sdk/client-s3";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createConnectTransport, createGrpcTransport } from "@connectrpc/connect-node";
import { pino } from "pino";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import type { JobRecord } from "../core/jobs.js";
import {
  DownloadService,
  InitiateOutcome,
  JobState,
} from "../gen/downloads/v1/download_service_pb.js";
import { RetryInfoSchema } from "../gen/google/rpc/error_details_pb.js";
import { type RunningWorker, startWorker } from "../worker/worker.js";
import { type ApiStack, startApiStack } from "./helpers/api.js";
import { type Services, startServices } from "./helpers/services.js";
import { authTokens, bearer } from "./helpers/trust.js";

// What Initiate promises a client that retries, repeats itself or asks too much:
// idempotency keys, dedup of identical work, per-owner limits and backpressure, each
// checked through real clients against a real server over real Redis.

const ALICE = "alice-token-0b7e2d9c4f1a6e3b";
const BOB = "bob-token-5c8f3a0d7e2b9c4f";
const SERVICE = "/downloads.v1.DownloadService";
const BASE = {
  AUTH_TOKENS: authTokens({ alice: ALICE, bob: BOB }),
  DEDUP_IN_FLIGHT: "false",
  REUSE_RESULTS: "false",
};

let svc: Services;
const stacks: ApiStack[] = [];

beforeAll(async () => {
  svc = await startServices();
});
afterAll(async () => {
  for (const st of stacks) await st.stop();
  await svc?.stop();
});

async function stack(overrides: Record<string, string> = {}): Promise<ApiStack> {
  const st = await startApiStack({ ...BASE, ...overrides }, { services: svc });
  stacks.push(st);
  return st;
}

function clientFor(st: ApiStack, token: string, kind: "connect" | "grpc" = "connect") {
  const interceptors = [bearer(token)];
  return createClient(
    DownloadService,
    kind === "connect"
      ? createConnectTransport({ baseUrl: st.server.url, httpVersion: "1.1", interceptors })
      : createGrpcTransport({ baseUrl: st.server.url, interceptors }),
  );
}

const errorOf = async (p: Promise<unknown>) =>
  ConnectError.from(
    await p.then(
      () => new Error("succeeded"),
      (e: unknown) => e,
    ),
  );

/** The RetryInfo delay of an error in ms, or undefined when it has none. */
function retryDelayMs(err: ConnectError): number | undefined {
  const info = err.findDetails(RetryInfoSchema)[0];
  if (info?.retryDelay === undefined) return undefined;
  return Number(info.retryDelay.seconds) * 1000 + info.retryDelay.nanos / 1e6;
}

const postJson = (
  st: ApiStack,
  token: string,
  body: unknown,
  headers: Record<string, string> = {},
) =>
  fetch(`${st.server.url}${SERVICE}/Initiate`, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${token}`, ...headers },
    body: JSON.stringify(body),
  });

async function jobRecords(st: ApiStack): Promise<number> {
  const keys = await st.redis.keys(`${st.cfg.QUEUE_PREFIX}:job:*`);
  return keys.filter((k) => !k.endsWith(":events")).length;
}

describe("idempotent Initiate (request_id, Idempotency-Key)", () => {
  let st: ApiStack;
  beforeAll(async () => {
    st = await stack();
  });

  test("the same key and parameters return the same job, on any protocol; other parameters are INVALID_ARGUMENT", async () => {
    const key = crypto.randomUUID();
    const alice = clientFor(st, ALICE);
    const first = await alice.initiate({ fileIds: [1, 2], requestId: key });
    expect(first.outcome).toBe(InitiateOutcome.CREATED);
    const again = await clientFor(st, ALICE, "grpc").initiate({ fileIds: [1, 2], requestId: key });
    expect(again.outcome).toBe(InitiateOutcome.REPLAYED);
    expect(again.job?.jobId).toBe(first.job?.jobId);

    // The HTTP header is the same key.
    const viaHeader = await postJson(st, ALICE, { fileIds: [1, 2] }, { "Idempotency-Key": key });
    expect(viaHeader.status).toBe(200);
    const body = (await viaHeader.json()) as { job: { jobId: string }; outcome: string };
    expect(body).toMatchObject({
      job: { jobId: first.job?.jobId },
      outcome: "INITIATE_OUTCOME_REPLAYED",
    });

    const changed = await errorOf(alice.initiate({ fileIds: [2, 1], requestId: key }));
    expect(changed.code).toBe(Code.InvalidArgument);
    expect(changed.rawMessage).toMatch(/other parameters/);
    const headerDiffers = await postJson(
      st,
      ALICE,
      { fileIds: [1, 2], requestId: key },
      { "Idempotency-Key": "another" },
    );
    expect(headerDiffers.status).toBe(400);
    expect(await st.queue.getJobCountByTypes("waiting", "prioritized")).toBeGreaterThan(0);
    const queued = await st.queue.getJob(first.job?.jobId ?? "");
    expect(queued?.data.fileIds).toEqual([1, 2]);
  });

  test("a key belongs to its owner: the same key from another owner is another job", async () => {
    const key = crypto.randomUUID();
    const a = await clientFor(st, ALICE).initiate({ fileIds: [3], requestId: key });
    const b = await clientFor(st, BOB).initiate({ fileIds: [3], requestId: key });
    expect(b.outcome).toBe(InitiateOutcome.CREATED);
    expect(b.job?.jobId).not.toBe(a.job?.jobId);
  });

  test("60 concurrent calls with one key create exactly one job", async () => {
    const key = crypto.randomUUID();
    const before = await jobRecords(st);
    const clients = [clientFor(st, ALICE), clientFor(st, ALICE, "grpc")];
    const answers = await Promise.all(
      Array.from({ length: 60 }, (_, i) =>
        (clients[i % 2] ?? clients[0])?.initiate({ fileIds: [4, 5], requestId: key }),
      ),
    );
    const ids = new Set(answers.map((a) => a?.job?.jobId));
    expect(ids.size).toBe(1);
    expect(answers.filter((a) => a?.outcome === InitiateOutcome.CREATED)).toHaveLength(1);
    expect(await jobRecords(st)).toBe(before + 1);
    console.log(`idempotency: 60 concurrent Initiate calls with one key -> ${ids.size} job`);
  });

  test("the key is kept for IDEMPOTENCY_TTL_SECONDS (24 h by default)", async () => {
    const key = crypto.randomUUID();
    await clientFor(st, ALICE).initiate({ fileIds: [6], requestId: key });
    const digest = createHash("sha256").update(key).digest("hex");
    const ttl = await st.redis.ttl(`${st.cfg.QUEUE_PREFIX}:idem:alice:${digest}`);
    expect(st.cfg.IDEMPOTENCY_TTL_SECONDS).toBe(24 * 3600);
    expect(ttl).toBeGreaterThan(24 * 3600 - 60);
    expect(ttl).toBeLessThanOrEqual(24 * 3600);
  });

  test("a malformed key is INVALID_ARGUMENT", async () => {
    for (const requestId of ["x".repeat(129), "has space", "ünïcode"]) {
      expect((await errorOf(clientFor(st, ALICE).initiate({ fileIds: [7], requestId }))).code).toBe(
        Code.InvalidArgument,
      );
    }
  });
});

describe("dedup of identical work", () => {
  test("an owner's identical in-flight request returns the running job; order, owner or an ended job make a new one", async () => {
    const st = await stack({ DEDUP_IN_FLIGHT: "true", REUSE_RESULTS: "true" });
    const alice = clientFor(st, ALICE);
    const first = await alice.initiate({ fileIds: [51, 52] });
    expect(first.outcome).toBe(InitiateOutcome.CREATED);
    await st.startJob(first.job?.jobId ?? "");
    const again = await alice.initiate({ fileIds: [51, 52] });
    expect(again.outcome).toBe(InitiateOutcome.IN_FLIGHT);
    expect(again.job?.jobId).toBe(first.job?.jobId);
    expect(again.job?.state).toBe(JobState.PROCESSING);

    // The order is the ZIP's entry order: another order is another ZIP.
    expect((await alice.initiate({ fileIds: [52, 51] })).outcome).toBe(InitiateOutcome.CREATED);
    expect((await clientFor(st, BOB).initiate({ fileIds: [51, 52] })).outcome).toBe(
      InitiateOutcome.CREATED,
    );

    await alice.cancel({ jobId: first.job?.jobId ?? "" });
    const fresh = await alice.initiate({ fileIds: [51, 52] });
    expect(fresh.outcome).toBe(InitiateOutcome.CREATED);
    expect(fresh.job?.jobId).not.toBe(first.job?.jobId);
  });

  test("a completed bundle is reused while its result lives: the same job, ready, no new work queued", async () => {
    const st = await stack({ DEDUP_IN_FLIGHT: "true", REUSE_RESULTS: "true" });
    const alice = clientFor(st, ALICE);
    const made = await alice.initiate({ fileIds: [53, 54] });
    const jobId = made.job?.jobId ?? "";
    await st.startJob(jobId);
    const zip = Buffer.from("PK reused bundle");
    await st.complete(jobId, zip);
    const waiting = await st.queue.getJobCountByTypes("waiting", "prioritized");

    const reused = await alice.initiate({ fileIds: [53, 54] });
    expect(reused.outcome).toBe(InitiateOutcome.REUSED_RESULT);
    expect(reused.job?.jobId).toBe(jobId);
    expect(reused.job?.state).toBe(JobState.COMPLETED);
    const bytes = Buffer.from(
      await (await fetch(reused.job?.result?.downloadUrl ?? "")).arrayBuffer(),
    );
    expect(bytes.equals(zip)).toBe(true);
    expect(await st.queue.getJobCountByTypes("waiting", "prioritized")).toBe(waiting);
  });

  test("with DEDUP_IN_FLIGHT and REUSE_RESULTS off every Initiate is a new job", async () => {
    const st = await stack({ DEDUP_IN_FLIGHT: "false", REUSE_RESULTS: "false" });
    const alice = clientFor(st, ALICE);
    const a = await alice.initiate({ fileIds: [55] });
    const b = await alice.initiate({ fileIds: [55] });
    await st.startJob(b.job?.jobId ?? "");
    await st.complete(b.job?.jobId ?? "", Buffer.from("PK"));
    const c = await alice.initiate({ fileIds: [55] });
    expect([a, b, c].map((x) => x.outcome)).toEqual([
      InitiateOutcome.CREATED,
      InitiateOutcome.CREATED,
      InitiateOutcome.CREATED,
    ]);
    expect(new Set([a, b, c].map((x) => x.job?.jobId)).size).toBe(3);
  });
});

describe("limits and backpressure", () => {
  test("past MAX_ACTIVE_JOBS_PER_OWNER: RESOURCE_EXHAUSTED with RetryInfo, HTTP 429 with Retry-After; others and replays unaffected", async () => {
    const st = await stack({ MAX_ACTIVE_JOBS_PER_OWNER: "2" });
    const alice = clientFor(st, ALICE);
    const key = crypto.randomUUID();
    const one = await alice.initiate({ fileIds: [61], requestId: key });
    await alice.initiate({ fileIds: [62] });
    const refused = await errorOf(alice.initiate({ fileIds: [63] }));
    expect(refused.code).toBe(Code.ResourceExhausted);
    expect(retryDelayMs(refused)).toBeGreaterThanOrEqual(1000);
    const json = await postJson(st, ALICE, { fileIds: [63] });
    expect(json.status).toBe(429);
    expect(Number(json.headers.get("retry-after"))).toBeGreaterThanOrEqual(1);
    expect(((await json.json()) as { code: string }).code).toBe("resource_exhausted");

    // A retry of a call that did go through is not a new job: still answered.
    expect((await alice.initiate({ fileIds: [61], requestId: key })).outcome).toBe(
      InitiateOutcome.REPLAYED,
    );
    expect((await clientFor(st, BOB).initiate({ fileIds: [63] })).outcome).toBe(
      InitiateOutcome.CREATED,
    );
    // A job that ends frees its slot.
    await alice.cancel({ jobId: one.job?.jobId ?? "" });
    expect((await alice.initiate({ fileIds: [63] })).outcome).toBe(InitiateOutcome.CREATED);
  });

  test("past INITIATE_RATE_PER_MINUTE: RESOURCE_EXHAUSTED with the delay until the next token", async () => {
    const st = await stack({ INITIATE_RATE_PER_MINUTE: "3" });
    const alice = clientFor(st, ALICE);
    for (const id of [71, 72, 73]) await alice.initiate({ fileIds: [id] });
    const refused = await errorOf(alice.initiate({ fileIds: [74] }));
    expect(refused.code).toBe(Code.ResourceExhausted);
    const delay = retryDelayMs(refused) ?? 0;
    // Three a minute: one token every 20 s, part of which the three calls above used up
    // (all of it, nearly, on a machine busy enough).
    expect(delay).toBeGreaterThan(0);
    expect(delay).toBeLessThanOrEqual(20_000);
    expect((await clientFor(st, BOB).initiate({ fileIds: [74] })).outcome).toBe(
      InitiateOutcome.CREATED,
    );
  });

  test("past MAX_QUEUE_DEPTH: UNAVAILABLE with RetryInfo, HTTP 503 with Retry-After", async () => {
    const st = await stack({ MAX_QUEUE_DEPTH: "3" });
    const bob = clientFor(st, BOB);
    const key = crypto.randomUUID();
    await bob.initiate({ fileIds: [81], requestId: key });
    await bob.initiate({ fileIds: [82] });
    await clientFor(st, ALICE).initiate({ fileIds: [83] });
    await expect
      .poll(async () => (await errorOf(bob.initiate({ fileIds: [84] }))).code)
      .toBe(Code.Unavailable);
    const refused = await errorOf(bob.initiate({ fileIds: [84] }));
    expect(retryDelayMs(refused)).toBeGreaterThanOrEqual(1000);
    const json = await postJson(st, ALICE, { fileIds: [84] });
    expect(json.status).toBe(503);
    expect(Number(json.headers.get("retry-after"))).toBeGreaterThanOrEqual(1);
    expect((await bob.initiate({ fileIds: [81], requestId: key })).outcome).toBe(
      InitiateOutcome.REPLAYED,
    );
  });

  describe("MAX_JOB_BYTES, with a worker", () => {
    let st: ApiStack;
    let worker: RunningWorker;
    beforeAll(async () => {
      st = await stack({ MAX_JOB_BYTES: "1000" });
      worker = await startWorker(st.cfg, pino({ level: "silent" }));
      await svc.putSource(91, 600);
      await svc.putSource(92, 600);
    });
    afterAll(async () => {
      await worker?.close();
    });

    const until = async (jobId: string) => {
      let rec: JobRecord | undefined;
      await expect
        .poll(async () => (rec = await st.store.get(jobId)).state, {
          interval: 50,
        })
        .toMatch(/COMPLETED|FAILED|CANCELLED/);
      return rec as JobRecord;
    };

    test("a job past the limit fails with resource_exhausted before anything is uploaded", async () => {
      const alice = clientFor(st, ALICE);
      const big = await alice.initiate({ fileIds: [91, 92] });
      const rec = await until(big.job?.jobId ?? "");
      expect(rec.state).toBe("FAILED");
      expect(rec.error).toMatchObject({ code: "resource_exhausted", retryable: false });
      expect(rec.progress.bytesDone).toBe(0);
      const head = await svc.storage.client
        .send(
          new HeadObjectCommand({
            Bucket: st.cfg.RESULT_BUCKET,
            Key: svc.storage.resultKey(rec.id),
          }),
        )
        .then(
          () => 200,
          (e: { $metadata?: { httpStatusCode?: number } }) => e.$metadata?.httpStatusCode,
        );
      expect(head).toBe(404);
      const job = (await alice.getStatus({ jobId: rec.id })).job;
      expect(job?.error?.code).toBe("resource_exhausted");

      const small = await alice.initiate({ fileIds: [91] });
      expect((await until(small.job?.jobId ?? "")).state).toBe("COMPLETED");
    });
  });
});
