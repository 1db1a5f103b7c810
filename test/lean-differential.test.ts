import http2 from "node:http2";
import { gunzipSync, gzipSync } from "node:zlib";
import {
  type DescMessage,
  fromBinary,
  fromJson,
  type JsonValue,
  toBinary,
  toJsonString,
} from "@bufbuild/protobuf";
import { afterAll, beforeAll, expect, test } from "vitest";
import { createJob } from "../core/job-transitions.js";
import { newJobId } from "../core/jobs.js";
import {
  CancelRequestSchema,
  CancelResponseSchema,
  DeleteJobRequestSchema,
  DeleteJobResponseSchema,
  GetJobStatisticsRequestSchema,
  GetJobStatisticsResponseSchema,
  GetStatusRequestSchema,
  GetStatusResponseSchema,
  InitiateRequestSchema,
  InitiateResponseSchema,
  ListJobHistoryRequestSchema,
  ListJobHistoryResponseSchema,
  ListJobsRequestSchema,
  ListJobsResponseSchema,
  RetryJobRequestSchema,
  RetryJobResponseSchema,
  WatchJobRequestSchema,
  WatchJobResponseSchema,
} from "../gen/downloads/v1/download_service_pb.js";
import { type ApiStack, startApiStack, TEST_OWNER, TEST_TOKEN } from "./helpers/api.js";
import {
  malformedRequest,
  type RawRequest,
  type RawResponse,
  SERVICE,
  seeded,
  send,
} from "./helpers/malformed.js";
import { type Services, startServices, uniquePrefix } from "./helpers/services.js";
import { envelope } from "./helpers/trust.js";

// The two ways in, proven equal: every request goes to a server with the lean transport
// (server/lean/) and to one without it (connect-node alone), both over the same Redis
// keys, and what a client sees must be the same: the status, every response header and
// trailer but the connection's own (date, keep-alive), and the body byte for byte. Where
// an answer cannot repeat itself (a new job's id and times, a presigned URL's signing
// time), the messages are decoded and compared with those values masked.
//
// The corpus: representative calls of the API suites (each RPC, each state, each error)
// over every protocol and encoding (Connect JSON and binary, Connect GET, Connect
// streaming, gRPC, gRPC-Web, HTTP/1.1 and h2c, compressed requests and answers), and a
// seeded sample of the malformed-request corpus of test/fault-malformed.test.ts
// (MALFORMED_SAMPLE, 1,500 by default; the full 10,000 run there against the lean side).

const MALFORMED_SAMPLE = Number(process.env.MALFORMED_SAMPLE ?? 1_500);
const SEED = Number(process.env.MALFORMED_SEED ?? 20_261_202);
const AUTH = { authorization: `Bearer ${TEST_TOKEN}` };

let svc: Services;
let lean: ApiStack;
let plain: ApiStack;
const sessions = new Map<ApiStack, http2.ClientHttp2Session>();

const jobs: Record<"queued" | "running" | "failed" | "completed" | "large", string> = {
  queued: "",
  running: "",
  failed: "",
  completed: "",
  large: "",
};

beforeAll(async () => {
  svc = await startServices();
  // One QUEUE_PREFIX for both: the same jobs are read through both servers.
  const env = { QUEUE_PREFIX: uniquePrefix("diff"), WATCH_HEARTBEAT_MS: "60000" };
  lean = await startApiStack(env, { services: svc });
  plain = await startApiStack(env, { services: svc, leanTransport: false });
  for (const stack of [lean, plain]) {
    const session = http2.connect(stack.server.url);
    session.on("error", () => undefined);
    sessions.set(stack, session);
  }
  const make = async (files: number[]) =>
    (await createJob(lean.store, newJobId(), files, TEST_OWNER)).id;
  jobs.queued = await make([1, 2]);
  jobs.running = await make([3]);
  await lean.startJob(jobs.running);
  await lean.progress(jobs.running, 40, 100);
  jobs.failed = await make([4]);
  await lean.fail(jobs.failed);
  jobs.completed = await make([5]);
  await lean.startJob(jobs.completed);
  await lean.complete(jobs.completed, Buffer.from("zip bytes"));
  // Over 1 KB of JSON: answers are compressed for callers that accept it.
  jobs.large = await make(Array.from({ length: 100 }, (_, i) => i + 1));
}, 60_000);

afterAll(async () => {
  for (const s of sessions.values()) s.close();
  await lean?.stop();
  await plain?.stop();
  await svc?.stop();
});

interface Case extends RawRequest {
  /** The answer carries values that cannot repeat (new ids, signing times): compare decoded and masked. */
  varies?: boolean;
  output?: DescMessage;
}

