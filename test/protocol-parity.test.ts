import { execFile } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import http2 from "node:http2";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { brotliCompressSync, gzipSync } from "node:zlib";
import { Code, createClient, type Transport } from "@connectrpc/connect";
import {
  compressionGzip,
  createConnectTransport,
  createGrpcTransport,
  createGrpcWebTransport,
} from "@connectrpc/connect-node";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { createJob } from "../core/job-transitions.js";
import { newJobId } from "../core/jobs.js";
import { DownloadService, JobState } from "../gen/downloads/v1/download_service_pb.js";
import {
  type ApiStack,
  startApiStack,
  TEST_OWNER,
  TEST_TOKEN,
  withTestToken,
} from "./helpers/api.js";
import { type RawResponse, SERVICE, send } from "./helpers/malformed.js";
import { metricValue, parseMetrics } from "./helpers/prometheus.js";
import { type Services, startServices, uniquePrefix } from "./helpers/services.js";
import { envelope } from "./helpers/trust.js";

// What real clients found, each on both ways in (lean transport and connect-node alone):
// early answers over h2c that Debian's curl could not read, gzip-compressed Connect
// streaming requests refused, truncated compressed bodies answered as server faults, and
// client mistakes counted as internal errors in /metrics.

let svc: Services;
let lean: ApiStack;
let plain: ApiStack;
let failedJob: string;
const scratch = mkdtempSync(join(tmpdir(), "parity-"));
const AUTH = { authorization: `Bearer ${TEST_TOKEN}` };

beforeAll(async () => {
  svc = await startServices();
  // Room for the 100 KB bodies below.
  const env = { QUEUE_PREFIX: uniquePrefix("parity"), MAX_REQUEST_BYTES: "262144" };
  lean = await startApiStack(env, { services: svc });
  plain = await startApiStack(env, { services: svc, leanTransport: false });
  failedJob = (await createJob(lean.store, newJobId(), [1], TEST_OWNER)).id;
  await lean.fail(failedJob);
}, 60_000);

afterAll(async () => {
  rmSync(scratch, { recursive: true, force: true });
  await lean?.stop();
  await plain?.stop();
  await svc?.stop();
});

function curl(args: string[]): Promise<{ exit: number; out: string; err: string }> {
  return new Promise((ok) => {
    execFile("curl", args, { timeout: 20_000 }, (error, stdout, stderr) => {
      const exit = error === null ? 0 : typeof error.code === "number" ? error.code : -1;
      ok({ exit, out: stdout, err: stderr });
    });
  });
}

describe("early answers over h2c reach Debian's curl (--http2-prior-knowledge) intact", () => {
  // Bodies larger than HTTP/2's initial 64 KB window, so that curl is still sending when
  // the headers have been judged (the case it fails on), and well-formed, so that the
  // token is what is wrong.
  const jobBody = JSON.stringify({ jobId: "x".repeat(100_000) });
  const initiateBody = JSON.stringify({ fileIds: [1], requestId: "r".repeat(100_000) });
  const cases = [
    ["a bad token", "GetStatus", "application/json", "Bearer wrong", "401"],
    ["a bad token", "Initiate", "application/json", "Bearer wrong", "401"],
    ["a bad token", "Cancel", "application/json", "Bearer wrong", "401"],
    ["an unknown method", "Nope", "application/json", AUTH.authorization, "404"],
    ["a wrong content type", "GetStatus", "text/plain", AUTH.authorization, "415"],
    ["a wrong content type", "Initiate", "text/plain", AUTH.authorization, "415"],
    ["a wrong content type", "WatchJob", "application/json", AUTH.authorization, "415"],
  ] as const;
  test.each(cases)("%s on %s: 20 of 20 answers read", async (_what, rpc, type, auth, status) => {
    for (const stack of [lean]) {
      const results = await Promise.all(
        Array.from({ length: 20 }, () =>
          curl([
            "-sS",
            "--http2-prior-knowledge",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            `content-type: ${type}`,
            "-H",
            `authorization: ${auth}`,
            "--data-binary",
            rpc === "Initiate" ? initiateBody : jobBody,
            `${stack.server.url}${SERVICE}/${rpc}`,
          ]),
        ),
      );
      const seen = results.map((r) =>
        r.exit === 0 ? r.out : `curl exit ${r.exit}: ${r.err.trim()}`,
      );
      expect(seen).toEqual(Array(20).fill(status));
    }
  });

  test("a bad token on WatchJob: the stream's error arrives, 20 of 20", async () => {
    const file = join(scratch, "watch.bin");
    writeFileSync(file, envelope(0, JSON.stringify({ jobId: "x".repeat(100_000) })));
    const results = await Promise.all(
      Array.from({ length: 20 }, () =>
        curl([
          "-sS",
          "--http2-prior-knowledge",
          "-H",
          "content-type: application/connect+json",
          "-H",
          "authorization: Bearer wrong",
          "--data-binary",
          `@${file}`,
          `${lean.server.url}${SERVICE}/WatchJob`,
        ]),
      ),
    );
    for (const r of results) {
      expect(r.exit, r.err).toBe(0);
      expect(r.out).toContain('"code":"unauthenticated"');
    }
  });
});

