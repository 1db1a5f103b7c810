import { execFile } from "node:child_process";
import { resolve } from "node:path";
import { promisify } from "node:util";
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
import { ConfigError, loadConfig } from "../core/config.js";
import { createJob } from "../core/job-transitions.js";
import { newJobId } from "../core/jobs.js";
import { DownloadService, JobState } from "../gen/downloads/v1/download_service_pb.js";
import { freePort, waitUntil } from "../local/ports.js";
import { startServiceProcess } from "../local/service-process.js";
import { type ApiStack, startApiStack } from "./helpers/api.js";
import { STARTUP_MS } from "./helpers/deadline.js";
import { type Services, startServices, uniquePrefix } from "./helpers/services.js";
import { authTokens, bearer, decodeConnectStream, envelope } from "./helpers/trust.js";

// Authentication and ownership as callers meet them, over every protocol the server
// speaks and through both of its paths (the lean GetStatus/WatchJob handlers and
// connect-node): no token, a wrong one or a malformed header is UNAUTHENTICATED; a job
// of another owner is indistinguishable from one that does not exist.

const ROOT = resolve(import.meta.dirname, "..");
const BUF = resolve(ROOT, "node_modules/.bin/buf");
const PROTO = resolve(ROOT, "proto/downloads/v1/download_service.proto");
const SERVICE = "/downloads.v1.DownloadService";
const run = promisify(execFile);

const ALICE = "alice-token-9d2f6b1e8c4a7f3d";
const BOB = "bob-token-4e7a1c9f2b6d8e3a";
const AUTH = { AUTH_TOKENS: authTokens({ alice: ALICE, bob: BOB }) };

let svc: Services;
let fast: ApiStack;
let plain: ApiStack;
const sessions: Http2SessionManager[] = [];

beforeAll(async () => {
  svc = await startServices();
  fast = await startApiStack(AUTH, { services: svc });
  plain = await startApiStack(AUTH, { services: svc, leanTransport: false });
});
afterAll(async () => {
  for (const s of sessions) s.abort();
  await fast?.stop();
  await plain?.stop();
  await svc?.stop();
});

const codeOf = async (p: Promise<unknown>) =>
  ConnectError.from(
    await p.then(
      () => undefined,
      (e: unknown) => e,
    ),
  ).code;

function transports(url: string, interceptors: ReturnType<typeof bearer>[]): [string, Transport][] {
  const h2 = () => {
    const m = new Http2SessionManager(url);
    sessions.push(m);
    return m;
  };
  return [
    [
      "Connect JSON, HTTP/1.1",
      createConnectTransport({ baseUrl: url, httpVersion: "1.1", interceptors }),
    ],
    [
      "Connect binary, h2c",
      createConnectTransport({
        baseUrl: url,
        httpVersion: "2",
        useBinaryFormat: true,
        sessionManager: h2(),
        interceptors,
      }),
    ],
    ["gRPC, h2c", createGrpcTransport({ baseUrl: url, sessionManager: h2(), interceptors })],
    [
      "gRPC-Web, HTTP/1.1",
      createGrpcWebTransport({ baseUrl: url, httpVersion: "1.1", interceptors }),
    ],
  ];
}

/** A header interceptor that sends exactly `value` as Authorization. */
function rawAuthorization(value: string): ReturnType<typeof bearer> {
  return (next) => (req) => {
    req.header.set("authorization", value);
    return next(req);
  };
}

const BAD_CREDENTIALS: [string, ReturnType<typeof bearer>[]][] = [
  ["no token", []],
  ["an unknown token", [bearer("not-a-token-anyone-has")]],
  [
    "a token hash instead of the token",
    [bearer(AUTH.AUTH_TOKENS.split(",")[0]?.split(":")[1] ?? "")],
  ],
  [
    "a Basic header",
    [rawAuthorization(`Basic ${Buffer.from(`alice:${ALICE}`).toString("base64")}`)],
  ],
  ["an overlong token", [bearer("x".repeat(10_000))]],
];