type Json = Record<string, JsonValue>;

/** One call over every protocol and encoding that can carry it. */
function overEveryProtocol(
  rpc:
    | "Initiate"
    | "GetStatus"
    | "Cancel"
    | "WatchJob"
    | "ListJobHistory"
    | "GetJobStatistics"
    | "ListJobs"
    | "DeleteJob"
    | "RetryJob",
  msg: Json,
  extra: { varies?: boolean; auth?: Record<string, string> } = {},
): Case[] {
  const schemas = {
    Initiate: [InitiateRequestSchema, InitiateResponseSchema],
    GetStatus: [GetStatusRequestSchema, GetStatusResponseSchema],
    Cancel: [CancelRequestSchema, CancelResponseSchema],
    WatchJob: [WatchJobRequestSchema, WatchJobResponseSchema],
    ListJobHistory: [ListJobHistoryRequestSchema, ListJobHistoryResponseSchema],
    GetJobStatistics: [GetJobStatisticsRequestSchema, GetJobStatisticsResponseSchema],
    ListJobs: [ListJobsRequestSchema, ListJobsResponseSchema],
    DeleteJob: [DeleteJobRequestSchema, DeleteJobResponseSchema],
    RetryJob: [RetryJobRequestSchema, RetryJobResponseSchema],
  } as const;
  const [input, output] = schemas[rpc];
  const json = toJsonString(input, fromJson(input, msg));
  const binary = Buffer.from(toBinary(input, fromJson(input, msg)));
  const path = `${SERVICE}/${rpc}`;
  const auth = extra.auth ?? AUTH;
  const base = { method: "POST", path, varies: extra.varies ?? false, output };
  const cases: Case[] = [];
  const add = (kind: string, via: "fetch" | "h2", headers: Record<string, string>, body?: Buffer) =>
    cases.push({
      ...base,
      kind: `${rpc} ${kind}`,
      via,
      headers: { ...auth, ...headers },
      ...(body ? { body } : {}),
    });
  if (rpc !== "WatchJob") {
    add("connect json h1", "fetch", { "content-type": "application/json" }, Buffer.from(json));
    add("connect proto h1", "fetch", { "content-type": "application/proto" }, binary);
    add("connect json h2", "h2", { "content-type": "application/json" }, Buffer.from(json));
    add(
      "connect proto h2 gzip answer",
      "h2",
      { "content-type": "application/proto", "accept-encoding": "gzip" },
      binary,
    );
    add(
      "connect json gzip request",
      "fetch",
      { "content-type": "application/json", "content-encoding": "gzip" },
      gzipSync(json),
    );
    add(
      "connect json timeout",
      "fetch",
      { "content-type": "application/json", "connect-timeout-ms": "10000" },
      Buffer.from(json),
    );
    if (rpc === "GetStatus") {
      const get = (kind: string, via: "fetch" | "h2", query: string) =>
        cases.push({
          ...base,
          method: "GET",
          path: `${path}?${query}`,
          kind: `${rpc} ${kind}`,
          via,
          headers: { ...auth },
        });
      get("get json h1", "fetch", `encoding=json&message=${encodeURIComponent(json)}`);
      get(
        "get proto base64 h1",
        "fetch",
        `encoding=proto&base64=1&message=${binary.toString("base64url")}`,
      );
      get("get json h2", "h2", `connect=v1&encoding=json&message=${encodeURIComponent(json)}`);
    }
  } else {
    for (const [via, h] of [
      ["fetch", "h1"],
      ["h2", "h2"],
    ] as const) {
      add(
        `connect+json ${h}`,
        via,
        { "content-type": "application/connect+json" },
        envelope(0, json),
      );
      add(
        `connect+proto ${h}`,
        via,
        { "content-type": "application/connect+proto" },
        envelope(0, binary),
      );
    }
    add(
      "connect+json gzip request",
      "fetch",
      { "content-type": "application/connect+json", "connect-content-encoding": "gzip" },
      envelope(1, gzipSync(json)),
    );
    add(
      "connect+proto gzip answers",
      "h2",
      { "content-type": "application/connect+proto", "connect-accept-encoding": "gzip" },
      envelope(0, binary),
    );
  }
  // gRPC and gRPC-Web carry unary and streaming calls alike.
  add("grpc h2", "h2", { "content-type": "application/grpc", te: "trailers" }, envelope(0, binary));
  add(
    "grpc h2 gzip",
    "h2",
    {
      "content-type": "application/grpc+proto",
      te: "trailers",
      "grpc-encoding": "gzip",
      "grpc-accept-encoding": "gzip",
    },
    envelope(1, gzipSync(binary)),
  );
  add(
    "grpc-web proto h1",
    "fetch",
    { "content-type": "application/grpc-web+proto", "x-grpc-web": "1" },
    envelope(0, binary),
  );
  add(
    "grpc-web json h1",
    "fetch",
    { "content-type": "application/grpc-web+json", "x-grpc-web": "1" },
    envelope(0, json),
  );
  return cases;
}

