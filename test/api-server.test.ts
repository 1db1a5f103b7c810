import { type ChildProcess, spawn } from "node:child_process";
import http2 from "node:http2";
import net from "node:net";
import { resolve } from "node:path";
import { type Client, Code, ConnectError, createClient } from "@connectrpc/connect";
import {
  createConnectTransport,
  createGrpcTransport,
  createGrpcWebTransport,
  Http2SessionManager,
} from "@connectrpc/connect-node";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { DownloadService } from "../gen/downloads/v1/download_service_pb.js";
import { freePort, waitUntil } from "../local/ports.js";
import {
  type ApiStack,
  startApiStack,
  TEST_AUTH_HEADER,
  TEST_CONNECTION_NAME,
  withTestToken,
} from "./helpers/api.js";
import { STARTUP_MS, settlesWithin } from "./helpers/deadline.js";
import { type Services, startServices, uniquePrefix } from "./helpers/services.js";

// The server as a network service: one port for both protocols, robust against
// clients that misbehave at the TCP level, and a graceful stop (in process and as the
// real entry point on SIGTERM) that hands every open watch an UNAVAILABLE to reconnect on.

const ROOT = resolve(import.meta.dirname, "..");
const PROTO = resolve(ROOT, "proto/downloads/v1/download_service.proto");

let svc: Services;
beforeAll(async () => {
  svc = await startServices();
});
afterAll(async () => {
  await svc?.stop();
});

/** Opens a raw TCP connection and collects what the server sends until it closes. */
function rawSocket(port: number) {
  const socket = net.connect(port, "127.0.0.1");
  let received = "";
  socket.on("data", (d: Buffer) => (received += d.toString()));
  socket.on("error", () => undefined);
  const closed = new Promise<void>((ok) => socket.once("close", () => ok()));
  return { socket, closed, received: () => received };
}

function send(socket: net.Socket, data: string | Buffer): Promise<void> {
  return new Promise((ok, fail) => socket.write(data, (err) => (err ? fail(err) : ok())));
}

const pause = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe("one port, two protocols", () => {
  let st: ApiStack;
  beforeAll(async () => {
    st = await startApiStack(
      { WATCH_HEARTBEAT_MS: "200" },
      {
        services: svc,
        headersTimeoutMs: 600,
        requestTimeoutMs: 800,
        connectionsCheckingIntervalMs: 100,
      },
    );
  });
  afterAll(async () => {
    await st?.stop();
  });

  test("an HTTP/1.1 request that arrives in tiny pieces is understood", async () => {
    // "P" could start either "POST" or the HTTP/2 preface "PRI": the server must wait.
    const c = rawSocket(st.server.port);
    const req =
      "POST /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
    for (const piece of ["P", "OS", "T /hea", req.slice(10)]) {
      await send(c.socket, piece);
      await pause(20);
    }
    await c.closed;
    // /healthz only answers GET/HEAD; a 404 proves the request was parsed whole.
    expect(c.received()).toMatch(/^HTTP\/1\.1 404 /);

    const g = rawSocket(st.server.port);
    const get = "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    for (let i = 0; i < get.length; i += 7) {
      await send(g.socket, get.slice(i, i + 7));
      await pause(5);
    }
    await g.closed;
    expect(g.received()).toMatch(/^HTTP\/1\.1 200 /);
  });

  test("an HTTP/2 preface split across packets is understood", async () => {
    const session = http2.connect(st.server.url, {
      createConnection: () => {
        const socket = net.connect(st.server.port, "127.0.0.1");
        const write = socket.write.bind(socket) as (
          chunk: Buffer,
          cb?: (err?: Error | null) => void,
        ) => boolean;
        let first = true;
        socket.write = ((chunk: Buffer, ...rest: never[]) => {
          if (!first || chunk.length < 10) return write(chunk, ...rest);
          first = false;
          write(chunk.subarray(0, 3));
          setTimeout(() => write(chunk.subarray(3, 12)), 20);
          setTimeout(() => write(chunk.subarray(12), ...rest), 40);
          return true;
        }) as typeof socket.write;
        return socket;
      },
    });
    try {
      const status = await new Promise<number>((ok, fail) => {
        const req = session.request({ ":method": "GET", ":path": "/healthz" });
        req.on("response", (h) => ok(Number(h[":status"])));
        req.on("error", fail);
        req.end();
      });
      expect(status).toBe(200);
    } finally {
      session.close();
    }
  });

  test("a slow-loris request head is cut off after the headers timeout", async () => {
    const c = rawSocket(st.server.port);
    await send(c.socket, "GET /healthz HTTP/1.1\r\nHost: x\r\n");
    let open = true;
    void c.closed.then(() => (open = false));
    // Keep trickling header lines: an idle timeout alone would never fire.
    for (let i = 0; open && i < 100; i++) {
      await send(c.socket, `X-Trickle-${i}: y\r\n`).catch(() => undefined);
      await pause(100);
    }
    expect(open).toBe(false);
    expect(c.received()).toMatch(/^(HTTP\/1\.1 408 |$)/);
  });

  test("a WatchJob over HTTP/1.1 outlives the request timeout (it only bounds receiving the request)", async () => {
    const client = createClient(
      DownloadService,
      createConnectTransport({
        baseUrl: st.server.url,
        httpVersion: "1.1",
        interceptors: [withTestToken],
      }),
    );
    const jobId = (await client.initiate({ fileIds: [1] })).job?.jobId ?? "";
    const abort = new AbortController();
    let beats = 0;
    const done = (async () => {
      for await (const msg of client.watchJob({ jobId }, { signal: abort.signal }))
        if (msg.event.case === "heartbeat") beats++;
    })().catch((e: unknown) => ConnectError.from(e));
    const started = Date.now();
    // 2 s of heartbeats, well past the 800 ms request timeout.
    await expect.poll(() => beats).toBeGreaterThanOrEqual(8);
    expect(Date.now() - started).toBeGreaterThan(1500);
    abort.abort();
    expect((await done)?.code).toBe(Code.Canceled);
  });

  test("a connection that never shows its protocol is cut off", async () => {
    const silent = rawSocket(st.server.port);
    const partial = rawSocket(st.server.port);
    await send(partial.socket, "PRI * HTTP");
    await Promise.all([silent.closed, partial.closed]);
    expect(silent.received()).toBe("");
  });

  test("connections reset before or right after the hand-off do not hurt the server", async () => {
    for (const first of [
      "",
      "PR",
      "GET /healthz HTTP/1.1\r\nHo",
      "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    ]) {
      const c = rawSocket(st.server.port);
      await new Promise<void>((ok) => c.socket.once("connect", () => ok()));
      if (first !== "") await send(c.socket, first);
      c.socket.resetAndDestroy();
      await c.closed;
    }
    const res = await fetch(`${st.server.url}/healthz`);
    expect(res.status).toBe(200);
  });
});