describe.each([
  ["with the lean transport", () => fast],
  ["connect-node only", () => plain],
])("%s", (_name, stack) => {
  test.each(BAD_CREDENTIALS)(
    "every RPC on every generated-client protocol refuses %s",
    async (_what, interceptors) => {
      const st = stack();
      const aliceJob = (await createJob(st.store, newJobId(), [1], "alice")).id;
      const waitingBefore = await st.queue.getJobCountByTypes("waiting", "prioritized");
      for (const [protocol, transport] of transports(st.server.url, interceptors)) {
        const client = createClient(DownloadService, transport);
        const codes = [
          await codeOf(client.initiate({ fileIds: [1, 2] })),
          await codeOf(client.getStatus({ jobId: aliceJob })),
          await codeOf(client.cancel({ jobId: aliceJob })),
          await codeOf(
            (async () => {
              for await (const _ of client.watchJob({ jobId: aliceJob })) break;
            })(),
          ),
        ];
        expect(codes, protocol).toEqual([
          Code.Unauthenticated,
          Code.Unauthenticated,
          Code.Unauthenticated,
          Code.Unauthenticated,
        ]);
      }
      // Nothing was created or changed.
      expect(await st.queue.getJobCountByTypes("waiting", "prioritized")).toBe(waitingBefore);
      expect((await st.store.get(aliceJob)).state).toBe("QUEUED");
    },
  );

  test("plain HTTP: POST and Connect GET answer 401, a raw WatchJob stream ends unauthenticated", async () => {
    const st = stack();
    const jobId = (await createJob(st.store, newJobId(), [1], "alice")).id;
    const query = `connect=v1&encoding=json&message=${encodeURIComponent(JSON.stringify({ jobId }))}`;
    for (const headers of [
      {},
      { authorization: "Bearer wrong" },
      { authorization: "Bearer" },
    ] as Record<string, string>[]) {
      const post = await fetch(`${st.server.url}${SERVICE}/GetStatus`, {
        method: "POST",
        headers: { "content-type": "application/json", ...headers },
        body: JSON.stringify({ jobId }),
      });
      expect(post.status).toBe(401);
      expect(((await post.json()) as { code: string }).code).toBe("unauthenticated");
      const get = await fetch(`${st.server.url}${SERVICE}/GetStatus?${query}`, { headers });
      expect(get.status).toBe(401);
      expect(((await get.json()) as { code: string }).code).toBe("unauthenticated");
      const watch = await fetch(`${st.server.url}${SERVICE}/WatchJob`, {
        method: "POST",
        headers: { "content-type": "application/connect+json", ...headers },
        body: new Uint8Array(envelope(0, JSON.stringify({ jobId }))),
      });
      const { messages, end } = decodeConnectStream(Buffer.from(await watch.arrayBuffer()));
      expect(messages).toEqual([]);
      expect(end?.error?.code).toBe("unauthenticated");
    }
    // With Alice's token the same calls work.
    const ok = await fetch(`${st.server.url}${SERVICE}/GetStatus?${query}`, {
      headers: { authorization: `Bearer ${ALICE}` },
    });
    expect(ok.status).toBe(200);
  });

  test("another owner's job does not exist for them: GetStatus, WatchJob, Cancel and the download URL", async () => {
    const st = stack();
    const asAlice = createClient(
      DownloadService,
      createConnectTransport({
        baseUrl: st.server.url,
        httpVersion: "1.1",
        interceptors: [bearer(ALICE)],
      }),
    );
    const asBob = createClient(
      DownloadService,
      createConnectTransport({
        baseUrl: st.server.url,
        httpVersion: "1.1",
        interceptors: [bearer(BOB)],
      }),
    );
    const queued = (await asAlice.initiate({ fileIds: [31, 32] })).job?.jobId ?? "";
    const done = (await asAlice.initiate({ fileIds: [33] })).job?.jobId ?? "";
    await st.startJob(done);
    await st.complete(done, Buffer.from("PK alice's zip"));

    for (const jobId of [queued, done]) {
      expect(await codeOf(asBob.getStatus({ jobId }))).toBe(Code.NotFound);
      expect(await codeOf(asBob.cancel({ jobId }))).toBe(Code.NotFound);
      expect(
        await codeOf(
          (async () => {
            for await (const _ of asBob.watchJob({ jobId })) break;
          })(),
        ),
      ).toBe(Code.NotFound);
    }
    // Bob's Cancel changed nothing.
    expect((await asAlice.getStatus({ jobId: queued })).job?.state).toBe(JobState.QUEUED);

    // No hint: the answer is the one for a job id nobody ever had, word for word.
    const answer = async (jobId: string, token: string) => {
      const post = await fetch(`${st.server.url}${SERVICE}/GetStatus`, {
        method: "POST",
        headers: { "content-type": "application/json", authorization: `Bearer ${token}` },
        body: JSON.stringify({ jobId }),
      });
      const get = await fetch(
        `${st.server.url}${SERVICE}/GetStatus?connect=v1&encoding=json&message=${encodeURIComponent(JSON.stringify({ jobId }))}`,
        { headers: { authorization: `Bearer ${token}` } },
      );
      const watch = await fetch(`${st.server.url}${SERVICE}/WatchJob`, {
        method: "POST",
        headers: { "content-type": "application/connect+json", authorization: `Bearer ${token}` },
        body: new Uint8Array(envelope(0, JSON.stringify({ jobId }))),
      });
      const stream = decodeConnectStream(Buffer.from(await watch.arrayBuffer()));
      const text = [
        post.status,
        await post.text(),
        get.status,
        await get.text(),
        JSON.stringify(stream),
      ].join(" | ");
      return text.replaceAll(jobId, "<id>");
    };
    const unknown = newJobId();
    const nobodys = await answer(unknown, BOB);
    expect(nobodys).toContain("404");
    expect(await answer(done, BOB)).toBe(nobodys);
    expect(await answer(queued, BOB)).toBe(nobodys);

    // Alice still gets her download URL; Bob never saw one.
    const mine = (await asAlice.getStatus({ jobId: done })).job;
    expect(mine?.state).toBe(JobState.COMPLETED);
    expect(mine?.result?.downloadUrl).toMatch(/^http/);
  });
});