function corpus(): Case[] {
  const unknown = newJobId();
  const cases: Case[] = [];
  for (const state of ["queued", "running", "failed", "large"] as const)
    cases.push(...overEveryProtocol("GetStatus", { jobId: jobs[state] }));
  // A completed job's download URL is presigned on each read: its signing time varies.
  cases.push(...overEveryProtocol("GetStatus", { jobId: jobs.completed }, { varies: true }));
  cases.push(...overEveryProtocol("GetStatus", { jobId: unknown }));
  cases.push(...overEveryProtocol("GetStatus", { jobId: "not a job id" }));
  cases.push(...overEveryProtocol("GetStatus", { jobId: jobs.queued }, { auth: {} }));
  cases.push(
    ...overEveryProtocol(
      "GetStatus",
      { jobId: jobs.queued },
      { auth: { authorization: "Bearer nope" } },
    ),
  );
  cases.push(...overEveryProtocol("Cancel", { jobId: jobs.failed }));
  cases.push(...overEveryProtocol("Cancel", { jobId: unknown }));
  // The caller's jobs, a page at a time (the completed job's URL is presigned: varies),
  // with a filter, and refusals; DeleteJob and RetryJob on jobs whose state forbids them.
  cases.push(...overEveryProtocol("ListJobs", { pageSize: 2 }, { varies: true }));
  cases.push(
    ...overEveryProtocol("ListJobs", { states: ["JOB_STATE_FAILED"], labels: { a: "b" } }),
  );
  cases.push(...overEveryProtocol("ListJobs", { pageToken: "x.y" }));
  cases.push(...overEveryProtocol("ListJobs", { labels: { "Bad Key": "x" } }));
  cases.push(...overEveryProtocol("DeleteJob", { jobId: jobs.queued }));
  cases.push(...overEveryProtocol("DeleteJob", { jobId: unknown }));
  cases.push(...overEveryProtocol("RetryJob", { jobId: jobs.running }));
  cases.push(...overEveryProtocol("RetryJob", { jobId: "not a job id" }));
  // Neither server has history: FAILED_PRECONDITION, after the request's own checks.
  cases.push(...overEveryProtocol("ListJobHistory", { pageSize: 5 }));
  cases.push(...overEveryProtocol("ListJobHistory", { pageSize: -1 }, { auth: {} }));
  const day = { startTime: "2026-12-01T00:00:00Z", endTime: "2026-12-02T00:00:00Z" };
  cases.push(
    ...overEveryProtocol("GetJobStatistics", { interval: "STATISTICS_INTERVAL_DAILY", ...day }),
  );
  cases.push(...overEveryProtocol("GetJobStatistics", day));
  cases.push(...overEveryProtocol("Initiate", { fileIds: [] }));
  cases.push(...overEveryProtocol("Initiate", { fileIds: [1, 1] }));
  cases.push(...overEveryProtocol("Initiate", { fileIds: [1, 2] }, { varies: true }));
  cases.push(...overEveryProtocol("WatchJob", { jobId: jobs.failed }));
  cases.push(...overEveryProtocol("WatchJob", { jobId: jobs.completed }, { varies: true }));
  cases.push(...overEveryProtocol("WatchJob", { jobId: unknown }));
  cases.push(...overEveryProtocol("WatchJob", { jobId: jobs.failed }, { auth: {} }));
  cases.push(...overEveryProtocol("WatchJob", { jobId: "../x", afterVersion: 3 }));
  return cases;
}

/** Headers of the connection, not of the answer. */
const CONNECTION_HEADERS = new Set(["date", "connection", "keep-alive", "transfer-encoding"]);

function shown(res: RawResponse, masked: boolean): Record<string, string> {
  const out: Record<string, string> = { status: String(res.status) };
  for (const [name, value] of [
    ...Object.entries(res.headers),
    ...Object.entries(res.trailers).map(([n, v]) => [`trailer ${n}`, v] as const),
  ]) {
    if (CONNECTION_HEADERS.has(name) || (masked && name === "content-length")) continue;
    out[name] = value;
  }
  return Object.fromEntries(Object.entries(out).sort(([x], [y]) => (x < y ? -1 : 1)));
}

