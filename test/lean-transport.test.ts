import http2 from "node:http2";
import { resolve } from "node:path";
import { gunzipSync } from "node:zlib";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { pino } from "pino";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { createJob, markFailed } from "../core/job-transitions.js";
import { newJobId } from "../core/jobs.js";
import {
  DownloadService,
  GetStatusRequestSchema,
  GetStatusResponseSchema,
  InitiateOutcome,
  InitiateRequestSchema,
  InitiateResponseSchema,
  JobState,
  WatchJobRequestSchema,
  WatchJobResponseSchema,
} from "../gen/downloads/v1/download_service_pb.js";
import { startApiServer } from "../server/server.js";
import { type ApiStack, startApiStack, TEST_AUTH_HEADER, withTestToken } from "./helpers/api.js";
import { type Services, startServices } from "./helpers/services.js";

// The lean transport (server/lean/lean-transport.ts) on the hot calls, called the way a
// client without a Connect library would: raw envelopes over fetch and node:http2, and
// for gRPC also with @grpc/grpc-js and connect-node's gRPC client: the behaviours one
// can see only over time (coalescing for a slow reader, deadlines, caching, log lines).
// Answers compared with connect-node's call by call are test/lean-differential.test.ts's.

const MAX_BYTES = 1024;
const SERVICE = "/downloads.v1.DownloadService";

let svc: Services;
let fast: ApiStack;
let plain: ApiStack;

beforeAll(async () => {
  svc = await startServices();
  // Both paths must answer alike; ownership through them is test/trust-auth.test.ts's.
  const env = {
    MAX_REQUEST_BYTES: String(MAX_BYTES),
    WATCH_HEARTBEAT_MS: "60000",
    PRESIGN_EXPIRY_SECONDS: "300",
    AUTH_DISABLED: "true",
  };
  fast = await startApiStack(env, { services: svc });
  plain = await startApiStack(env, { services: svc, leanTransport: false });
});
afterAll(async () => {
  await fast?.stop();
  await plain?.stop();
  await svc?.stop();
});

/** One Connect envelope: flags, big-endian length, payload. */
function envelope(flags: number, data: string | Uint8Array): Buffer {
  const payload = Buffer.from(data);
  const head = Buffer.alloc(5);
  head[0] = flags;
  head.writeUInt32BE(payload.length, 1);
  return Buffer.concat([head, payload]);
}

interface Frame {
  flags: number;
  data: Buffer;
}

function frames(body: Buffer): Frame[] {
  const out: Frame[] = [];
  for (let at = 0; at + 5 <= body.length; ) {
    const length = body.readUInt32BE(at + 1);
    out.push({ flags: body[at] as number, data: body.subarray(at + 5, at + 5 + length) });
    at += 5 + length;
  }
  return out;
}

/** The JSON messages of a stream and its end-of-stream object. */
function decodeJsonStream(body: Buffer): {
  messages: Record<string, any>[];
  end: { error?: { code: string; message?: string } };
} {
  const all = frames(body);
  const last = all.at(-1);
  expect(last?.flags).toBe(2);
  return {
    messages: all.slice(0, -1).map((f) => JSON.parse(f.data.toString()) as Record<string, any>),
    end: JSON.parse(last?.data.toString() ?? "{}") as { error?: { code: string } },
  };
}

const watchRequest = (jobId: string, afterVersion = 0) =>
  envelope(0, JSON.stringify({ jobId, afterVersion }));

async function watchRaw(stack: ApiStack, body: Buffer, headers: Record<string, string> = {}) {
  const res = await fetch(`${stack.server.url}${SERVICE}/WatchJob`, {
    method: "POST",
    headers: { "content-type": "application/connect+json", ...headers },
    body: new Uint8Array(body),
  });
  return {
    status: res.status,
    type: res.headers.get("content-type"),
    body: Buffer.from(await res.arrayBuffer()),
  };
}

/** Reads a stream as it arrives; `messages` fills up, `done` resolves at its end. */
function follow(stack: ApiStack, jobId: string) {
  const messages: Record<string, any>[] = [];
  let end: { error?: { code: string } } | undefined;
  const done = (async () => {
    const res = await fetch(`${stack.server.url}${SERVICE}/WatchJob`, {
      method: "POST",
      headers: { "content-type": "application/connect+json" },
      body: new Uint8Array(watchRequest(jobId)),
    });
    let buf = Buffer.alloc(0);
    for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) {
      buf = Buffer.concat([buf, chunk]);
      for (;;) {
        if (buf.length < 5) break;
        const length = buf.readUInt32BE(1);
        if (buf.length < 5 + length) break;
        const frame = JSON.parse(buf.subarray(5, 5 + length).toString()) as Record<string, any>;
        if (buf[0] === 2) end = frame;
        else messages.push(frame);
        buf = buf.subarray(5 + length);
      }
    }
    return end;
  })();
  return { messages, done };
}