describe("other clients carry the token their own way", () => {
  test("grpc-js metadata: none or wrong is UNAUTHENTICATED, the right one works, another owner's job NOT_FOUND", async () => {
    const def = await protoLoader.load(PROTO, {
      longs: String,
      enums: String,
      defaults: true,
      oneofs: true,
    });
    const pkg = grpc.loadPackageDefinition(def) as unknown as {
      downloads: {
        v1: { DownloadService: new (addr: string, c: grpc.ChannelCredentials) => grpc.Client };
      };
    };
    const client = new pkg.downloads.v1.DownloadService(
      `127.0.0.1:${fast.server.port}`,
      grpc.credentials.createInsecure(),
    ) as grpc.Client & {
      initiate(
        r: object,
        m: grpc.Metadata,
        cb: (e: grpc.ServiceError | null, res?: { job: { jobId: string } }) => void,
      ): void;
      getStatus(
        r: object,
        m: grpc.Metadata,
        cb: (e: grpc.ServiceError | null, res?: { job: { jobId: string } }) => void,
      ): void;
    };
    const meta = (token?: string) => {
      const m = new grpc.Metadata();
      if (token !== undefined) m.set("authorization", `Bearer ${token}`);
      return m;
    };
    const call = (fn: "initiate" | "getStatus", req: object, m: grpc.Metadata) =>
      new Promise<{ code: number; jobId?: string }>((ok) =>
        client[fn](req, m, (err, res) =>
          ok(err ? { code: err.code } : { code: 0, jobId: res?.job.jobId ?? "" }),
        ),
      );
    try {
      expect((await call("initiate", { fileIds: [41] }, meta())).code).toBe(
        grpc.status.UNAUTHENTICATED,
      );
      expect((await call("initiate", { fileIds: [41] }, meta("wrong"))).code).toBe(
        grpc.status.UNAUTHENTICATED,
      );
      const made = await call("initiate", { fileIds: [41] }, meta(ALICE));
      expect(made.code).toBe(grpc.status.OK);
      expect((await call("getStatus", { jobId: made.jobId }, meta(ALICE))).code).toBe(
        grpc.status.OK,
      );
      expect((await call("getStatus", { jobId: made.jobId }, meta(BOB))).code).toBe(
        grpc.status.NOT_FOUND,
      );
    } finally {
      client.close();
    }
  });

  test("buf curl -H: without it unauthenticated, with it the job", async () => {
    const jobId = (await createJob(fast.store, newJobId(), [5], "bob")).id;
    const curl = (extra: string[]) =>
      run(
        BUF,
        [
          "curl",
          "--schema",
          "proto",
          ...extra,
          "--data",
          JSON.stringify({ jobId }),
          `${fast.server.url}${SERVICE}/GetStatus`,
        ],
        {
          cwd: ROOT,
          timeout: 120_000,
        },
      );
    const refused = (await curl([]).catch((e: unknown) => e)) as { code?: number; stderr?: string };
    expect(refused.code).not.toBe(0);
    expect(refused.stderr).toMatch(/unauthenticated/);
    const { stdout } = await curl(["-H", `Authorization: Bearer ${BOB}`]);
    expect((JSON.parse(stdout) as { job: { jobId: string } }).job.jobId).toBe(jobId);
  });
});