const UUID = /[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/g;
const TIME = /"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z"/g;
const SIGNED = /X-Amz-(?:Date|Signature|Expires)=[^&"]*/g;
// A queued job's place moves as the calls of both sides add jobs (core/forecast.ts).
const ESTIMATE = /"estimate":\{[^{}]*\}/g;

/** A body's messages as masked JSON text: envelopes split, binary decoded. */
function decoded(res: RawResponse, schema: DescMessage): string {
  const type = res.headers["content-type"] ?? "";
  const message = (data: Uint8Array) =>
    type.includes("proto") || type === "application/grpc"
      ? toJsonString(schema, fromBinary(schema, data))
      : Buffer.from(data).toString();
  const parts: string[] = [];
  if (/connect\+|grpc/.test(type)) {
    for (let at = 0; at + 5 <= res.body.length; ) {
      const flags = res.body[at] as number;
      const length = res.body.readUInt32BE(at + 1);
      const data = res.body.subarray(at + 5, at + 5 + length);
      const plain = (flags & 1) === 1 ? gunzipSync(data) : data;
      parts.push((flags & ~1) === 0 ? message(plain) : `[${flags}] ${plain.toString()}`);
      at += 5 + length;
    }
  } else {
    // A unary answer over 1 KB may come compressed (Content-Encoding, not an envelope);
    // fetch has inflated it already, a raw HTTP/2 read has not.
    const gzipped = res.body[0] === 0x1f && res.body[1] === 0x8b;
    const body =
      res.headers["content-encoding"] === "gzip" && gzipped ? gunzipSync(res.body) : res.body;
    parts.push(res.status === 200 ? message(body) : body.toString());
  }
  return parts
    .join("\n")
    .replace(ESTIMATE, '"estimate":<estimate>')
    .replace(UUID, "<id>")
    .replace(TIME, "<time>")
    .replace(SIGNED, "<signed>");
}

interface Difference {
  kind: string;
  request: string;
  lean: unknown;
  connectNode: unknown;
}

async function compare(req: Case, out: Difference[]): Promise<void> {
  const [a, b] = await Promise.all(
    [lean, plain].map((stack) =>
      send(stack.server.url, sessions.get(stack) as http2.ClientHttp2Session, req),
    ),
  );
  if (a === undefined || b === undefined) return;
  const masked = req.varies === true;
  const request = `${req.via} ${req.method} ${req.path.slice(0, 120)} ${JSON.stringify(req.headers).slice(0, 200)}`;
  const [ha, hb] = [shown(a, masked), shown(b, masked)];
  if (JSON.stringify(ha) !== JSON.stringify(hb))
    out.push({ kind: `${req.kind}: headers`, request, lean: ha, connectNode: hb });
  const [ba, bb] =
    masked && req.output !== undefined
      ? [decoded(a, req.output), decoded(b, req.output)]
      : [a.body.toString("latin1"), b.body.toString("latin1")];
  if (ba !== bb)
    out.push({
      kind: `${req.kind}: body`,
      request,
      lean: ba.slice(0, 600),
      connectNode: bb.slice(0, 600),
    });
}

test("every API call over every protocol gets the same answer with and without the lean transport", async () => {
  const cases = corpus();
  const differences: Difference[] = [];
  for (const c of cases) await compare(c, differences);
  console.log(
    `lean differential: ${cases.length} calls over ${new Set(cases.map((c) => c.kind.split(" ").slice(1).join(" "))).size} protocol variants, ${differences.length} differences`,
  );
  expect(differences.slice(0, 5)).toEqual([]);
}, 120_000);

test("a seeded sample of the malformed-request corpus gets the same answers from both", async () => {
  const rand = seeded(SEED);
  const differences: Difference[] = [];
  const requests = Array.from({ length: MALFORMED_SAMPLE }, () =>
    malformedRequest(rand, TEST_TOKEN),
  );
  let next = 0;
  await Promise.all(
    Array.from({ length: 8 }, async () => {
      while (next < requests.length) {
        const req = requests[next++] as RawRequest;
        await compare(req, differences);
      }
    }),
  );
  const kinds = new Map<string, number>();
  for (const d of differences) kinds.set(d.kind, (kinds.get(d.kind) ?? 0) + 1);
  console.log(
    `lean differential (seed ${SEED}): ${requests.length} malformed requests, ${differences.length} differences ${JSON.stringify(Object.fromEntries(kinds))}`,
  );
  expect(differences.slice(0, 5)).toEqual([]);
}, 240_000);