describe("WatchJob over raw Connect envelopes", () => {
  test("JSON: the snapshot, each change, the completed job with a download URL, then {}", async () => {
    const jobId = (await createJob(fast.store, newJobId(), [1, 2], "anonymous")).id;
    const w = follow(fast, jobId);
    await expect.poll(() => w.messages.length).toBe(1);
    await fast.startJob(jobId);
    await fast.progress(jobId, 30, 100);
    await expect.poll(() => w.messages.at(-1)?.job?.progress?.percent).toBe(30);
    await fast.complete(jobId, Buffer.from("zip bytes"));
    const end = await w.done;
    expect(end).toEqual({});
    const jobs = w.messages.map(
      (m) => m.job as { state: string; version: number; result?: { downloadUrl: string } },
    );
    expect(jobs.map((j) => j.state)).toEqual([
      "JOB_STATE_QUEUED",
      "JOB_STATE_PROCESSING",
      "JOB_STATE_PROCESSING",
      "JOB_STATE_COMPLETED",
    ]);
    expect(jobs.map((j) => j.version)).toEqual([1, 2, 3, 4]);
    const download = await fetch(jobs.at(-1)?.result?.downloadUrl ?? "");
    expect(Buffer.from(await download.arrayBuffer()).toString()).toBe("zip bytes");
  });

  test("binary over HTTP/2: the same messages as protobuf, ended by {}", async () => {
    const jobId = (await createJob(fast.store, newJobId(), [3], "anonymous")).id;
    await fast.startJob(jobId);
    await fast.fail(jobId);
    const session = http2.connect(fast.server.url);
    try {
      const stream = session.request({
        ":method": "POST",
        ":path": `${SERVICE}/WatchJob`,
        "content-type": "application/connect+proto",
      });
      stream.end(
        envelope(0, toBinary(WatchJobRequestSchema, create(WatchJobRequestSchema, { jobId }))),
      );
      const [headers, body] = await new Promise<[http2.IncomingHttpHeaders, Buffer]>((ok, fail) => {
        const chunks: Buffer[] = [];
        let head: http2.IncomingHttpHeaders = {};
        stream.on("response", (h) => (head = h));
        stream.on("data", (d: Buffer) => chunks.push(d));
        stream.on("end", () => ok([head, Buffer.concat(chunks)]));
        stream.on("error", fail);
      });
      expect(headers[":status"]).toBe(200);
      expect(headers["content-type"]).toBe("application/connect+proto");
      const all = frames(body);
      expect(all.map((f) => f.flags)).toEqual([0, 2]);
      const msg = fromBinary(WatchJobResponseSchema, all[0]?.data ?? new Uint8Array());
      expect(msg.event.case).toBe("job");
      expect(
        msg.event.case === "job" ? [msg.event.value.version, msg.event.value.error?.code] : [],
      ).toEqual([3, "not_found"]);
      expect(all[1]?.data.toString()).toBe("{}");
    } finally {
      session.close();
    }
  });

  test("a watcher that stops reading gets, once it reads again, every state in order and the latest progress", async () => {
    // 100 files make each message ~7 KB: HTTP/2's 64 KB window fills after a few, the
    // server stops writing to this stream, and the hub keeps only the latest record.
    const files = Array.from({ length: 100 }, (_, i) => i + 1);
    const jobId = (await createJob(fast.store, newJobId(), files, "anonymous")).id;
    const session = http2.connect(fast.server.url);
    try {
      const stream = session.request({
        ":method": "POST",
        ":path": `${SERVICE}/WatchJob`,
        "content-type": "application/connect+json",
      });
      stream.end(watchRequest(jobId));
      stream.pause();
      await new Promise((ok) => stream.once("response", ok));
      await fast.startJob(jobId);
      const updates = 300;
      for (let i = 1; i <= updates; i++) await fast.progress(jobId, i, updates);
      await fast.complete(jobId, Buffer.from("zip"));
      const chunks: Buffer[] = [];
      stream.on("data", (d: Buffer) => chunks.push(d));
      stream.resume();
      await new Promise((ok, fail) => stream.once("end", ok).once("error", fail));
      const { messages, end } = decodeJsonStream(Buffer.concat(chunks));
      expect(end).toEqual({});
      const jobs = messages.map(
        (m) => m.job as { version: number; state: string; progress: { bytesDone?: string } },
      );
      const versions = jobs.map((j) => j.version);
      expect(versions).toEqual([...versions].sort((a, b) => a - b));
      expect(new Set(versions).size).toBe(versions.length);
      // Fewer messages than changes: the unread ones were coalesced, never a state lost.
      expect(jobs.length).toBeLessThan(updates);
      expect(jobs[0]?.state).toBe("JOB_STATE_QUEUED");
      expect(jobs.some((j) => j.state === "JOB_STATE_PROCESSING")).toBe(true);
      expect(jobs.at(-1)?.state).toBe("JOB_STATE_COMPLETED");
      expect(jobs.at(-2)?.progress.bytesDone).toBe(String(updates));
    } finally {
      session.close();
    }
  });

  test("a resumed watch of an unchanged job gets a heartbeat at once", async () => {
    const jobId = (await createJob(fast.store, newJobId(), [4], "anonymous")).id;
    // The deadline only ends the stream; "at once" means before it, even on a busy machine.
    const res = await watchRaw(fast, watchRequest(jobId, 1), { "connect-timeout-ms": "3000" });
    const { messages, end } = decodeJsonStream(res.body);
    // Only heartbeats of the version it has: the first at once, then (the job is queued)
    // one every WATCH_QUEUED_HEARTBEAT_MS with its estimate.
    expect(messages.length).toBeGreaterThanOrEqual(1);
    expect(messages.map((m) => m.heartbeat?.version)).toEqual(messages.map(() => 1));
    expect(end.error?.code).toBe("deadline_exceeded");
  });

  test("connect-timeout-ms ends an open stream with deadline_exceeded", async () => {
    const jobId = (await createJob(fast.store, newJobId(), [5], "anonymous")).id;
    const res = await watchRaw(fast, watchRequest(jobId), { "connect-timeout-ms": "3000" });
    expect(res.status).toBe(200);
    const { messages, end } = decodeJsonStream(res.body);
    // The job, then (it is queued) heartbeats with its estimate until the deadline.
    expect(messages[0]?.job?.version).toBe(1);
    expect(messages.slice(1).map((m) => m.heartbeat?.version)).toEqual(
      messages.slice(1).map(() => 1),
    );
    expect(end.error?.code).toBe("deadline_exceeded");
  });

  const unknownJob = newJobId();
  test.each([
    ["a malformed job id", () => watchRequest("../etc/passwd"), {}],
    ["an unknown job", () => watchRequest(unknownJob), {}],
    ["a cut-off envelope", () => watchRequest(unknownJob).subarray(0, 9), {}],
    [
      "a message over the size limit",
      () => envelope(0, JSON.stringify({ jobId: "x".repeat(MAX_BYTES * 2) })),
      {},
    ],
    [
      "a compressed flag without an encoding",
      () => envelope(1, JSON.stringify({ jobId: unknownJob })),
      {},
    ],
    [
      "an encoding the server does not know",
      () => watchRequest(unknownJob),
      { "connect-content-encoding": "snappy" },
    ],
    ["no message at all", () => Buffer.alloc(0), {}],
    ["two messages", () => Buffer.concat([watchRequest(unknownJob), watchRequest(unknownJob)]), {}],
    ["malformed JSON", () => envelope(0, '{"jobId":'), {}],
    ["an unknown field", () => envelope(0, '{"jobIdd":"x"}'), {}],
    ["a job id written twice", () => envelope(0, `{"jobId":"${unknownJob}","jobId":"x"}`), {}],
    [
      "an after_version beyond int32",
      () => envelope(0, JSON.stringify({ jobId: unknownJob, afterVersion: 2 ** 31 })),
      {},
    ],
    ["a malformed timeout", () => watchRequest(unknownJob), { "connect-timeout-ms": "soon" }],
  ])("%s gets the same answer as from connect-node", async (_what, body, headers) => {
    const [a, b] = await Promise.all([
      watchRaw(fast, body(), headers),
      watchRaw(plain, body(), headers),
    ]);
    expect(a.status).toBe(b.status);
    const fastEnd = decodeJsonStream(a.body);
    const plainEnd = decodeJsonStream(b.body);
    expect(fastEnd.messages).toEqual([]);
    expect(fastEnd.end.error?.code).toBeDefined();
    expect(fastEnd.end.error?.code).toBe(plainEnd.end.error?.code);
  });

  test("a binary message that does not parse gets the same answer as from connect-node", async () => {
    const body = envelope(0, Buffer.from([0xff, 0xff, 0xff]));
    const headers = { "content-type": "application/connect+proto" };
    const [a, b] = await Promise.all([
      watchRaw(fast, body, headers),
      watchRaw(plain, body, headers),
    ]);
    expect([a.status, a.type]).toEqual([b.status, b.type]);
    expect(frames(a.body).at(-1)?.data.toString()).toBe(frames(b.body).at(-1)?.data.toString());
  });
});