describe("configuration", () => {
  test("AUTH_TOKENS takes hashes only: a clear token, a short hash or an owner without one is refused", () => {
    for (const bad of [
      "alice:my-secret-token",
      `alice:${"a".repeat(63)}`,
      "a".repeat(64),
      `al ice:${"b".repeat(64)}`,
    ]) {
      expect(() => loadConfig({ AUTH_TOKENS: bad }), bad).toThrow(ConfigError);
    }
    const ok = loadConfig({ AUTH_TOKENS: `alice:${"A".repeat(64)}, bob:${"b".repeat(64)}` });
    expect(ok.AUTH_TOKENS).toEqual([
      { owner: "alice", sha256: "a".repeat(64) },
      { owner: "bob", sha256: "b".repeat(64) },
    ]);
  });

  test("the API refuses to start without tokens; AUTH_DISABLED=true runs open and says so", async () => {
    const lines: string[] = [];
    const env = {
      ...process.env,
      ...svc.env,
      AUTH_TOKENS: "",
      QUEUE_PREFIX: uniquePrefix("auth"),
      LOG_LEVEL: "info",
    };
    const closed = startServiceProcess({
      name: "api",
      entry: "server/main.ts",
      cwd: ROOT,
      env: { ...env, PORT: "0" },
      onLine: (l) => lines.push(l),
    });
    const exit = await closed.exited;
    expect(exit.code).not.toBe(0);
    expect(lines.join("\n")).toMatch(/AUTH_TOKENS/);

    const port = await freePort();
    const out: string[] = [];
    const open = startServiceProcess({
      name: "api",
      entry: "server/main.ts",
      cwd: ROOT,
      env: { ...env, PORT: String(port), AUTH_DISABLED: "true" },
      onLine: (l) => out.push(l),
    });
    try {
      const url = `http://127.0.0.1:${port}`;
      await waitUntil(
        "API",
        async () => (await fetch(`${url}/healthz`)).status === 200,
        STARTUP_MS,
      );
      expect(out.join("\n")).toMatch(/AUTH_DISABLED=true/);
      const res = await fetch(`${url}${SERVICE}/Initiate`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ fileIds: [1] }),
      });
      expect(res.status).toBe(200);
    } finally {
      await open.stop(5000);
    }
  });

  test("job ids are UUIDv4 (122 random bits): 10,000 of them are all distinct and well formed", () => {
    const ids = new Set(Array.from({ length: 10_000 }, () => newJobId()));
    expect(ids.size).toBe(10_000);
    for (const id of ids)
      expect(id).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
  });
});
