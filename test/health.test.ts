import { execFile } from "node:child_process";
import { readFileSync } from "node:fs";
import { createServer, type Server, type Socket } from "node:net";
import { resolve } from "node:path";
import { promisify } from "node:util";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import {
  Health,
  HealthCheckResponse_ServingStatus as Status,
} from "../gen/grpc/health/v1/health_pb.js";
import { freePort } from "../local/ports.js";
import { type ApiStack, startApiStack } from "./helpers/api.js";
import { type Services, startServices, uniquePrefix } from "./helpers/services.js";
import { spawnWorker, type WorkerProcess } from "./helpers/worker-process.js";

// What a load balancer, an orchestrator or an operator sees of health: /healthz and
// /readyz over HTTP, grpc.health.v1 over gRPC, and the worker's own probe port. The
// dependencies fail for real: a TCP port that accepts and never answers stands in for
// a black-holed S3, and Redis is stopped.

const run = promisify(execFile);

let svc: Services;
let st: ApiStack;
let worker: WorkerProcess | undefined;
let workerPort: number;
const sessions: Http2SessionManager[] = [];

beforeAll(async () => {
  svc = await startServices();
  st = await startApiStack({}, { services: svc });
});
afterAll(async () => {
  for (const s of sessions) s.abort();
  await worker?.kill("SIGKILL");
  await st?.stop();
  await svc?.stop();
});

function healthClient(url: string) {
  const sessionManager = new Http2SessionManager(url);
  sessions.push(sessionManager);
  return createClient(Health, createGrpcTransport({ baseUrl: url, sessionManager }));
}

interface Readyz {
  ready: boolean;
  closing?: boolean;
  checks: Record<string, { ok: boolean; ms: number; error?: string }>;
}

async function readyz(base: string): Promise<{ status: number; body: Readyz }> {
  const res = await fetch(`${base}/readyz`);
  return { status: res.status, body: (await res.json()) as Readyz };
}

describe("API health on the API port", () => {
  test("/healthz says ok and /readyz names each dependency it checked", async () => {
    const live = await fetch(`${st.server.url}/healthz`);
    expect(live.status).toBe(200);
    expect(await live.text()).toBe("ok\n");

    const { status, body } = await readyz(st.server.url);
    expect(status).toBe(200);
    expect(body.ready).toBe(true);
    expect(Object.keys(body.checks).sort()).toEqual(["redis", "redis-events", "s3"]);
    for (const check of Object.values(body.checks)) expect(check.ok).toBe(true);

    const head = await fetch(`${st.server.url}/readyz`, { method: "HEAD" });
    expect(head.status).toBe(200);
    expect(await head.text()).toBe("");
  });

  test("grpc.health.v1 Check: SERVING for the server and each service, NOT_FOUND for others", async () => {
    const client = healthClient(st.server.url);
    for (const service of ["", "downloads.v1.DownloadService", "grpc.health.v1.Health"]) {
      expect((await client.check({ service })).status, service).toBe(Status.SERVING);
    }
    const err = await client.check({ service: "no.such.Service" }).catch((e: unknown) => e);
    expect(ConnectError.from(err).code).toBe(Code.NotFound);

    // curl users get the same through the Connect protocol.
    const res = await fetch(`${st.server.url}/grpc.health.v1.Health/Check`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: "{}",
    });
    expect(await res.json()).toEqual({ status: "SERVING" });
  });

  test("a black-holed S3 makes /readyz answer 503 after the short deadline, naming s3", async () => {
    const hole = await blackHole();
    const other = await startApiStack(
      { S3_ENDPOINT: `http://127.0.0.1:${hole.port}`, READY_TIMEOUT_MS: "300" },
      { services: svc },
    );
    try {
      const { status, body } = await readyz(other.server.url);
      expect(status).toBe(503);
      expect(body.ready).toBe(false);
      expect(body.checks.s3).toMatchObject({ ok: false, error: "timeout" });
      expect(body.checks.redis?.ok).toBe(true);
      // The process itself is alive: liveness must not follow a dependency.
      expect((await fetch(`${other.server.url}/healthz`)).status).toBe(200);
      expect((await healthClient(other.server.url).check({})).status).toBe(Status.NOT_SERVING);
    } finally {
      await other.stop();
      await hole.close();
    }
  });

  test("on shutdown a Watch stream says NOT_SERVING and ends", async () => {
    const other = await startApiStack({}, { services: svc });
    try {
      const stream = healthClient(other.server.url).watch({})[Symbol.asyncIterator]();
      expect((await stream.next()).value?.status).toBe(Status.SERVING);
      const closing = other.server.close();
      expect((await stream.next()).value?.status).toBe(Status.NOT_SERVING);
      expect((await stream.next()).done).toBe(true);
      await closing;
    } finally {
      await other.stop();
    }
  });
});

