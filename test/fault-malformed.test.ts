import { randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import http2 from "node:http2";
import { resolve } from "node:path";
import { afterAll, beforeAll, expect, test } from "vitest";
import { freePort, waitUntil } from "../local/ports.js";
import { type ServiceProcess, startServiceProcess } from "../local/service-process.js";
import { TEST_AUTH_HEADER } from "./helpers/api.js";
import { type Services, startServices, uniquePrefix } from "./helpers/services.js";
import { envelope } from "./helpers/trust.js";

// Fault: 10,000 malformed requests over every protocol the port speaks (Connect JSON
// and binary, Connect GET, Connect streaming, gRPC-Web over HTTP/1.1, gRPC and Connect
// over h2c): random bytes, wrong types, huge arrays, overlong strings, bad tokens, bad
// framing. Each must get a clean client-error answer (4xx, or a gRPC status that blames
// the request), never a 5xx or INTERNAL; the server must stay up, and its memory (the
// API runs as its own process) must come back to where it was.

const ROOT = resolve(import.meta.dirname, "..");
const TOTAL = 10_000;
const CONCURRENCY = 32;
const SERVICE = "/downloads.v1.DownloadService";
const METHODS = ["Initiate", "GetStatus", "Cancel", "WatchJob"];
/** gRPC codes that put the blame on the caller. */
const CLIENT_GRPC = new Set([3, 5, 7, 8, 9, 11, 12, 16]);
/** Connect code names that do the same. */
const CLIENT_CONNECT = new Set([
  "invalid_argument",
  "not_found",
  "permission_denied",
  "resource_exhausted",
  "failed_precondition",
  "out_of_range",
  "unimplemented",
  "unauthenticated",
]);

let svc: Services;
let api: ServiceProcess;
let base: string;
let session: http2.ClientHttp2Session;
const memoryLines: string[] = [];

beforeAll(async () => {
  svc = await startServices();
  const port = await freePort();
  base = `http://127.0.0.1:${port}`;
  api = startServiceProcess({
    name: "api",
    entry: "test/helpers/api-with-gc.ts",
    cwd: ROOT,
    env: {
      ...process.env,
      ...svc.env,
      NODE_OPTIONS: "--expose-gc",
      PORT: String(port),
      QUEUE_PREFIX: uniquePrefix("bad"),
      LOG_LEVEL: "error",
      MAX_FILES_PER_JOB: "100",
    },
    onLine: (line) => {
      if (line.startsWith("memory ")) memoryLines.push(line);
    },
  });
  await waitUntil("API", async () => (await fetch(`${base}/healthz`)).status === 200, 30_000);
  session = http2.connect(base);
  session.on("error", () => undefined);
});
afterAll(async () => {
  session?.close();
  await api?.stop(5000);
  await svc?.stop();
});

function rssBytes(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
  return Number(m?.[1] ?? 0) * 1024;
}

/** The API's heap in use right after a full collection (see helpers/api-with-gc.ts). */
async function heapAfterGc(): Promise<number> {
  const seen = memoryLines.length;
  process.kill(api.pid, "SIGUSR2");
  await expect.poll(() => memoryLines.length).toBeGreaterThan(seen);
  const line = memoryLines.at(-1) ?? "";
  expect(line).toContain("gc=true");
  return Number(/heapUsed=(\d+)/.exec(line)?.[1] ?? 0);
}

const pick = <T>(xs: readonly T[]): T => xs[Math.floor(Math.random() * xs.length)] as T;
const int = (n: number) => Math.floor(Math.random() * n);

function badAuthorization(): string | undefined {
  return pick([
    undefined,
    "",
    "Bearer",
    "Bearer ",
    `Bearer ${randomBytes(int(40) + 1).toString("base64")}`,
    `bearer ${"x".repeat(int(4000) + 513)}`,
    `Basic ${randomBytes(12).toString("base64")}`,
    randomBytes(20).toString("hex"),
    `Bearer ${TEST_AUTH_HEADER.authorization.slice(7, -1)}`,
  ]);
}

/** A JSON body that is well-formed JSON but wrong for the method, or not JSON at all. */
function badJson(method: string): string {
  const long = (n: number) => "z".repeat(n);
  return pick([
    () => randomBytes(int(300) + 1).toString("latin1"),
    () => `{"fileIds":[1,2`,
    () => JSON.stringify({ fileIds: "1,2" }),
    () => JSON.stringify({ fileIds: [1.5, 2] }),
    () => JSON.stringify({ fileIds: [null] }),
    () => JSON.stringify({ fileIds: [-int(100) - 1] }),
    () => JSON.stringify({ fileIds: [2 ** 40] }),
    () => JSON.stringify({ fileIds: [] }),
    () => JSON.stringify({ fileIds: [7, 7] }),
    () => JSON.stringify({ fileIds: Array.from({ length: 101 + int(5000) }, (_, i) => i + 1) }),
    () => JSON.stringify({ fileIds: [1], requestId: long(129 + int(3000)) }),
    () => JSON.stringify({ fileIds: [1], callbackUrl: `http://${long(3000)}` }),
    () => JSON.stringify({ fileIds: [1], callbackUrl: "gopher://x" }),
    () => JSON.stringify({ jobId: 12345 }),
    () => JSON.stringify({ jobId: { nested: [1, 2, 3] } }),
    () => JSON.stringify({ jobId: long(int(60_000) + 100) }),
    () => JSON.stringify({ jobId: "../../etc/passwd" }),
    () => JSON.stringify({ jobId: "00000000-0000-0000-0000-000000000000", afterVersion: "x" }),
    () => JSON.stringify({ unknownField: true }),
    () => JSON.stringify([1, 2, 3]),
    () => JSON.stringify("string"),
    () => "null",
    () => `{"a":${"[".repeat(5000)}${"]".repeat(5000)}}`,
    () =>
      method === "Initiate" ? JSON.stringify({ fileIds: [0] }) : JSON.stringify({ jobId: "" }),
  ])();
}

interface Outcome {
  kind: string;
  ok: boolean;
  detail: string;
}

function judgeHttp(kind: string, status: number, grpcStatus: string | null, body: string): Outcome {
  if (grpcStatus !== null && grpcStatus !== "") {
    const code = Number(grpcStatus);
    return {
      kind,
      ok: status < 500 && CLIENT_GRPC.has(code),
      detail: `HTTP ${status} grpc-status ${code}`,
    };
  }
  if (status >= 400 && status < 500) return { kind, ok: true, detail: `HTTP ${status}` };
  if (status === 200) {
    // A Connect stream answers 200 and puts the error in its end-of-stream message.
    const code = /"code":"([a-z_]+)"/.exec(body)?.[1];
    return {
      kind,
      ok: code !== undefined && CLIENT_CONNECT.has(code),
      detail: `HTTP 200 ${code ?? body.slice(0, 80)}`,
    };
  }
  return { kind, ok: false, detail: `HTTP ${status} ${body.slice(0, 120)}` };
}

async function viaFetch(kind: string, path: string, init: RequestInit): Promise<Outcome> {
  const res = await fetch(`${base}${path}`, init);
  const body = await res.text();
  const grpcStatus =
    res.headers.get("grpc-status") ?? /grpc-status:\s*(\d+)/i.exec(body)?.[1] ?? null;
  return judgeHttp(kind, res.status, grpcStatus, body);
}

function viaH2(
  kind: string,
  path: string,
  headers: Record<string, string>,
  body: Buffer,
): Promise<Outcome> {
  return new Promise((ok) => {
    const req = session.request({ ":method": "POST", ":path": path, ...headers });
    let status = 0;
    let grpcStatus: string | null = null;
    let text = "";
    req.on("response", (h) => {
      status = Number(h[":status"]);
      if (h["grpc-status"] !== undefined) grpcStatus = String(h["grpc-status"]);
    });
    req.on("trailers", (t) => {
      if (t["grpc-status"] !== undefined) grpcStatus = String(t["grpc-status"]);
    });
    req.on("data", (d: Buffer) => {
      if (text.length < 2000) text += d.toString("latin1");
    });
    req.on("end", () => ok(judgeHttp(kind, status, grpcStatus, text)));
    req.on("error", (err) => ok({ kind, ok: false, detail: `h2 error ${err.message}` }));
    req.end(body);
  });
}

function headersWith(
  auth: string | undefined,
  extra: Record<string, string>,
): Record<string, string> {
  return auth === undefined ? extra : { ...extra, authorization: auth };
}

/** One malformed request, of a random kind. */
function malformed(): Promise<Outcome> {
  const method = pick(METHODS);
  const path = `${SERVICE}/${method}`;
  // Half carry a valid token, so that validation past auth is exercised too.
  const auth = Math.random() < 0.5 ? TEST_AUTH_HEADER.authorization : badAuthorization();
  const unaryMethod = pick(["Initiate", "GetStatus", "Cancel"]);
  const kinds: (() => Promise<Outcome>)[] = [
    () =>
      viaFetch("connect-json", `${SERVICE}/${unaryMethod}`, {
        method: "POST",
        headers: headersWith(auth, { "content-type": "application/json" }),
        body: badJson(unaryMethod),
      }),
    () =>
      // Random binary could decode as a valid Initiate: only with a bad token there.
      viaFetch("connect-proto", `${SERVICE}/${unaryMethod}`, {
        method: "POST",
        headers: headersWith(unaryMethod === "Initiate" ? badAuthorization() : auth, {
          "content-type": "application/proto",
        }),
        body: new Uint8Array(randomBytes(int(200))),
      }),
    () => {
      const q = pick([
        `encoding=json&message=${encodeURIComponent(badJson("GetStatus"))}`,
        `encoding=proto&base64=1&message=${randomBytes(30).toString("base64url")}`,
        `encoding=xml&message=x`,
        `connect=v9&encoding=json&message=%7B%7D`,
        `message=${"%".repeat(int(50) + 1)}`,
        "",
      ]);
      return viaFetch("connect-get", `${SERVICE}/GetStatus?${q}`, {
        headers: headersWith(auth, {}),
      });
    },
    () =>
      viaFetch("connect-stream", `${SERVICE}/WatchJob`, {
        method: "POST",
        headers: headersWith(auth, {
          "content-type": pick(["application/connect+json", "application/connect+proto"]),
        }),
        body: new Uint8Array(
          pick([
            () => envelope(0, badJson("WatchJob")),
            () => randomBytes(int(100)),
            () => Buffer.concat([envelope(0, "{}"), envelope(0, "{}")]),
            () => Buffer.from([0, 0xff, 0xff, 0xff, 0xff, 1, 2]),
            () => envelope(1, randomBytes(20)),
          ])(),
        ),
      }),
    () =>
      viaFetch("grpc-web", path, {
        method: "POST",
        headers: headersWith(auth, {
          "content-type": "application/grpc-web+proto",
          "x-grpc-web": "1",
        }),
        body: new Uint8Array(
          pick([() => randomBytes(int(100)), () => Buffer.from([0, 0, 0, 0, 50, 1])])(),
        ),
      }),
    () =>
      viaH2(
        "grpc-h2c",
        path,
        headersWith(auth, { "content-type": "application/grpc", te: "trailers" }),
        pick([
          () => randomBytes(int(100)),
          () => Buffer.from([0, 0, 0, 1, 0]),
          () => Buffer.concat([Buffer.from([0, 0, 0, 0, 4]), randomBytes(4)]),
          () => Buffer.from([1, 0, 0, 0, 3, 1, 2, 3]),
        ])(),
      ),
    () =>
      viaH2(
        "connect-h2c",
        `${SERVICE}/${unaryMethod}`,
        headersWith(auth, { "content-type": "application/json" }),
        Buffer.from(badJson(unaryMethod), "latin1"),
      ),
    () =>
      viaFetch(
        "wrong-route",
        pick([
          `${SERVICE}/Delete`,
          "/downloads.v2.DownloadService/Initiate",
          `${SERVICE}/`,
          "/%00",
        ]),
        {
          method: pick(["POST", "PUT", "DELETE", "PATCH"]),
          headers: { "content-type": "application/json" },
          body: "{}",
        },
      ),
    () =>
      viaFetch("wrong-content-type", path, {
        method: "POST",
        headers: headersWith(auth, {
          "content-type": pick([
            "text/plain",
            "application/xml",
            "multipart/form-data",
            "application/json; charset=latin1",
          ]),
        }),
        body: "{}",
      }),
  ];
  return pick(kinds)().catch((err: unknown) => ({
    kind: "transport",
    ok: false,
    detail: String(err),
  }));
}

async function valid(n: number): Promise<void> {
  const headers = { "content-type": "application/json", ...TEST_AUTH_HEADER };
  const { job } = (await (
    await fetch(`${base}${SERVICE}/Initiate`, {
      method: "POST",
      headers,
      body: JSON.stringify({ fileIds: [1, 2] }),
    })
  ).json()) as { job: { jobId: string } };
  for (let i = 0; i < n; i++) {
    const res = await fetch(`${base}${SERVICE}/GetStatus`, {
      method: "POST",
      headers,
      body: JSON.stringify({ jobId: job.jobId }),
    });
    expect(res.status).toBe(200);
    await res.arrayBuffer();
  }
}

/** Sends `count` malformed requests, CONCURRENCY at a time. */
async function barrage(count: number, outcomes: Outcome[]): Promise<number> {
  let next = 0;
  const started = Date.now();
  await Promise.all(
    Array.from({ length: CONCURRENCY }, async () => {
      while (next < count) {
        next += 1;
        outcomes.push(await malformed());
      }
    }),
  );
  return Date.now() - started;
}

test("10,000 malformed requests over every protocol: each a clean client error, the server stays up, memory comes back", async () => {
  // Warm up with valid calls, so the baseline is a busy server's, not an idle one's.
  await Promise.all(Array.from({ length: 8 }, () => valid(100)));
  const heapBefore = await heapAfterGc();
  const rssBefore = rssBytes(api.pid);

  const outcomes: Outcome[] = [];
  const ms = await barrage(TOTAL, outcomes);
  const rssPeak = rssBytes(api.pid);

  const byKind = new Map<string, number>();
  const bad = outcomes.filter((o) => !o.ok);
  for (const o of outcomes) byKind.set(o.kind, (byKind.get(o.kind) ?? 0) + 1);
  const answers = new Map<string, number>();
  for (const o of outcomes)
    answers.set(o.detail.slice(0, 40), (answers.get(o.detail.slice(0, 40)) ?? 0) + 1);

  // Still up and serving.
  expect(api.running()).toBe(true);
  await valid(20);

  // What is still referenced after a full collection is what a leak would leave.
  const heapAfter = await heapAfterGc();
  const mb = (n: number) => `${(n / 1024 / 1024).toFixed(1)} MB`;
  console.log(
    `fault malformed: ${outcomes.length} malformed requests in ${ms} ms over ${JSON.stringify(Object.fromEntries(byKind))}; ` +
      `answers ${JSON.stringify(Object.fromEntries([...answers].sort((x, y) => y[1] - x[1]).slice(0, 12)))}; ` +
      `not a clean client error: ${bad.length}; API heap after GC ${mb(heapBefore)} before, ${mb(heapAfter)} after ` +
      `(RSS ${mb(rssBefore)} before, ${mb(rssPeak)} at the end of the barrage); server up; lost: 0`,
  );
  expect(bad.slice(0, 10)).toEqual([]);
  expect(outcomes).toHaveLength(TOTAL);
  expect(heapAfter).toBeLessThanOrEqual(heapBefore + 8 * 1024 * 1024);
}, 240_000);