describe("a gzip-compressed request is served on every protocol", () => {
  const transports = (url: string): [string, Transport][] => {
    const common = {
      baseUrl: url,
      sendCompression: compressionGzip,
      compressMinBytes: 1,
      interceptors: [withTestToken],
    };
    return [
      ["Connect JSON, HTTP/1.1", createConnectTransport({ ...common, httpVersion: "1.1" })],
      [
        "Connect binary, h2c",
        createConnectTransport({ ...common, httpVersion: "2", useBinaryFormat: true }),
      ],
      ["gRPC, h2c", createGrpcTransport({ ...common })],
      ["gRPC-Web, HTTP/1.1", createGrpcWebTransport({ ...common, httpVersion: "1.1" })],
    ];
  };
  test("WatchJob (a streaming request) and GetStatus, both ways in", async () => {
    for (const stack of [lean, plain]) {
      for (const [name, transport] of transports(stack.server.url)) {
        const client = createClient(DownloadService, transport);
        const states: JobState[] = [];
        for await (const res of client.watchJob({ jobId: failedJob })) {
          if (res.event.case === "job") states.push(res.event.value.state);
        }
        expect([name, states]).toEqual([name, [JobState.FAILED]]);
        const { job } = await client.getStatus({ jobId: failedJob });
        expect([name, job?.state]).toEqual([name, JobState.FAILED]);
      }
    }
  });
});