describe("graceful shutdown", () => {
  test("close() ends open watches on every protocol with UNAVAILABLE and does not wait for a stuck request", async () => {
    // A request timeout of ten minutes: were close() to wait for the stuck request below,
    // it would hang far past the deadline it is given.
    const st = await startApiStack(
      { WATCH_HEARTBEAT_MS: "60000" },
      { services: svc, drainTimeoutMs: 1500, requestTimeoutMs: 600_000 },
    );
    const sessions = [
      new Http2SessionManager(st.server.url),
      new Http2SessionManager(st.server.url),
    ];
    let grpcClient: grpc.Client | undefined;
    try {
      const clients: [string, Client<typeof DownloadService>][] = [
        [
          "connect h1",
          createClient(
            DownloadService,
            createConnectTransport({
              baseUrl: st.server.url,
              httpVersion: "1.1",
              interceptors: [withTestToken],
            }),
          ),
        ],
        [
          "connect h2c",
          createClient(
            DownloadService,
            createConnectTransport({
              baseUrl: st.server.url,
              httpVersion: "2",
              sessionManager: sessions[0] as Http2SessionManager,
              interceptors: [withTestToken],
            }),
          ),
        ],
        [
          "grpc h2c",
          createClient(
            DownloadService,
            createGrpcTransport({
              baseUrl: st.server.url,
              sessionManager: sessions[1] as Http2SessionManager,
              interceptors: [withTestToken],
            }),
          ),
        ],
        [
          "grpc-web h1",
          createClient(
            DownloadService,
            createGrpcWebTransport({
              baseUrl: st.server.url,
              httpVersion: "1.1",
              interceptors: [withTestToken],
            }),
          ),
        ],
      ];
      const jobId = (await clients[0]?.[1].initiate({ fileIds: [1] }))?.job?.jobId ?? "";

      const streams = clients.map(([name, c]) => {
        let snapshots = 0;
        const done = (async () => {
          for await (const msg of c.watchJob({ jobId })) if (msg.event.case === "job") snapshots++;
          return undefined;
        })().catch((e: unknown) => ConnectError.from(e));
        return { name, done, snapshots: () => snapshots };
      });

      const def = await protoLoader.load(PROTO, {
        enums: String,
        longs: String,
        defaults: true,
        oneofs: true,
      });
      const pkg = grpc.loadPackageDefinition(def) as unknown as {
        downloads: {
          v1: { DownloadService: new (addr: string, c: grpc.ChannelCredentials) => grpc.Client };
        };
      };
      grpcClient = new pkg.downloads.v1.DownloadService(
        `127.0.0.1:${st.server.port}`,
        grpc.credentials.createInsecure(),
      );
      const metadata = new grpc.Metadata();
      metadata.set("authorization", TEST_AUTH_HEADER.authorization);
      const grpcStream = (
        grpcClient as unknown as {
          watchJob(r: object, m: grpc.Metadata): grpc.ClientReadableStream<object>;
        }
      ).watchJob({ jobId }, metadata);
      let grpcMessages = 0;
      grpcStream.on("data", () => grpcMessages++);
      grpcStream.on("error", () => undefined);
      const grpcStatus = new Promise<grpc.StatusObject>((ok) => grpcStream.on("status", ok));

      // A request stuck half-way (head sent, body never finished) must not hold the stop.
      const stuck = rawSocket(st.server.port);
      await send(
        stuck.socket,
        "POST /downloads.v1.DownloadService/GetStatus HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
      );

      await expect
        .poll(() => streams.every((s) => s.snapshots() === 1) && grpcMessages === 1)
        .toBe(true);

      await settlesWithin("close()", 60_000, st.server.close());

      for (const s of streams) {
        expect([s.name, (await s.done)?.code]).toEqual([s.name, Code.Unavailable]);
      }
      expect((await grpcStatus).code).toBe(grpc.status.UNAVAILABLE);
      await stuck.closed;
      // No longer accepting, and the API's Redis connections are gone.
      await expect(fetch(`${st.server.url}/healthz`)).rejects.toThrow();
      await expect
        .poll(
          async () =>
            ((await st.redis.client("LIST")) as string)
              .trim()
              .split("\n")
              .filter((l) => !l.includes(`name=${TEST_CONNECTION_NAME} `)).length,
        )
        .toBe(0);
    } finally {
      grpcClient?.close();
      for (const s of sessions) s.abort();
      await st.stop();
    }
  });

  describe("server/main.ts as a process", () => {
    const children: ChildProcess[] = [];
    afterAll(() => {
      for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill("SIGKILL");
    });

    function spawnApi(env: Record<string, string>) {
      const child = spawn(process.execPath, ["--import", "tsx", "server/main.ts"], {
        cwd: ROOT,
        env: { PATH: process.env.PATH ?? "", HOME: process.env.HOME ?? "/tmp", ...env },
        stdio: ["ignore", "pipe", "pipe"],
      });
      children.push(child);
      let output = "";
      child.stdout?.on("data", (d: Buffer) => (output += d.toString()));
      child.stderr?.on("data", (d: Buffer) => (output += d.toString()));
      const exited = new Promise<number | null>((ok) => child.once("exit", (code) => ok(code)));
      return { child, exited, output: () => output };
    }

    test("exits 0 on SIGTERM by itself, ending an open watch with UNAVAILABLE", async () => {
      const port = await freePort();
      const api = spawnApi({
        ...svc.env,
        PORT: String(port),
        QUEUE_PREFIX: uniquePrefix("main"),
        LOG_LEVEL: "info",
      });
      const url = `http://127.0.0.1:${port}`;
      await waitUntil(
        "API process",
        async () => (await fetch(`${url}/healthz`)).status === 200,
        STARTUP_MS,
      );

      const client = createClient(
        DownloadService,
        createConnectTransport({ baseUrl: url, httpVersion: "1.1", interceptors: [withTestToken] }),
      );
      const jobId = (await client.initiate({ fileIds: [1, 2] })).job?.jobId ?? "";
      let snapshots = 0;
      const watch = (async () => {
        for await (const msg of client.watchJob({ jobId }))
          if (msg.event.case === "job") snapshots++;
        return undefined;
      })().catch((e: unknown) => ConnectError.from(e));
      await expect.poll(() => snapshots).toBe(1);

      api.child.kill("SIGTERM");
      const code = await settlesWithin("exit after SIGTERM", 60_000, api.exited);
      expect(code, api.output()).toBe(0);
      expect((await watch)?.code).toBe(Code.Unavailable);
    });

    test("without REDIS_URL and S3_ENDPOINT it refuses to start and says what to set", async () => {
      const api = spawnApi({ PORT: "0" });
      const code = await api.exited;
      expect(code).not.toBe(0);
      expect(api.output()).toContain("REDIS_URL");
      expect(api.output()).toContain("S3_ENDPOINT");
    });
  });
});