describe("GetStatus, polled", () => {
  const post = (
    stack: ApiStack,
    body: string | Uint8Array,
    type = "application/json",
    headers: Record<string, string> = {},
  ) =>
    fetch(`${stack.server.url}${SERVICE}/GetStatus`, {
      method: "POST",
      headers: { "content-type": type, ...headers },
      body: typeof body === "string" ? body : new Uint8Array(body),
    });
  const get = (stack: ApiStack, query: string) =>
    fetch(`${stack.server.url}${SERVICE}/GetStatus?${query}`);
  const jsonQuery = (jobId: string) =>
    `connect=v1&encoding=json&message=${encodeURIComponent(JSON.stringify({ jobId }))}`;

  test("JSON POST, binary POST, GET and base64 GET all return the job", async () => {
    const jobId = (await createJob(fast.store, newJobId(), [7, 8], "anonymous")).id;
    await fast.startJob(jobId);
    await fast.progress(jobId, 25, 100);
    const binaryRequest = toBinary(
      GetStatusRequestSchema,
      create(GetStatusRequestSchema, { jobId }),
    );

    const viaJson = (await (await post(fast, JSON.stringify({ jobId }))).json()) as {
      job: { version: number; progress: object };
    };
    expect(viaJson.job).toMatchObject({
      jobId,
      state: "JOB_STATE_PROCESSING",
      version: 3,
      progress: { percent: 25 },
    });

    const viaBinary = await post(fast, binaryRequest, "application/proto");
    expect(viaBinary.headers.get("content-type")).toBe("application/proto");
    const decoded = fromBinary(
      GetStatusResponseSchema,
      new Uint8Array(await viaBinary.arrayBuffer()),
    );
    expect([decoded.job?.jobId, decoded.job?.version, decoded.job?.progress?.percent]).toEqual([
      jobId,
      3,
      25,
    ]);

    const viaGet = await get(fast, jsonQuery(jobId));
    expect(((await viaGet.json()) as { job: { version: number } }).job.version).toBe(3);

    const b64 = Buffer.from(binaryRequest).toString("base64url");
    const viaB64 = await get(fast, `encoding=proto&base64=1&message=${b64}&connect=v1`);
    expect(
      fromBinary(GetStatusResponseSchema, new Uint8Array(await viaB64.arrayBuffer())).job?.jobId,
    ).toBe(jobId);
    const jsonB64 = Buffer.from(JSON.stringify({ jobId })).toString("base64url");
    const viaJsonB64 = await get(fast, `encoding=json&base64=1&message=${jsonB64}`);
    expect(((await viaJsonB64.json()) as { job: { jobId: string } }).job.jobId).toBe(jobId);
  });

  test("every poll sees the job's latest version, in both encodings, however often it is read", async () => {
    const jobId = (await createJob(fast.store, newJobId(), [9], "anonymous")).id;
    const binaryRequest = toBinary(
      GetStatusRequestSchema,
      create(GetStatusRequestSchema, { jobId }),
    );
    const read = async () => {
      const json = (await (await post(fast, JSON.stringify({ jobId }))).json()) as {
        job: { version: number; state: string };
      };
      const bin = fromBinary(
        GetStatusResponseSchema,
        new Uint8Array(await (await post(fast, binaryRequest, "application/proto")).arrayBuffer()),
      );
      return [json.job.version, json.job.state, bin.job?.version];
    };
    expect(await read()).toEqual([1, "JOB_STATE_QUEUED", 1]);
    expect(await read()).toEqual([1, "JOB_STATE_QUEUED", 1]);
    await fast.startJob(jobId);
    expect(await read()).toEqual([2, "JOB_STATE_PROCESSING", 2]);
    await fast.progress(jobId, 50, 100);
    expect(await read()).toEqual([3, "JOB_STATE_PROCESSING", 3]);
    await fast.fail(jobId);
    expect(await read()).toEqual([4, "JOB_STATE_FAILED", 4]);
  });

  test("GET answers may be reused briefly, privately, and never an error", async () => {
    const running = (await createJob(fast.store, newJobId(), [1], "anonymous")).id;
    expect((await get(fast, jsonQuery(running))).headers.get("cache-control")).toBe(
      "private, max-age=1",
    );

    const failed = (await createJob(fast.store, newJobId(), [1], "anonymous")).id;
    await fast.fail(failed);
    expect((await get(fast, jsonQuery(failed))).headers.get("cache-control")).toBe(
      "private, max-age=60",
    );

    // The URL in a completed job expires: the answer may live a tenth of its lifetime.
    const done = (await createJob(fast.store, newJobId(), [1], "anonymous")).id;
    await fast.startJob(done);
    await fast.complete(done, Buffer.from("zip"));
    const res = await get(fast, jsonQuery(done));
    expect(res.headers.get("cache-control")).toBe("private, max-age=30");
    const body = (await res.json()) as {
      job: { result: { downloadUrl: string; expireTime: string } };
    };
    const maxAge = 30_000;
    expect(Date.parse(body.job.result.expireTime) - Date.now()).toBeGreaterThan(maxAge * 5);

    const missing = await get(fast, jsonQuery(newJobId()));
    expect(missing.status).toBe(404);
    expect(missing.headers.get("cache-control")).toBe("no-store");

    // A POST answer is not for caches at all.
    expect(
      (await post(fast, JSON.stringify({ jobId: running }))).headers.get("cache-control"),
    ).toBeNull();
  });

  test("connect-timeout-ms is honoured: a malformed one is invalid_argument", async () => {
    const res = await post(fast, JSON.stringify({ jobId: newJobId() }), "application/json", {
      "connect-timeout-ms": "x",
    });
    expect(res.status).toBe(400);
    expect(((await res.json()) as { code: string }).code).toBe("invalid_argument");
    const jobId = (await createJob(fast.store, newJobId(), [1], "anonymous")).id;
    const ok = await post(fast, JSON.stringify({ jobId }), "application/json", {
      "connect-timeout-ms": "10000",
    });
    expect(ok.status).toBe(200);
  });

  const unknownJob = newJobId();
  const oversized = JSON.stringify({ jobId: "x".repeat(MAX_BYTES * 2) });
  test.each([
    ["POST an unknown job", (s: ApiStack) => post(s, JSON.stringify({ jobId: unknownJob }))],
    ["POST a malformed id", (s: ApiStack) => post(s, JSON.stringify({ jobId: "42" }))],
    ["POST malformed JSON", (s: ApiStack) => post(s, '{"jobId":')],
    ["POST an unknown field", (s: ApiStack) => post(s, '{"job_idd":"x"}')],
    [
      "POST a job id and an unknown field",
      (s: ApiStack) => post(s, JSON.stringify({ jobId: unknownJob, extra: 1 })),
    ],
    ["POST a job id that is a number", (s: ApiStack) => post(s, '{"jobId":42}')],
    [
      "POST the job id in its proto name",
      (s: ApiStack) => post(s, JSON.stringify({ job_id: unknownJob })),
    ],
    ["POST a JSON array", (s: ApiStack) => post(s, "[1]")],
    ["POST an oversized body", (s: ApiStack) => post(s, oversized)],
    [
      "POST an unparsable binary body",
      (s: ApiStack) => post(s, new Uint8Array([0xff, 0xff]), "application/proto"),
    ],
    ["POST a wrong content type", (s: ApiStack) => post(s, "{}", "text/plain")],
    [
      "POST a gzip body that is not gzip",
      (s: ApiStack) => post(s, "{}", "application/json", { "content-encoding": "gzip" }),
    ],
    ["GET without a message", (s: ApiStack) => get(s, "encoding=json")],
    [
      "GET without an encoding",
      (s: ApiStack) =>
        get(s, `message=${encodeURIComponent(JSON.stringify({ jobId: unknownJob }))}`),
    ],
    ["GET an unknown job", (s: ApiStack) => get(s, jsonQuery(unknownJob))],
    ["GET a malformed id", (s: ApiStack) => get(s, jsonQuery("not-a-uuid"))],
  ])("%s gets the same status and code as from connect-node", async (_what, call) => {
    const [a, b] = await Promise.all([call(fast), call(plain)]);
    expect(a.status).toBe(b.status);
    const [ta, tb] = [await a.text(), await b.text()];
    const code = (text: string) =>
      text === "" ? undefined : (JSON.parse(text) as { code?: string }).code;
    expect(code(ta)).toBe(code(tb));
  });

  test("the server keeps serving after every odd request", async () => {
    const jobId = (await createJob(fast.store, newJobId(), [1], "anonymous")).id;
    const res = await get(fast, jsonQuery(jobId));
    expect(res.status).toBe(200);
  });
});

