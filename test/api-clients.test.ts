import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import { resolve } from "node:path";
import { promisify } from "node:util";
import { timestampMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient, type Transport } from "@connectrpc/connect";
import {
  createConnectTransport,
  createGrpcTransport,
  createGrpcWebTransport,
  Http2SessionManager,
} from "@connectrpc/connect-node";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { createJob } from "../core/job-transitions.js";
import { newJobId } from "../core/jobs.js";
import { DownloadService, JobState } from "../gen/downloads/v1/download_service_pb.js";
import {
  type ApiStack,
  startApiStack,
  TEST_AUTH_HEADER,
  TEST_TOKEN,
  withTestToken,
} from "./helpers/api.js";

// Every kind of client the README promises, against one real server on one port:
// the generated Connect client (HTTP/1.1 and h2c), gRPC over h2c, gRPC-Web over
// HTTP/1.1, @grpc/grpc-js (a client nobody here wrote), plain fetch like curl,
// Connect GET, and buf curl from the npm package. Each sends the test owner's bearer
// token the way that client kind sends headers.

const run = promisify(execFile);
const ROOT = resolve(import.meta.dirname, "..");
const BUF = resolve(ROOT, "node_modules/.bin/buf");
const PROTO = resolve(ROOT, "proto/downloads/v1/download_service.proto");

let st: ApiStack;
const sessions: Http2SessionManager[] = [];

beforeAll(async () => {
  st = await startApiStack({ WATCH_HEARTBEAT_MS: "5000", PRESIGN_EXPIRY_SECONDS: "120" });
});
afterAll(async () => {
  for (const s of sessions) s.abort();
  await st?.stop();
});

function h2(url: string): Http2SessionManager {
  const m = new Http2SessionManager(url);
  sessions.push(m);
  return m;
}

const transports: [string, () => Transport][] = [
  [
    "Connect JSON over HTTP/1.1",
    () =>
      createConnectTransport({
        baseUrl: st.server.url,
        httpVersion: "1.1",
        interceptors: [withTestToken],
      }),
  ],
  [
    "Connect binary over h2c",
    () =>
      createConnectTransport({
        baseUrl: st.server.url,
        httpVersion: "2",
        useBinaryFormat: true,
        sessionManager: h2(st.server.url),
        interceptors: [withTestToken],
      }),
  ],
  [
    "gRPC over h2c",
    () =>
      createGrpcTransport({
        baseUrl: st.server.url,
        sessionManager: h2(st.server.url),
        interceptors: [withTestToken],
      }),
  ],
  [
    "gRPC-Web over HTTP/1.1",
    () =>
      createGrpcWebTransport({
        baseUrl: st.server.url,
        httpVersion: "1.1",
        interceptors: [withTestToken],
      }),
  ],
];

describe.each(transports)("generated client, %s", (_name, makeTransport) => {
  test("initiates, reads, watches and cancels a job, and gets NOT_FOUND for an unknown one", async () => {
    const client = createClient(DownloadService, makeTransport());
    const { job } = await client.initiate({ fileIds: [70001, 70002] });
    expect(job?.state).toBe(JobState.QUEUED);
    expect(job?.fileIds).toEqual([70001, 70002]);
    expect(job?.files.map((f) => f.fileId)).toEqual([70001, 70002]);
    const jobId = job?.jobId ?? "";

    const status = await client.getStatus({ jobId });
    expect(status.job).toMatchObject({ jobId, state: JobState.QUEUED, version: 1 });

    // The first message of a watch is the snapshot.
    for await (const msg of client.watchJob({ jobId })) {
      expect(msg.event.case).toBe("job");
      expect(msg.event.value).toMatchObject({ jobId, state: JobState.QUEUED, version: 1 });
      break;
    }

    const cancelled = await client.cancel({ jobId });
    expect(cancelled.job?.state).toBe(JobState.CANCELLED);

    const err = await client.getStatus({ jobId: newJobId() }).catch((e: unknown) => e);
    expect(ConnectError.from(err).code).toBe(Code.NotFound);
  });
});