describe("a truncated or corrupt compressed body is the caller's mistake: invalid_argument, never internal", () => {
  const message = JSON.stringify({ jobId: newJobId(), pad: "y".repeat(500) });
  const packs = {
    "truncated gzip": gzipSync(message).subarray(0, 40),
    "corrupt gzip": Buffer.concat([gzipSync(message).subarray(0, 10), Buffer.alloc(40, 0xab)]),
    "truncated brotli": brotliCompressSync(message).subarray(0, 20),
    "corrupt brotli": Buffer.alloc(40, 0xcd),
  };
  const encodingOf = (what: string) => (what.endsWith("gzip") ? "gzip" : "br");
  const grpcCode = (res: RawResponse) =>
    res.trailers["grpc-status"] ??
    res.headers["grpc-status"] ??
    /grpc-status: (\d+)/.exec(res.body.toString("latin1"))?.[1];

  test.each(Object.keys(packs))("%s, over every protocol, both ways in", async (what) => {
    const data = packs[what as keyof typeof packs];
    const encoding = encodingOf(what);
    for (const stack of [lean, plain]) {
      const session = http2.connect(stack.server.url);
      session.on("error", () => undefined);
      try {
        const at = (
          via: "fetch" | "h2",
          path: string,
          headers: Record<string, string>,
          body: Buffer,
        ) =>
          send(stack.server.url, session, {
            kind: what,
            via,
            method: "POST",
            path,
            headers: { ...AUTH, ...headers },
            body,
          });
        const unary = await at(
          "fetch",
          `${SERVICE}/GetStatus`,
          { "content-type": "application/json", "content-encoding": encoding },
          data,
        );
        expect([what, unary.status, JSON.parse(unary.body.toString()).code]).toEqual([
          what,
          400,
          "invalid_argument",
        ]);
        const streamed = await at(
          "fetch",
          `${SERVICE}/WatchJob`,
          { "content-type": "application/connect+json", "connect-content-encoding": encoding },
          envelope(1, data),
        );
        expect([
          what,
          streamed.status,
          /"code":"([a-z_]+)"/.exec(streamed.body.toString("latin1"))?.[1],
        ]).toEqual([what, 200, "invalid_argument"]);
        const grpc = await at(
          "h2",
          `${SERVICE}/GetStatus`,
          { "content-type": "application/grpc", te: "trailers", "grpc-encoding": encoding },
          envelope(1, data),
        );
        expect([what, grpcCode(grpc)]).toEqual([what, String(Code.InvalidArgument)]);
        const web = await at(
          "fetch",
          `${SERVICE}/WatchJob`,
          { "content-type": "application/grpc-web+proto", "grpc-encoding": encoding },
          envelope(1, data),
        );
        expect([what, grpcCode(web)]).toEqual([what, String(Code.InvalidArgument)]);
      } finally {
        session.close();
      }
    }
  });
});

describe("/metrics counts client mistakes under their own codes", () => {
  test("400, 401, 404, 405 and 415 are never counted as internal, both ways in", async () => {
    for (const stack of [lean, plain]) {
      const url = `${stack.server.url}${SERVICE}`;
      const post = (
        path: string,
        headers: Record<string, string>,
        body: string | Buffer,
        method = "POST",
      ) =>
        fetch(`${url}/${path}`, {
          method,
          headers,
          body: typeof body === "string" ? body : new Uint8Array(body),
        });
      const answers = await Promise.all([
        post("GetStatus", { ...AUTH, "content-type": "application/json" }, "{"),
        post(
          "GetStatus",
          { ...AUTH, "content-type": "application/json", "content-encoding": "gzip" },
          gzipSync("{}").subarray(0, 12),
        ),
        post("GetStatus", { "content-type": "application/json" }, "{}"),
        post("Nope", { ...AUTH, "content-type": "application/json" }, "{}"),
        post("GetStatus", { ...AUTH, "content-type": "text/plain" }, "{}"),
        post("Initiate", { ...AUTH, "content-type": "application/json" }, "{}", "PUT"),
      ]);
      expect(answers.map((r) => r.status)).toEqual([400, 400, 401, 404, 415, 405]);
      await Promise.all(answers.map((r) => r.arrayBuffer()));
      const samples = parseMetrics(await (await fetch(`${stack.server.url}/metrics`)).text());
      const count = (labels: Record<string, string>) =>
        metricValue(samples, "rpc_requests_total", labels);
      const getStatus = "downloads.v1.DownloadService/GetStatus";
      expect(count({ method: getStatus, code: "invalid_argument" })).toBeGreaterThanOrEqual(2);
      expect(count({ method: getStatus, code: "unauthenticated" })).toBeGreaterThanOrEqual(1);
      expect(count({ method: getStatus, code: "unsupported_media_type" })).toBeGreaterThanOrEqual(
        1,
      );
      expect(count({ method: "unknown", code: "unimplemented" })).toBeGreaterThanOrEqual(1);
      expect(count({ code: "method_not_allowed" })).toBeGreaterThanOrEqual(1);
      expect(count({ code: "internal" })).toBe(0);
      expect(count({ code: "unknown" })).toBe(0);
    }
  });
});
