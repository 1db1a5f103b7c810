import http2 from "node:http2";
import { connect, type Socket } from "node:net";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import {
  createConnectTransport,
  createGrpcTransport,
  Http2SessionManager,
} from "@connectrpc/connect-node";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { createJob } from "../core/job-transitions.js";
import { newJobId } from "../core/jobs.js";
import { DownloadService, JobState } from "../gen/downloads/v1/download_service_pb.js";
import {
  Health,
  HealthCheckResponse_ServingStatus as Status,
} from "../gen/grpc/health/v1/health_pb.js";
import { type ApiStack, startApiStack, TEST_AUTH_HEADER, withTestToken } from "./helpers/api.js";
import { type Services, startServices } from "./helpers/services.js";

// HTTP/2 gets the limits HTTP/1.1 has (issue 12 item 4), each exercised by a real
// HTTP/2 client: a head deadline for new connections, an idle timeout, a body deadline
// per stream, a finite stream count, a rapid-reset defence, and caps on the
// unauthenticated Health/Watch streams. The servers run with short limits so that the
// tests wait for conditions (connection closed, GOAWAY received), never for time.

const { NGHTTP2_CANCEL, NGHTTP2_ENHANCE_YOUR_CALM, NGHTTP2_NO_ERROR } = http2.constants;
const PREFACE = Buffer.from("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
/** An empty SETTINGS frame: what a client sends right after the preface. */
const EMPTY_SETTINGS = Buffer.from([0, 0, 0, 4, 0, 0, 0, 0, 0]);
const GET_STATUS = "/downloads.v1.DownloadService/GetStatus";

let svc: Services;
/** Short limits: 1 s head, idle and body deadlines, 64 streams, 1.5 s Health/Watch. */
let tight: ApiStack;
/** Defaults, except 50 resets per 10 s and Health/Watch caps of 2 per connection, 3 in all. */
let capped: ApiStack;
const cleanup: (() => void)[] = [];

beforeAll(async () => {
  svc = await startServices();
  [tight, capped] = await Promise.all([
    startApiStack(
      {
        HTTP_HEADERS_TIMEOUT_MS: "1000",
        HTTP_REQUEST_TIMEOUT_MS: "1000",
        HTTP2_IDLE_TIMEOUT_MS: "1000",
        HTTP2_MAX_CONCURRENT_STREAMS: "64",
        HEALTH_WATCH_MAX_STREAM_MS: "1500",
      },
      { services: svc, connectionsCheckingIntervalMs: 100 },
    ),
    startApiStack(
      {
        HTTP2_MAX_RESETS_PER_10S: "50",
        HEALTH_WATCH_MAX_PER_CONNECTION: "2",
        HEALTH_WATCH_MAX_STREAMS: "3",
      },
      { services: svc },
    ),
  ]);
});
afterAll(async () => {
  for (const c of cleanup) c();
  await tight?.stop();
  await capped?.stop();
  await svc?.stop();
});

function session(url: string): http2.ClientHttp2Session {
  const s = http2.connect(url);
  s.on("error", () => undefined);
  cleanup.push(() => s.destroy());
  return s;
}

/** Resolves with the GOAWAY error code the server sent, once the session is closed. */
function goawayOf(s: http2.ClientHttp2Session): Promise<number | undefined> {
  return new Promise((resolve) => {
    let code: number | undefined;
    s.on("goaway", (errorCode) => {
      code = errorCode;
    });
    s.once("close", () => resolve(code));
  });
}

/** The API's own count of what a limit did, from its /metrics. */
async function limitEvents(stack: ApiStack, event: string): Promise<number> {
  const text = await (await fetch(`${stack.server.url}/metrics`)).text();
  const line = new RegExp(`^http2_limit_events_total\\{event="${event}"\\} (\\d+)$`, "m");
  return Number(line.exec(text)?.[1] ?? Number.NaN);
}

function healthClient(url: string, sessionManager = new Http2SessionManager(url)) {
  cleanup.push(() => sessionManager.abort());
  return createClient(Health, createGrpcTransport({ baseUrl: url, sessionManager }));
}

describe("HTTP/2 connection limits", () => {
  test("advertises a finite SETTINGS_MAX_CONCURRENT_STREAMS: 250 by default, HTTP2_MAX_CONCURRENT_STREAMS when set", async () => {
    for (const [stack, expected] of [
      [capped, 250],
      [tight, 64],
    ] as const) {
      const s = session(stack.server.url);
      const settings = await new Promise<http2.Settings>((resolve) =>
        s.once("remoteSettings", resolve),
      );
      expect(settings.maxConcurrentStreams).toBe(expected);
      s.close();
    }
  });

  test("200 connections that only sent the preface are closed after the head deadline", async () => {
    const sockets: Socket[] = [];
    let closed = 0;
    for (let i = 0; i < 200; i++) {
      const sock = connect(tight.server.port, "127.0.0.1");
      sock.on("error", () => undefined);
      sock.on("data", () => undefined);
      sock.once("close", () => closed++);
      sock.write(Buffer.concat([PREFACE, EMPTY_SETTINGS]));
      sockets.push(sock);
    }
    cleanup.push(() => {
      for (const s of sockets) s.destroy();
    });
    await expect.poll(() => closed, { timeout: 60_000, interval: 100 }).toBe(200);
    expect(await limitEvents(tight, "head_timeout")).toBeGreaterThanOrEqual(200);
  });

  test("an HTTP/2 connection left idle after a call gets GOAWAY(NO_ERROR) and is closed", async () => {
    const s = session(tight.server.url);
    const goaway = goawayOf(s);
    const announced: [number, number][] = [];
    s.on("goaway", (code, lastStreamID) => announced.push([code, lastStreamID]));
    const status = await new Promise<number>((resolve, reject) => {
      const req = s.request({ ":method": "GET", ":path": "/healthz" });
      req.on("response", (h) => resolve(Number(h[":status"])));
      req.on("error", reject);
      req.resume();
      req.end();
    });
    expect(status).toBe(200);
    expect(await goaway).toBe(NGHTTP2_NO_ERROR);
    // Graceful (RFC 9113 §6.8): the first GOAWAY still accepts every stream id, so a
    // request that crossed it on the wire is served rather than refused.
    expect(announced[0]).toEqual([NGHTTP2_NO_ERROR, 2 ** 31 - 1]);
    expect(await limitEvents(tight, "idle_close")).toBeGreaterThanOrEqual(1);
  });

  test("a stream whose body stops after 11 bytes is reset (CANCEL) while the connection serves on", async () => {
    const s = session(tight.server.url);
    const stalled = s.request({
      ":method": "POST",
      ":path": GET_STATUS,
      "content-type": "application/json",
      ...TEST_AUTH_HEADER,
    });
    stalled.on("error", () => undefined);
    let answered: number | undefined;
    stalled.on("response", (h) => {
      answered = Number(h[":status"]);
    });
    stalled.write('{"jobId":"a'); // 11 bytes, and never the rest
    const rstCode = await new Promise<number>((resolve) =>
      stalled.once("close", () => resolve(stalled.rstCode ?? -1)),
    );
    expect(rstCode).toBe(NGHTTP2_CANCEL);
    expect(answered).toBeUndefined();
    expect(await limitEvents(tight, "body_timeout")).toBe(1);

    // A slow body costs that stream only: the same connection still answers.
    const ok = await new Promise<number>((resolve, reject) => {
      const req = s.request({ ":method": "GET", ":path": "/healthz" });
      req.on("response", (h) => resolve(Number(h[":status"])));
      req.on("error", reject);
      req.resume();
      req.end();
    });
    expect(ok).toBe(200);
  });

  test("a rapid-reset client gets GOAWAY(ENHANCE_YOUR_CALM) while another client's GetStatus is answered", async () => {
    const jobId = (await createJob(capped.store, newJobId(), [1], capped.owner)).id;

    const normal = createClient(
      DownloadService,
      createConnectTransport({
        baseUrl: capped.server.url,
        httpVersion: "2",
        interceptors: [withTestToken],
      }),
    );
    let answered = 0;
    let stop = false;
    // Every answer must be this job's: a failed call ends the loop and fails the test.
    const polling = (async () => {
      while (!stop) {
        const res = await normal.getStatus({ jobId });
        if (res.job?.jobId !== jobId || res.job.state !== JobState.QUEUED)
          throw new Error(`unexpected answer ${JSON.stringify(res.job)}`);
        answered++;
      }
    })();
    const failed = polling.then(
      () => undefined,
      (err: unknown) => err,
    );

    const attacker = session(capped.server.url);
    const goaway = goawayOf(attacker);
    let sent = 0;
    // Open and reset at once, as CVE-2023-44487's clients do, until the server hangs up.
    while (!attacker.closed && !attacker.destroyed && sent < 100_000) {
      const path = `${GET_STATUS}?connect=v1&encoding=json&message=${encodeURIComponent(JSON.stringify({ jobId }))}`;
      let req: http2.ClientHttp2Stream;
      try {
        req = attacker.request({ ":method": "GET", ":path": path, ...TEST_AUTH_HEADER });
      } catch {
        break;
      }
      req.on("error", () => undefined);
      req.close(NGHTTP2_CANCEL);
      sent++;
      if (sent % 20 === 0) await new Promise((r) => setImmediate(r));
    }
    expect(await goaway).toBe(NGHTTP2_ENHANCE_YOUR_CALM);
    expect(await limitEvents(capped, "rapid_reset")).toBe(1);

    // The well-behaved client kept being served, during the attack and after it.
    const before = answered;
    await expect.poll(() => answered, { timeout: 30_000 }).toBeGreaterThan(before + 3);
    stop = true;
    expect(await failed).toBeUndefined();
  });
});

describe("grpc.health.v1.Health/Watch limits", () => {
  async function firstStatus(it: AsyncIterator<{ status: Status }>): Promise<Status> {
    const next = await it.next();
    if (next.done === true) throw new Error("watch ended before its first message");
    return next.value.status;
  }

  async function codeOf(it: AsyncIterator<unknown>): Promise<Code | undefined> {
    try {
      await it.next();
      return undefined;
    } catch (err) {
      return ConnectError.from(err).code;
    }
  }

  test("Watch beyond the per-connection and the server-wide caps is refused with resource_exhausted", async () => {
    const ac = new AbortController();
    cleanup.push(() => ac.abort());
    const one = healthClient(capped.server.url);
    const first = one.watch({ service: "" }, { signal: ac.signal })[Symbol.asyncIterator]();
    const second = one.watch({ service: "" }, { signal: ac.signal })[Symbol.asyncIterator]();
    expect(await firstStatus(first)).toBe(Status.SERVING);
    expect(await firstStatus(second)).toBe(Status.SERVING);
    // A third on the same connection.
    const third = one.watch({ service: "" }, { signal: ac.signal })[Symbol.asyncIterator]();
    expect(await codeOf(third)).toBe(Code.ResourceExhausted);

    // A new connection may watch until the server holds 3 in all.
    const other = healthClient(capped.server.url);
    const fourth = other.watch({ service: "" }, { signal: ac.signal })[Symbol.asyncIterator]();
    expect(await firstStatus(fourth)).toBe(Status.SERVING);
    const fifth = other.watch({ service: "" }, { signal: ac.signal })[Symbol.asyncIterator]();
    expect(await codeOf(fifth)).toBe(Code.ResourceExhausted);

    // A slot given back is a slot again.
    await first.return?.();
    await expect
      .poll(
        async () => {
          const again = other.watch({ service: "" }, { signal: ac.signal })[Symbol.asyncIterator]();
          try {
            return await firstStatus(again);
          } catch (err) {
            return ConnectError.from(err).code;
          }
        },
        { interval: 200 },
      )
      .toBe(Status.SERVING);
  });

  test("a Watch stream ends (OK) after HEALTH_WATCH_MAX_STREAM_MS, and Check is never capped", async () => {
    const client = healthClient(tight.server.url);
    const seen: Status[] = [];
    for await (const res of client.watch({ service: "" })) seen.push(res.status);
    expect(seen).toEqual([Status.SERVING]);
    // Check is answered every time, never refused by the Watch caps. (Its answer is the
    // readiness probe's: on a machine loaded enough to time a probe out, NOT_SERVING.)
    for (let i = 0; i < 20; i++)
      expect([Status.SERVING, Status.NOT_SERVING]).toContain(
        (await client.check({ service: "" })).status,
      );
  });
});