describe("when Redis goes away", () => {
  test("calls fail with UNAVAILABLE, and close() still completes", async () => {
    const st = await startApiStack({}, { services: svc });
    try {
      const client = createClient(
        DownloadService,
        createConnectTransport({
          baseUrl: st.server.url,
          httpVersion: "1.1",
          interceptors: [withTestToken],
        }),
      );
      const jobId = (await client.initiate({ fileIds: [1] })).job?.jobId ?? "";
      svc.redis.kill();
      const codeOf = async (p: Promise<unknown>) =>
        ConnectError.from(
          await p.then(
            () => undefined,
            (e: unknown) => e,
          ),
        ).code;
      await expect.poll(() => codeOf(client.getStatus({ jobId }))).toBe(Code.Unavailable);
      expect(await codeOf(client.initiate({ fileIds: [2] }))).toBe(Code.Unavailable);
      expect(await codeOf(client.cancel({ jobId }))).toBe(Code.Unavailable);
      const watch = (async () => {
        for await (const _ of client.watchJob({ jobId })) return undefined;
        return undefined;
      })().catch((e: unknown) => ConnectError.from(e));
      expect((await watch)?.code).toBe(Code.Unavailable);
      // The process is still serving everything that needs no Redis.
      expect((await fetch(`${st.server.url}/healthz`)).status).toBe(200);
      await settlesWithin("close()", 60_000, st.server.close());
    } finally {
      await st.stop();
    }
  });
});