describe("worker health on WORKER_HEALTH_PORT", () => {
  test("the worker serves /healthz and /readyz with its own checks", async () => {
    workerPort = await freePort();
    worker = spawnWorker({
      ...svc.env,
      QUEUE_PREFIX: uniquePrefix("wh"),
      WORKER_HEALTH_PORT: String(workerPort),
      READY_TIMEOUT_MS: "500",
      SHUTDOWN_GRACE_MS: "2000",
    });
    const base = `http://127.0.0.1:${workerPort}`;
    await expect
      .poll(
        () =>
          fetch(`${base}/healthz`).then(
            (r) => r.status,
            () => 0,
          ),
        { interval: 200 },
      )
      .toBe(200);
    // Live comes first; ready follows once its connections are up (later on busy cores).
    let { status, body } = await readyz(base);
    await expect
      .poll(async () => ({ status, body } = await readyz(base)).status, { interval: 200 })
      .toBe(200);
    expect(Object.keys(body.checks).sort()).toEqual(["redis", "redis-events", "s3", "worker"]);
    expect(Object.values(body.checks).every((c) => c.ok)).toBe(true);
    expect((await fetch(`${base}/metrics-or-anything`)).status).toBe(404);
  });

  test("the image's HEALTHCHECK passes against the API and the worker, and fails when nothing answers", async () => {
    // The exact command of the Dockerfile's HEALTHCHECK, run as Docker would run it.
    const dockerfile = readFileSync(resolve(import.meta.dirname, "../Dockerfile"), "utf8");
    const cmd = /^HEALTHCHECK .*\\\n\s+CMD (\[.*\])$/m.exec(dockerfile)?.[1];
    const [, flag, script] = JSON.parse(cmd ?? "[]") as string[];
    const probe = (env: Record<string, string>) =>
      run(process.execPath, [flag ?? "-e", script ?? ""], {
        env: { PATH: process.env.PATH ?? "", ...env },
        timeout: 60_000,
      }).then(
        () => 0,
        (err: { code?: number }) => err.code ?? -1,
      );
    expect(await probe({ PORT: String(st.server.port) })).toBe(0);
    expect(await probe({ PORT: "1", WORKER_HEALTH_PORT: String(workerPort) })).toBe(0);
    expect(await probe({ PORT: String(await freePort()) })).toBe(1);
  });

  test("without WORKER_HEALTH_PORT the worker opens no port", async () => {
    const port = await freePort();
    const quiet = spawnWorker({ ...svc.env, QUEUE_PREFIX: uniquePrefix("wq"), LOG_LEVEL: "info" });
    try {
      await expect.poll(() => quiet.output(), { interval: 200 }).toMatch(/worker ready/);
      expect(quiet.output()).not.toMatch(/worker health listening/);
      expect(
        await fetch(`http://127.0.0.1:${port}/healthz`).then(
          (r) => r.status,
          () => 0,
        ),
      ).toBe(0);
    } finally {
      await quiet.kill();
    }
  });
});

describe("with Redis gone", () => {
  test("the API and the worker report not ready, naming redis, and a Watch stream follows", async () => {
    const watch = healthClient(st.server.url).watch({})[Symbol.asyncIterator]();
    expect((await watch.next()).value?.status).toBe(Status.SERVING);

    await svc.redis.stop();

    const api = await readyz(st.server.url);
    expect(api.status).toBe(503);
    expect(api.body.checks.redis?.ok).toBe(false);
    expect(api.body.checks.s3?.ok).toBe(true);
    // Watch re-checks every few seconds and sends the change.
    expect((await watch.next()).value?.status).toBe(Status.NOT_SERVING);

    const w = await readyz(`http://127.0.0.1:${workerPort}`);
    expect(w.status).toBe(503);
    expect(w.body.checks.redis?.ok).toBe(false);
    expect((await fetch(`http://127.0.0.1:${workerPort}/healthz`)).status).toBe(200);
  });
});

/** A TCP server that accepts connections and never answers, like a dropped route. */
async function blackHole(): Promise<{ port: number; close(): Promise<void> }> {
  const sockets = new Set<Socket>();
  const server: Server = createServer((s) => {
    sockets.add(s);
    s.on("error", () => undefined);
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const addr = server.address();
  const port = typeof addr === "object" && addr !== null ? addr.port : 0;
  return {
    port,
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}