describe("GetStatus over gRPC (h2c)", () => {
  // With bearer-token auth on, as in production: owners and UNAUTHENTICATED matter here.
  let authed: ApiStack;
  let authedPlain: ApiStack;
  const managers: Http2SessionManager[] = [];
  const grpcJs: grpc.Client[] = [];
  beforeAll(async () => {
    const env = { MAX_REQUEST_BYTES: String(MAX_BYTES), PRESIGN_EXPIRY_SECONDS: "300" };
    authed = await startApiStack(env, { services: svc });
    // The same jobs (one key prefix), served by connect-node alone.
    authedPlain = await startApiStack(
      { ...env, QUEUE_PREFIX: authed.cfg.QUEUE_PREFIX },
      { services: svc, leanTransport: false },
    );
  });
  afterAll(async () => {
    for (const m of managers) m.abort();
    for (const c of grpcJs) c.close();
    await authed?.stop();
    await authedPlain?.stop();
  });

  const grpcFrame = (message: Uint8Array, flags = 0) => envelope(flags, message);
  const statusRequest = (jobId: string) =>
    toBinary(GetStatusRequestSchema, create(GetStatusRequestSchema, { jobId }));

  /** One raw gRPC call: response headers (without date), trailers and body. */
  async function rawCall(stack: ApiStack, body: Buffer, headers: Record<string, string> = {}) {
    const session = http2.connect(stack.server.url);
    try {
      return await new Promise<{
        headers: Record<string, unknown>;
        trailers: Record<string, unknown>;
        body: Buffer;
      }>((ok, fail) => {
        const req = session.request({
          ":method": "POST",
          ":path": `${SERVICE}/GetStatus`,
          "content-type": "application/grpc",
          te: "trailers",
          ...TEST_AUTH_HEADER,
          ...headers,
        });
        let head: Record<string, unknown> = {};
        let trailers: Record<string, unknown> = {};
        const chunks: Buffer[] = [];
        req.on("response", (h) => {
          const { date: _date, ...rest } = h;
          head = rest;
        });
        req.on("trailers", (t) => {
          trailers = { ...t };
        });
        req.on("data", (d: Buffer) => chunks.push(d));
        req.on("error", fail);
        req.on("close", () => ok({ headers: head, trailers, body: Buffer.concat(chunks) }));
        req.end(body);
      });
    } finally {
      session.close();
    }
  }

  function connectGrpc(stack: ApiStack, withToken = true) {
    const m = new Http2SessionManager(stack.server.url);
    managers.push(m);
    return createClient(
      DownloadService,
      createGrpcTransport({
        baseUrl: stack.server.url,
        sessionManager: m,
        interceptors: withToken ? [withTestToken] : [],
      }),
    );
  }

  interface GrpcJsClient extends grpc.Client {
    getStatus(
      req: { jobId: string },
      metadata: grpc.Metadata,
      cb: (err: grpc.ServiceError | null, res?: { job: Record<string, unknown> }) => void,
    ): void;
  }
  let grpcJsCtor: new (addr: string, creds: grpc.ChannelCredentials) => GrpcJsClient;
  beforeAll(async () => {
    const proto = resolve(import.meta.dirname, "../proto/downloads/v1/download_service.proto");
    const def = await protoLoader.load(proto, {
      keepCase: false,
      longs: String,
      enums: String,
      defaults: true,
      oneofs: true,
    });
    grpcJsCtor = (
      grpc.loadPackageDefinition(def) as unknown as {
        downloads: { v1: { DownloadService: typeof grpcJsCtor } };
      }
    ).downloads.v1.DownloadService;
  });
  function grpcJsGetStatus(
    stack: ApiStack,
    jobId: string,
    token: string | undefined = TEST_AUTH_HEADER.authorization,
  ) {
    const client = new grpcJsCtor(
      `127.0.0.1:${stack.server.port}`,
      grpc.credentials.createInsecure(),
    );
    grpcJs.push(client);
    const metadata = new grpc.Metadata();
    if (token !== undefined) metadata.set("authorization", token);
    return new Promise<{ job: Record<string, unknown> }>((ok, fail) =>
      client.getStatus({ jobId }, metadata, (err, res) =>
        err ? fail(err) : ok(res as { job: Record<string, unknown> }),
      ),
    );
  }

  test("grpc-js and connect-node's gRPC client read a running job exactly as from connect-node", async () => {
    const jobId = (await createJob(authed.store, newJobId(), [11, 12, 13], authed.owner)).id;
    await authed.startJob(jobId);
    await authed.progress(jobId, 40, 100);
    const [viaFast, viaPlain] = await Promise.all([
      connectGrpc(authed).getStatus({ jobId }),
      connectGrpc(authedPlain).getStatus({ jobId }),
    ]);
    expect(viaFast.job?.jobId).toBe(jobId);
    expect(viaFast.job?.progress?.percent).toBe(40);
    expect(viaFast).toEqual(viaPlain);
    const [jsFast, jsPlain] = await Promise.all([
      grpcJsGetStatus(authed, jobId),
      grpcJsGetStatus(authedPlain, jobId),
    ]);
    expect(jsFast.job).toMatchObject({ jobId, state: "JOB_STATE_PROCESSING", version: 3 });
    expect(jsFast).toEqual(jsPlain);
  });

  test("every poll sees the job's latest version", async () => {
    const jobId = (await createJob(authed.store, newJobId(), [14], authed.owner)).id;
    const client = connectGrpc(authed);
    const read = async () => {
      const { job } = await client.getStatus({ jobId });
      return [job?.version, job?.state];
    };
    expect(await read()).toEqual([1, JobState.QUEUED]);
    expect(await read()).toEqual([1, JobState.QUEUED]);
    await authed.startJob(jobId);
    expect(await read()).toEqual([2, JobState.PROCESSING]);
    await authed.fail(jobId);
    expect(await read()).toEqual([3, JobState.FAILED]);
  });

  test.each([
    ["an unknown job", async () => newJobId(), true, Code.NotFound],
    [
      "another owner's job",
      async () => (await createJob(authed.store, newJobId(), [1], "someone-else")).id,
      true,
      Code.NotFound,
    ],
    ["a malformed job id", async () => "42", true, Code.InvalidArgument],
    [
      "a call without a token",
      async () => (await createJob(authed.store, newJobId(), [1], authed.owner)).id,
      false,
      Code.Unauthenticated,
    ],
  ])("%s: both clients get the code connect-node gives", async (_what, makeId, withToken, code) => {
    const jobId = await makeId();
    for (const stack of [authed, authedPlain]) {
      const err = await connectGrpc(stack, withToken)
        .getStatus({ jobId })
        .catch((e: unknown) => e);
      expect(err).toBeInstanceOf(ConnectError);
      expect((err as ConnectError).code).toBe(code);
      const jsErr = (await grpcJsGetStatus(
        stack,
        jobId,
        withToken ? undefined : "Bearer wrong",
      ).catch((e: unknown) => e)) as grpc.ServiceError;
      // gRPC and Connect number their codes alike.
      expect(jsErr.code).toBe(code as number);
    }
  });

  test("a large answer is gzip-compressed for a client that accepts it, as connect-node does", async () => {
    const files = Array.from({ length: 200 }, (_, i) => 1000 + i);
    const jobId = (await createJob(authed.store, newJobId(), files, authed.owner)).id;
    const headers = { "grpc-accept-encoding": "identity,deflate,gzip" };
    const [a, b] = await Promise.all([
      rawCall(authed, grpcFrame(statusRequest(jobId)), headers),
      rawCall(authedPlain, grpcFrame(statusRequest(jobId)), headers),
    ]);
    expect(a.headers["grpc-encoding"]).toBe("gzip");
    expect(a.body[0]).toBe(1);
    const job = fromBinary(
      GetStatusResponseSchema,
      new Uint8Array(gunzipSync(a.body.subarray(5))),
    ).job;
    expect(job?.fileIds).toEqual(files);
    expect([a.headers, a.trailers, a.body]).toEqual([b.headers, b.trailers, b.body]);
  });

  const unknown = newJobId();
  test.each([
    ["a call that succeeds", () => grpcFrame(statusRequest(unknown)), {}, "ok"],
    ["bad request bytes", () => grpcFrame(new Uint8Array([0xff, 0xff])), {}, Code.InvalidArgument],
    [
      "a malformed grpc-timeout",
      () => grpcFrame(statusRequest(unknown)),
      { "grpc-timeout": "x" },
      Code.InvalidArgument,
    ],
    [
      "a grpc-timeout long enough",
      () => grpcFrame(statusRequest(unknown)),
      { "grpc-timeout": "10S" },
      Code.NotFound,
    ],
    ["no message", () => Buffer.alloc(0), {}, Code.Unimplemented],
    [
      "two messages",
      () => Buffer.concat([grpcFrame(statusRequest(unknown)), grpcFrame(statusRequest(unknown))]),
      {},
      Code.Unimplemented,
    ],
    [
      "a message flagged compressed",
      () => grpcFrame(statusRequest(unknown), 1),
      {},
      Code.InvalidArgument,
    ],
    [
      "a cut envelope",
      () => grpcFrame(statusRequest(unknown)).subarray(0, 9),
      {},
      Code.InvalidArgument,
    ],
    [
      "an oversized message",
      () => grpcFrame(statusRequest("x".repeat(MAX_BYTES * 2))),
      {},
      Code.ResourceExhausted,
    ],
    [
      "a wrong token",
      () => grpcFrame(statusRequest(unknown)),
      { authorization: "Bearer wrong" },
      Code.Unauthenticated,
    ],
    [
      "a gRPC JSON request",
      () => grpcFrame(Buffer.from(JSON.stringify({ jobId: unknown }))),
      { "content-type": "application/grpc+json" },
      Code.NotFound,
    ],
  ])(
    "raw: %s gets connect-node's headers, trailers and body",
    async (_what, body, headers, code) => {
      const jobId = (await createJob(authed.store, newJobId(), [5, 6], authed.owner)).id;
      const bytes = code === "ok" ? grpcFrame(statusRequest(jobId)) : body();
      const [a, b] = await Promise.all([
        rawCall(authed, bytes, headers),
        rawCall(authedPlain, bytes, headers),
      ]);
      expect(a.trailers["grpc-status"]).toBe(code === "ok" ? "0" : String(code));
      expect([a.headers, a.trailers, a.body]).toEqual([b.headers, b.trailers, b.body]);
    },
  );
});