describe("a completed job", () => {
  let jobId: string;
  let zip: Buffer;

  beforeAll(async () => {
    const client = createClient(
      DownloadService,
      createConnectTransport({
        baseUrl: st.server.url,
        httpVersion: "1.1",
        interceptors: [withTestToken],
      }),
    );
    jobId = (await client.initiate({ fileIds: [7, 8] })).job?.jobId ?? "";
    zip = Buffer.from(`PK fake zip for ${jobId} ${"x".repeat(5000)}`);
    await st.startJob(jobId);
    await st.complete(jobId, zip, "photos-2026.zip");
  });

  test("GetStatus gives a download_url that fetches the exact bytes as a .zip attachment", async () => {
    const client = createClient(
      DownloadService,
      createConnectTransport({
        baseUrl: st.server.url,
        httpVersion: "1.1",
        interceptors: [withTestToken],
      }),
    );
    const before = Date.now();
    const { job } = await client.getStatus({ jobId });
    expect(job?.state).toBe(JobState.COMPLETED);
    expect(job?.progress?.percent).toBe(100);
    const result = job?.result;
    expect(result?.sizeBytes).toBe(BigInt(zip.length));
    expect(result?.sha256).toBe(createHash("sha256").update(zip).digest("hex"));
    expect(result?.fileName).toBe("photos-2026.zip");
    // expire_time is set, in the future, and no later than the configured expiry.
    const expires = timestampMs(result?.expireTime ?? ({ seconds: 0n, nanos: 0 } as never));
    expect(expires).toBeGreaterThan(before);
    expect(expires).toBeLessThanOrEqual(Date.now() + 120_000 + 1000);

    const res = await fetch(result?.downloadUrl ?? "");
    expect(res.status).toBe(200);
    expect(Buffer.from(await res.arrayBuffer()).equals(zip)).toBe(true);
    const disposition = res.headers.get("content-disposition") ?? "";
    expect(disposition).toMatch(/^attachment;/);
    expect(disposition).toMatch(/filename="[^"]+\.zip"/);
  });

  test("the download URL is presigned afresh on every read", async () => {
    const client = createClient(
      DownloadService,
      createConnectTransport({
        baseUrl: st.server.url,
        httpVersion: "1.1",
        interceptors: [withTestToken],
      }),
    );
    const first = (await client.getStatus({ jobId })).job?.result;
    // SigV4 dates have one-second resolution: a later read must carry a later expiry.
    await expect
      .poll(async () => (await client.getStatus({ jobId })).job?.result?.expireTime?.seconds ?? 0n)
      .toBeGreaterThan(first?.expireTime?.seconds ?? 0n);
  });

  test("a watch of a completed job sends it once and ends", async () => {
    const client = createClient(
      DownloadService,
      createConnectTransport({
        baseUrl: st.server.url,
        httpVersion: "1.1",
        interceptors: [withTestToken],
      }),
    );
    const got = [];
    for await (const msg of client.watchJob({ jobId })) got.push(msg);
    expect(got).toHaveLength(1);
    expect(got[0]?.event.case).toBe("job");
    const job = got[0]?.event.case === "job" ? got[0].event.value : undefined;
    expect(job?.state).toBe(JobState.COMPLETED);
    expect(job?.result?.downloadUrl).toMatch(/^http:\/\/127\.0\.0\.1:\d+\//);
  });
});

describe("plain HTTP clients", () => {
  const path = "/downloads.v1.DownloadService";

  test("curl-style JSON POST initiates and polls a job; int64 fields are JSON strings", async () => {
    const post = (method: string, body: unknown) =>
      fetch(`${st.server.url}${path}/${method}`, {
        method: "POST",
        headers: { "Content-Type": "application/json", ...TEST_AUTH_HEADER },
        body: JSON.stringify(body),
      });
    const created = await post("Initiate", { fileIds: [3, 4] });
    expect(created.status).toBe(200);
    const { job } = (await created.json()) as { job: { jobId: string; state: string } };
    expect(job.state).toBe("JOB_STATE_QUEUED");

    await st.startJob(job.jobId);
    await st.progress(job.jobId, 1234, 5000);
    const polled = await post("GetStatus", { jobId: job.jobId });
    expect(polled.status).toBe(200);
    const body = (await polled.json()) as {
      job: {
        jobId: string;
        state: string;
        progress: { percent: number; bytesDone: string; bytesTotal: string };
      };
    };
    expect(body.job.jobId).toBe(job.jobId);
    expect(body.job.state).toBe("JOB_STATE_PROCESSING");
    expect(body.job.progress).toMatchObject({ percent: 24, bytesDone: "1234", bytesTotal: "5000" });
  });

  test("Connect GET serves GetStatus, and only the side-effect-free RPC", async () => {
    const jobId = (await createJob(st.store, newJobId(), [11], st.owner)).id;
    const message = encodeURIComponent(JSON.stringify({ jobId }));
    const res = await fetch(`${st.server.url}${path}/GetStatus?encoding=json&message=${message}`, {
      headers: TEST_AUTH_HEADER,
    });
    expect(res.status).toBe(200);
    expect(((await res.json()) as { job: { jobId: string } }).job.jobId).toBe(jobId);

    const initiate = await fetch(
      `${st.server.url}${path}/Initiate?encoding=json&message=${encodeURIComponent(JSON.stringify({ fileIds: [1] }))}`,
      { headers: TEST_AUTH_HEADER },
    );
    expect(initiate.status).toBe(405);
  });
});

describe("buf curl (from the npm package, schema from proto/)", () => {
  const call = (protocol: string[], method: string, body: unknown) =>
    run(
      BUF,
      [
        "curl",
        "--schema",
        "proto",
        ...protocol,
        "-H",
        `Authorization: Bearer ${TEST_TOKEN}`,
        "--data",
        JSON.stringify(body),
        `${st.server.url}/downloads.v1.DownloadService/${method}`,
      ],
      { cwd: ROOT, timeout: 30_000 },
    );

  test.each([
    ["connect", ["--protocol", "connect"]],
    ["grpc over h2c", ["--protocol", "grpc", "--http2-prior-knowledge"]],
  ])("reads a job with --protocol %s", async (_name, protocol) => {
    const jobId = (await createJob(st.store, newJobId(), [5, 6], st.owner)).id;
    const { stdout } = await call(protocol, "GetStatus", { jobId });
    const out = JSON.parse(stdout) as { job: { jobId: string; state: string; fileIds: number[] } };
    expect(out.job).toMatchObject({ jobId, state: "JOB_STATE_QUEUED", fileIds: [5, 6] });
  });

  test("reports NOT_FOUND for an unknown job", async () => {
    const err = (await call(["--protocol", "connect"], "GetStatus", { jobId: newJobId() }).catch(
      (e: unknown) => e,
    )) as { code?: number; stderr?: string };
    expect(err.code).not.toBe(0);
    expect(err.stderr).toMatch(/not_found/);
  });
});

describe("@grpc/grpc-js with @grpc/proto-loader", () => {
  interface GrpcJob {
    jobId: string;
    state: string;
    version: number;
    result?: { downloadUrl: string } | null;
  }
  type Unary<Req, Res> = (
    req: Req,
    metadata: grpc.Metadata,
    cb: (err: grpc.ServiceError | null, res?: Res) => void,
  ) => void;
  interface GrpcClient extends grpc.Client {
    initiate: Unary<{ fileIds: number[] }, { job: GrpcJob }>;
    getStatus: Unary<{ jobId: string }, { job: GrpcJob }>;
    watchJob(
      req: { jobId: string; afterVersion?: number },
      metadata: grpc.Metadata,
    ): grpc.ClientReadableStream<{
      job?: GrpcJob | null;
      heartbeat?: { version: number } | null;
      event?: string;
    }>;
  }

  let client: GrpcClient;
  beforeAll(async () => {
    const def = await protoLoader.load(PROTO, {
      keepCase: false,
      longs: String,
      enums: String,
      defaults: true,
      oneofs: true,
    });
    const pkg = grpc.loadPackageDefinition(def) as unknown as {
      downloads: {
        v1: { DownloadService: new (addr: string, creds: grpc.ChannelCredentials) => GrpcClient };
      };
    };
    client = new pkg.downloads.v1.DownloadService(
      `127.0.0.1:${st.server.port}`,
      grpc.credentials.createInsecure(),
    );
  });
  afterAll(() => client?.close());

  // grpc-js sends metadata as HTTP/2 headers: the same `authorization` header.
  const metadata = () => {
    const m = new grpc.Metadata();
    m.set("authorization", TEST_AUTH_HEADER.authorization);
    return m;
  };
  const unary = <Req, Res>(fn: Unary<Req, Res>, req: Req) =>
    new Promise<Res>((ok, fail) =>
      fn.call(client, req, metadata(), (err, res) => (err ? fail(err) : ok(res as Res))),
    );

  test("unary calls work and errors carry gRPC status codes", async () => {
    const { job } = await unary(client.initiate, { fileIds: [21, 22] });
    expect(job.state).toBe("JOB_STATE_QUEUED");
    const polled = await unary(client.getStatus, { jobId: job.jobId });
    expect(polled.job.jobId).toBe(job.jobId);

    const notFound = (await unary(client.getStatus, { jobId: newJobId() }).catch(
      (e: unknown) => e,
    )) as grpc.ServiceError;
    expect(notFound.code).toBe(grpc.status.NOT_FOUND);
    const invalid = (await unary(client.initiate, { fileIds: [] }).catch(
      (e: unknown) => e,
    )) as grpc.ServiceError;
    expect(invalid.code).toBe(grpc.status.INVALID_ARGUMENT);
  });

  test("WatchJob streams the snapshot, each change, and ends with OK after the terminal state", async () => {
    const { job } = await unary(client.initiate, { fileIds: [23] });
    const stream = client.watchJob({ jobId: job.jobId }, metadata());
    const seen: GrpcJob[] = [];
    const ended = new Promise<grpc.StatusObject>((ok) => stream.on("status", ok));
    stream.on("data", (msg) => {
      if (msg.job) seen.push(msg.job);
    });
    await expect.poll(() => seen.length).toBe(1);
    await st.startJob(job.jobId);
    await expect.poll(() => seen.length).toBe(2);
    await st.complete(job.jobId, Buffer.from("zip"));
    const status = await ended;
    expect(status.code).toBe(grpc.status.OK);
    expect(seen.map((j) => j.state)).toEqual([
      "JOB_STATE_QUEUED",
      "JOB_STATE_PROCESSING",
      "JOB_STATE_COMPLETED",
    ]);
    expect(seen.map((j) => j.version)).toEqual([1, 2, 3]);
    expect(seen[2]?.result?.downloadUrl).toMatch(/^http/);
  });
});
