import { readFileSync } from "node:fs";
import http2 from "node:http2";
import { resolve } from "node:path";
import { afterAll, beforeAll, expect, test } from "vitest";
import { freePort, waitUntil } from "../local/ports.js";
import { type ServiceProcess, startServiceProcess } from "../local/service-process.js";
import { TEST_TOKEN } from "./helpers/api.js";
import { STARTUP_MS } from "./helpers/deadline.js";
import { malformedRequest, type RawResponse, SERVICE, seeded, send } from "./helpers/malformed.js";
import { type Services, startServices, uniquePrefix } from "./helpers/services.js";

// Fault: 10,000 malformed requests over every protocol the port speaks (Connect JSON
// and binary, Connect GET, Connect streaming, gRPC-Web over HTTP/1.1, gRPC and Connect
// over h2c): random bytes, wrong types, huge arrays, overlong strings, bad tokens, bad
// framing. Each must get a clean client-error answer (4xx, or a gRPC status that blames
// the request), never a 5xx or INTERNAL; the server must stay up, and its memory (the
// API runs as its own process) must come back to where it was.

const ROOT = resolve(import.meta.dirname, "..");
const TOTAL = 10_000;
/** A new corpus every run; the seed is in the summary line, to send the same one again. */
const SEED = Number(process.env.MALFORMED_SEED ?? Date.now() % 2 ** 31);
const CONCURRENCY = 32;
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
  await waitUntil("API", async () => (await fetch(`${base}/healthz`)).status === 200, STARTUP_MS);
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

interface Outcome {
  kind: string;
  ok: boolean;
  detail: string;
}

function judge(kind: string, res: RawResponse): Outcome {
  const { status } = res;
  const body = res.body.toString("latin1");
  const grpcStatus =
    res.trailers["grpc-status"] ??
    res.headers["grpc-status"] ??
    /grpc-status:\s*(\d+)/i.exec(body)?.[1] ??
    null;
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

/** One malformed request, of a random kind (test/helpers/malformed.ts). */
function malformed(rand: () => number): Promise<Outcome> {
  const req = malformedRequest(rand, TEST_TOKEN);
  return send(base, session, req)
    .then((res) => judge(req.kind, res))
    .catch((err: unknown) => ({
      kind: "transport",
      ok: false,
      detail: `${req.kind} ${String(err)}`,
    }));
}

async function valid(n: number): Promise<void> {
  const headers = { "content-type": "application/json", authorization: `Bearer ${TEST_TOKEN}` };
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
  const rand = seeded(SEED);
  const started = Date.now();
  await Promise.all(
    Array.from({ length: CONCURRENCY }, async () => {
      while (next < count) {
        next += 1;
        outcomes.push(await malformed(rand));
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
    `fault malformed (seed ${SEED}): ${outcomes.length} malformed requests in ${ms} ms over ${JSON.stringify(Object.fromEntries(byKind))}; ` +
      `answers ${JSON.stringify(Object.fromEntries([...answers].sort((x, y) => y[1] - x[1]).slice(0, 12)))}; ` +
      `not a clean client error: ${bad.length}; API heap after GC ${mb(heapBefore)} before, ${mb(heapAfter)} after ` +
      `(RSS ${mb(rssBefore)} before, ${mb(rssPeak)} at the end of the barrage); server up; lost: 0`,
  );
  expect(bad.slice(0, 10)).toEqual([]);
  expect(outcomes).toHaveLength(TOTAL);
  expect(heapAfter).toBeLessThanOrEqual(heapBefore + 8 * 1024 * 1024);
}, 240_000);