describe("the RPC log line of a lean call", () => {
  test("is the line connect-node's call gets: procedure, code, owner, HTTP status", async () => {
    const cfg = svc.config({ PORT: "0", HOST: "127.0.0.1" });
    const lines: Record<string, unknown>[] = [];
    const log = pino(
      { level: "info" },
      { write: (line: string) => void lines.push(JSON.parse(line) as Record<string, unknown>) },
    );
    const servers = [
      await startApiServer(cfg, log),
      await startApiServer(cfg, log, { leanTransport: false }),
    ];
    try {
      const rpcLines = () =>
        lines
          .filter((l) => l.msg === "rpc")
          .map(({ time: _t, pid: _p, hostname: _h, ms: _ms, ...rest }) => rest);
      const calls = async (url: string) => {
        const transport = createGrpcTransport({ baseUrl: url, interceptors: [withTestToken] });
        await createClient(DownloadService, transport)
          .getStatus({ jobId: newJobId() })
          .catch(() => undefined);
        await fetch(`${url}${SERVICE}/GetStatus`, {
          method: "POST",
          headers: { "content-type": "application/json", ...TEST_AUTH_HEADER },
          body: JSON.stringify({ jobId: "42" }),
        });
      };
      const seen: unknown[][] = [];
      for (const server of servers) {
        lines.length = 0;
        await calls(server.url);
        await expect.poll(() => rpcLines().length).toBe(2);
        seen.push(rpcLines());
      }
      expect(seen[0]).toEqual([
        expect.objectContaining({
          rpc: `${SERVICE}/GetStatus`,
          http: "2.0",
          code: "not_found",
          owner: "test-owner",
          status: 200,
        }),
        expect.objectContaining({
          rpc: `${SERVICE}/GetStatus`,
          http: "1.1",
          code: "invalid_argument",
          owner: "test-owner",
          status: 400,
        }),
      ]);
      expect(seen[0]).toEqual(seen[1]);
    } finally {
      for (const server of servers) await server.close();
    }
  });
});

describe("Initiate, the first call of every job", () => {
  const initiate = (
    stack: ApiStack,
    body: string | Uint8Array,
    type = "application/json",
    headers: Record<string, string> = {},
  ) =>
    fetch(`${stack.server.url}${SERVICE}/Initiate`, {
      method: "POST",
      headers: { "content-type": type, ...headers },
      body: typeof body === "string" ? body : new Uint8Array(body),
    });
  // connect-node alone over the same jobs (one key prefix), for byte-for-byte comparisons.
  let twin: ApiStack;
  beforeAll(async () => {
    const env = {
      MAX_REQUEST_BYTES: String(MAX_BYTES),
      WATCH_HEARTBEAT_MS: "60000",
      PRESIGN_EXPIRY_SECONDS: "300",
      AUTH_DISABLED: "true",
    };
    twin = await startApiStack(
      { ...env, QUEUE_PREFIX: fast.cfg.QUEUE_PREFIX },
      { services: svc, leanTransport: false },
    );
  });
  afterAll(async () => {
    await twin?.stop();
  });
  // Distinct file sets, so that no call is answered with another's in-flight job.
  let nextFile = 90_000;
  const files = (n = 1) => Array.from({ length: n }, () => nextFile++);

  test("JSON and binary answers have connect-node's shape, and the job is queued for a worker", async () => {
    const viaFast = (await (
      await initiate(fast, JSON.stringify({ fileIds: files(2) }))
    ).json()) as Record<string, any>;
    const viaPlain = (await (
      await initiate(plain, JSON.stringify({ fileIds: files(2) }))
    ).json()) as Record<string, any>;
    expect(viaFast.outcome).toBe("INITIATE_OUTCOME_CREATED");
    expect(Object.keys(viaFast).sort()).toEqual(Object.keys(viaPlain).sort());
    expect(Object.keys(viaFast.job as object).sort()).toEqual(
      Object.keys(viaPlain.job as object).sort(),
    );
    expect(viaFast.job).toMatchObject({
      state: "JOB_STATE_QUEUED",
      version: 1,
      fileIds: [nextFile - 4, nextFile - 3],
    });
    expect(await fast.queue.getJob(viaFast.job.jobId as string)).toBeDefined();

    const request = toBinary(
      InitiateRequestSchema,
      create(InitiateRequestSchema, { fileIds: files(1) }),
    );
    const res = await initiate(fast, request, "application/proto");
    expect(res.headers.get("content-type")).toBe("application/proto");
    const decoded = fromBinary(InitiateResponseSchema, new Uint8Array(await res.arrayBuffer()));
    expect([decoded.outcome, decoded.job?.fileIds]).toEqual([
      InitiateOutcome.CREATED,
      [nextFile - 1],
    ]);
    expect((await fast.store.get(decoded.job?.jobId ?? "")).owner).toBe("anonymous");
  });

  test("the Idempotency-Key header replays the first answer's job, in the very JSON connect-node writes", async () => {
    const body = JSON.stringify({ fileIds: files(1) });
    const headers = { "idempotency-key": `key-${newJobId()}` };
    const first = (await (
      await initiate(fast, body, "application/json", headers)
    ).json()) as Record<string, any>;
    const again = await (await initiate(fast, body, "application/json", headers)).text();
    expect(JSON.parse(again)).toMatchObject({
      outcome: "INITIATE_OUTCOME_REPLAYED",
      job: { jobId: first.job.jobId },
    });
    // The same job replayed by connect-node (both servers share Redis): byte for byte.
    expect(again).toBe(await (await initiate(twin, body, "application/json", headers)).text());
  });

  test("a watched job's messages are the very JSON connect-node writes, in every state", async () => {
    const jobId = (await createJob(fast.store, newJobId(), [3, 1], "anonymous")).id;
    const firstOf = async (stack: ApiStack) => {
      const res = await watchRaw(stack, watchRequest(jobId));
      return frames(res.body)[0]?.data.toString();
    };
    const fail = (id: string) =>
      markFailed(
        fast.store,
        { jobId: id, token: "test-driver", checkLock: false },
        {
          claimed: true,
          error: { code: "not_found", message: "gone", retryable: false, missingFileIds: [3] },
        },
      );
    await fast.startJob(jobId);
    await fast.progress(jobId, 40, 100);
    await fail(jobId);
    const [a, b] = await Promise.all([firstOf(fast), firstOf(twin)]);
    expect(a).toContain('"missingFileIds":[3]');
    expect(a).toBe(b);
  });

  const tooMany = JSON.stringify({ fileIds: Array.from({ length: 200 }, (_, i) => i + 1) });
  test.each([
    ["malformed JSON", (s: ApiStack) => initiate(s, '{"fileIds":')],
    [
      "an unknown field",
      (s: ApiStack) => initiate(s, JSON.stringify({ fileIds: [1], fileIdz: [2] })),
    ],
    ["file ids that are strings of letters", (s: ApiStack) => initiate(s, '{"fileIds":["a"]}')],
    ["no file ids", (s: ApiStack) => initiate(s, "{}")],
    ["a negative file id", (s: ApiStack) => initiate(s, JSON.stringify({ fileIds: [-1] }))],
    ["a repeated file id", (s: ApiStack) => initiate(s, JSON.stringify({ fileIds: [5, 5] }))],
    ["an oversized body", (s: ApiStack) => initiate(s, tooMany)],
    [
      "an unparsable binary body",
      (s: ApiStack) => initiate(s, new Uint8Array([0xff, 0xff]), "application/proto"),
    ],
    ["a wrong content type", (s: ApiStack) => initiate(s, "{}", "text/plain")],
    [
      "a gzip body that is not gzip",
      (s: ApiStack) => initiate(s, "{}", "application/json", { "content-encoding": "gzip" }),
    ],
    [
      "a malformed Idempotency-Key",
      (s: ApiStack) =>
        initiate(s, JSON.stringify({ fileIds: [1] }), "application/json", {
          "idempotency-key": "k".repeat(200),
        }),
    ],
    [
      "a request_id that differs from the Idempotency-Key",
      (s: ApiStack) =>
        initiate(s, JSON.stringify({ fileIds: [1], requestId: "a" }), "application/json", {
          "idempotency-key": "b",
        }),
    ],
    ["fileIds written twice", (s: ApiStack) => initiate(s, '{"fileIds":[1],"fileIds":[2]}')],
    [
      "a file id beyond int32",
      (s: ApiStack) => initiate(s, JSON.stringify({ fileIds: [2 ** 31] })),
    ],
    ["a fractional file id", (s: ApiStack) => initiate(s, JSON.stringify({ fileIds: [1.5] }))],
    ["null file ids", (s: ApiStack) => initiate(s, '{"fileIds":null}')],
    [
      "a callback_url on a server without webhooks",
      (s: ApiStack) =>
        initiate(s, JSON.stringify({ fileIds: [1], callbackUrl: "https://example.com/hook" })),
    ],
    [
      "a malformed connect-timeout-ms",
      (s: ApiStack) =>
        initiate(s, JSON.stringify({ fileIds: [1] }), "application/json", {
          "connect-timeout-ms": "soon",
        }),
    ],
  ])("%s gets the same status and code as from connect-node", async (_what, call) => {
    const [a, b] = await Promise.all([call(fast), call(plain)]);
    expect(a.status).toBe(b.status);
    expect(a.status).toBeGreaterThanOrEqual(400);
    const [ta, tb] = [await a.text(), await b.text()];
    const code = (text: string) =>
      text === "" ? undefined : (JSON.parse(text) as { code?: string }).code;
    expect(code(ta)).toBe(code(tb));
  });

  test("the server keeps serving after every odd request", async () => {
    const res = await initiate(fast, JSON.stringify({ fileIds: files(1) }));
    expect(res.status).toBe(200);
  });
});
