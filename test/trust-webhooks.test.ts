import { createHmac } from "node:crypto";
import http from "node:http";
import type { AddressInfo } from "node:net";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { pino } from "pino";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { InvalidInputError } from "../core/jobs.js";
import { checkWebhookUrl } from "../core/webhook-target.js";
import {
  DownloadService,
  JobState,
  WebhookState,
} from "../gen/downloads/v1/download_service_pb.js";
import { type RunningWorker, startWorker } from "../worker/worker.js";
import { type ApiStack, startApiStack } from "./helpers/api.js";
import { type Services, startServices } from "./helpers/services.js";
import { authTokens, bearer } from "./helpers/trust.js";

// Webhooks as a receiver sees them: one signed POST per job that ends, carrying the
// same JSON as GetStatus, retried with backoff through the queue, refused for URLs
// that point inside the network (at Initiate, and again at delivery).

const TOKEN = "hook-owner-token-6a1d9e3f7c2b";
const SECRET = "webhook-secret-for-tests-0123456789";
const SERVICE = "/downloads.v1.DownloadService";
const silent = pino({ level: "silent" });

interface Received {
  path: string;
  headers: http.IncomingHttpHeaders;
  body: string;
  at: number;
}

let svc: Services;
let st: ApiStack;
let worker: RunningWorker;
let receiver: http.Server;
let hookBase: string;
const received: Received[] = [];
/** Status codes to answer per path, in order; 200 once the list is used up. */
const script = new Map<string, number[]>();

beforeAll(async () => {
  svc = await startServices();
  receiver = http.createServer((req, res) => {
    let body = "";
    req.on("data", (d: Buffer) => (body += d.toString()));
    req.on("end", () => {
      const path = req.url ?? "";
      received.push({ path, headers: req.headers, body, at: Date.now() });
      const status = script.get(path)?.shift() ?? 200;
      res.writeHead(status).end();
    });
  });
  await new Promise<void>((ok) => receiver.listen(0, "127.0.0.1", ok));
  hookBase = `http://127.0.0.1:${(receiver.address() as AddressInfo).port}`;
  await svc.putSource(201, 3000);
  await svc.putSource(202, 5000);
  st = await startApiStack(
    {
      AUTH_TOKENS: authTokens({ hooks: TOKEN }),
      WEBHOOK_SECRET: SECRET,
      // The receiver is on loopback: allowed explicitly, as an operator would.
      WEBHOOK_ALLOWED_HOSTS: "127.0.0.1/32",
      WEBHOOK_ATTEMPTS: "3",
      WEBHOOK_BACKOFF_MS: "200",
      // Bodies carry the stable download link, absolute with the API's public address.
      DOWNLOAD_LINK_SECRET: "webhook-test-link-secret-0123456789abcdef",
      PUBLIC_URL: "https://downloads.example.test/",
    },
    { services: svc },
  );
  worker = await startWorker(st.cfg, silent);
});
afterAll(async () => {
  await worker?.close();
  await st?.stop();
  await new Promise((ok) => receiver?.close(ok));
  await svc?.stop();
});

const client = () =>
  createClient(
    DownloadService,
    createConnectTransport({
      baseUrl: st.server.url,
      httpVersion: "1.1",
      interceptors: [bearer(TOKEN)],
    }),
  );

const codeOf = async (p: Promise<unknown>) =>
  ConnectError.from(
    await p.then(
      () => undefined,
      (e: unknown) => e,
    ),
  ).code;

async function webhookOf(jobId: string, state: WebhookState) {
  await expect
    .poll(async () => (await client().getStatus({ jobId })).job?.webhook?.state, {
      interval: 100,
    })
    .toBe(state);
  return (await client().getStatus({ jobId })).job?.webhook;
}

/** What a receiver does with the header: recompute the HMAC over "<t>.<body>". */
function verify(r: Received): boolean {
  const header = String(r.headers["download-jobs-signature"] ?? "");
  const t = /t=(\d+)/.exec(header)?.[1] ?? "";
  const v1 = /v1=([0-9a-f]{64})/.exec(header)?.[1] ?? "";
  const expected = createHmac("sha256", SECRET).update(`${t}.${r.body}`).digest("hex");
  return v1 === expected && Math.abs(Date.now() / 1000 - Number(t)) < 300;
}

describe("delivery", () => {
  test("a completed job is POSTed once, signed, as GetStatus's JSON; the job shows the delivery", async () => {
    const path = "/hooks/completed";
    const { job } = await client().initiate({
      fileIds: [201, 202],
      callbackUrl: `${hookBase}${path}`,
      labels: { order: "ORD-42" },
    });
    const jobId = job?.jobId ?? "";
    const webhook = await webhookOf(jobId, WebhookState.DELIVERED);
    expect(webhook).toMatchObject({
      callbackUrl: `${hookBase}${path}`,
      attempts: 1,
      lastStatusCode: 200,
      lastError: "",
    });
    expect(webhook?.deliveredTime).toBeDefined();

    const mine = received.filter((r) => r.path === path);
    expect(mine).toHaveLength(1);
    const hook = mine[0] as Received;
    expect(hook.headers["content-type"]).toBe("application/json");
    expect(verify(hook)).toBe(true);
    // A tampered body fails the same check.
    expect(
      verify({ ...hook, body: hook.body.replace("JOB_STATE_COMPLETED", "JOB_STATE_FAILED") }),
    ).toBe(false);

    const posted = JSON.parse(hook.body) as { job: Record<string, any> };
    const polled = (await (
      await fetch(`${st.server.url}${SERVICE}/GetStatus`, {
        method: "POST",
        headers: { "content-type": "application/json", authorization: `Bearer ${TOKEN}` },
        body: JSON.stringify({ jobId }),
      })
    ).json()) as { job: Record<string, any> };
    for (const field of ["jobId", "state", "fileIds", "files", "createTime", "endTime", "labels"]) {
      expect(posted.job[field], field).toEqual(polled.job[field]);
    }
    expect(posted.job.state).toBe("JOB_STATE_COMPLETED");
    expect(posted.job.labels).toEqual({ order: "ORD-42" });
    expect(posted.job.result.sha256).toBe(polled.job.result.sha256);
    // The posted download URL works.
    expect((await fetch(posted.job.result.downloadUrl as string)).status).toBe(200);
    // So does the stable link, the same as GetStatus's: absolute at PUBLIC_URL, and
    // answered by this API (the receiver would reach it at that address).
    const link = posted.job.result.linkUrl as string;
    expect(link).toBe(polled.job.result.linkUrl);
    expect(link).toMatch(
      new RegExp(`^https://downloads\\.example\\.test/d/${jobId}\\?exp=\\d+&sig=[\\w-]+$`),
    );
    const viaApi = await fetch(`${st.server.url}${new URL(link).pathname}${new URL(link).search}`, {
      redirect: "manual",
    });
    expect(viaApi.status).toBe(302);
  });

  test("a receiver that fails is called again with backoff until it answers 2xx", async () => {
    const path = "/hooks/flaky";
    script.set(path, [503, 500]);
    const { job } = await client().initiate({ fileIds: [201], callbackUrl: `${hookBase}${path}` });
    const webhook = await webhookOf(job?.jobId ?? "", WebhookState.DELIVERED);
    expect(webhook).toMatchObject({ attempts: 3, lastStatusCode: 200 });
    const calls = received.filter((r) => r.path === path);
    expect(calls).toHaveLength(3);
    expect(calls.every(verify)).toBe(true);
  });

  test("after WEBHOOK_ATTEMPTS failures the delivery is given up and the job says so", async () => {
    const path = "/hooks/down";
    script.set(path, [500, 500, 500, 500, 500]);
    const { job } = await client().initiate({ fileIds: [202], callbackUrl: `${hookBase}${path}` });
    const webhook = await webhookOf(job?.jobId ?? "", WebhookState.FAILED);
    expect(webhook).toMatchObject({ attempts: 3, lastStatusCode: 500 });
    expect(webhook?.lastError).toMatch(/500/);
    expect(received.filter((r) => r.path === path)).toHaveLength(3);
  });

  test("a cancelled job is posted too, even when no worker was up at the time", async () => {
    const path = "/hooks/cancelled";
    const idle = await startApiStack(
      {
        AUTH_TOKENS: authTokens({ hooks: TOKEN }),
        WEBHOOK_SECRET: SECRET,
        WEBHOOK_ALLOWED_HOSTS: "127.0.0.1/32",
      },
      { services: svc },
    );
    let w: RunningWorker | undefined;
    try {
      const c = createClient(
        DownloadService,
        createConnectTransport({
          baseUrl: idle.server.url,
          httpVersion: "1.1",
          interceptors: [bearer(TOKEN)],
        }),
      );
      const { job } = await c.initiate({ fileIds: [201], callbackUrl: `${hookBase}${path}` });
      const jobId = job?.jobId ?? "";
      expect((await c.cancel({ jobId })).job?.state).toBe(JobState.CANCELLED);
      // The callback was owed from the moment the job ended; a worker started later pays it.
      w = await startWorker(idle.cfg, silent);
      await expect
        .poll(() => received.filter((r) => r.path === path).length, { timeout: 30_000 })
        .toBe(1);
      const hook = received.find((r) => r.path === path) as Received;
      expect(verify(hook)).toBe(true);
      const posted = JSON.parse(hook.body) as { job: { jobId: string; state: string } };
      expect(posted.job).toMatchObject({ jobId, state: "JOB_STATE_CANCELLED" });
    } finally {
      await w?.close();
      await idle.stop();
    }
  });
});

describe("where a webhook may go", () => {
  test("Initiate refuses non-http(s), credentials, and private, loopback or link-local targets", async () => {
    const strict = await startApiStack(
      { AUTH_TOKENS: authTokens({ hooks: TOKEN }), WEBHOOK_SECRET: SECRET },
      { services: svc },
    );
    try {
      const c = createClient(
        DownloadService,
        createConnectTransport({
          baseUrl: strict.server.url,
          httpVersion: "1.1",
          interceptors: [bearer(TOKEN)],
        }),
      );
      for (const url of [
        `${hookBase}/x`,
        "http://localhost/x",
        "http://[::1]/x",
        "http://[::ffff:127.0.0.1]/x",
        "http://169.254.169.254/latest/meta-data",
        "http://10.1.2.3/x",
        "http://192.168.0.1/x",
        "http://0.0.0.0/x",
        "ftp://example.com/x",
        "file:///etc/passwd",
        "http://user:pw@93.184.215.14/x",
        "not a url",
        `https://${"a".repeat(3000)}.com/`,
      ]) {
        expect(await codeOf(c.initiate({ fileIds: [201], callbackUrl: url })), url).toBe(
          Code.InvalidArgument,
        );
      }
    } finally {
      await strict.stop();
    }
  });

  test("without WEBHOOK_SECRET a callback_url is refused, not silently dropped", async () => {
    const unsigned = await startApiStack(
      { AUTH_TOKENS: authTokens({ hooks: TOKEN }) },
      { services: svc },
    );
    try {
      const c = createClient(
        DownloadService,
        createConnectTransport({
          baseUrl: unsigned.server.url,
          httpVersion: "1.1",
          interceptors: [bearer(TOKEN)],
        }),
      );
      expect(
        await codeOf(c.initiate({ fileIds: [201], callbackUrl: "https://example.com/hook" })),
      ).toBe(Code.InvalidArgument);
    } finally {
      await unsigned.stop();
    }
  });

  test("a name is judged by every address it resolves to, each time it is used", async () => {
    const policy = { allowPrivate: false, allowedHosts: [] };
    const resolvesTo =
      (...addresses: string[]) =>
      async () =>
        addresses.map((address) => ({ address, family: address.includes(":") ? 6 : 4 }));
    const ok = await checkWebhookUrl(
      "https://hooks.example/x",
      policy,
      resolvesTo("93.184.215.14"),
    );
    expect(ok.address).toBe("93.184.215.14");
    for (const addrs of [
      ["10.0.0.5"],
      ["93.184.215.14", "127.0.0.1"],
      ["::ffff:192.168.1.1"],
      ["fd00::1"],
      ["fe80::1"],
    ]) {
      await expect(
        checkWebhookUrl("https://hooks.example/x", policy, resolvesTo(...addrs)),
        addrs.join(),
      ).rejects.toBeInstanceOf(InvalidInputError);
    }
    // Allowed by name, by range, or wholesale.
    await expect(
      checkWebhookUrl(
        "https://hooks.internal/x",
        { allowPrivate: false, allowedHosts: ["hooks.internal"] },
        resolvesTo("10.0.0.5"),
      ),
    ).resolves.toBeDefined();
    await expect(
      checkWebhookUrl(
        "https://h.example/x",
        { allowPrivate: false, allowedHosts: ["10.0.0.0/8"] },
        resolvesTo("10.0.0.5"),
      ),
    ).resolves.toBeDefined();
    await expect(
      checkWebhookUrl(
        "https://h.example/x",
        { allowPrivate: true, allowedHosts: [] },
        resolvesTo("10.0.0.5"),
      ),
    ).resolves.toBeDefined();
  });

  test("a target that became unacceptable by delivery time is not called, and the delivery fails at once", async () => {
    // The API accepted loopback; this worker's configuration does not. The same happens
    // when a public name is re-pointed at an internal address after Initiate.
    const api = await startApiStack(
      {
        AUTH_TOKENS: authTokens({ hooks: TOKEN }),
        WEBHOOK_SECRET: SECRET,
        WEBHOOK_ALLOWED_HOSTS: "127.0.0.1/32",
      },
      { services: svc },
    );
    const w = await startWorker({ ...api.cfg, WEBHOOK_ALLOWED_HOSTS: [] }, silent);
    try {
      const c = createClient(
        DownloadService,
        createConnectTransport({
          baseUrl: api.server.url,
          httpVersion: "1.1",
          interceptors: [bearer(TOKEN)],
        }),
      );
      const path = "/hooks/rebound";
      const { job } = await c.initiate({ fileIds: [201], callbackUrl: `${hookBase}${path}` });
      await expect
        .poll(async () => (await c.getStatus({ jobId: job?.jobId ?? "" })).job?.webhook?.state, {
          interval: 100,
        })
        .toBe(WebhookState.FAILED);
      const webhook = (await c.getStatus({ jobId: job?.jobId ?? "" })).job?.webhook;
      expect(webhook).toMatchObject({ attempts: 1, lastStatusCode: 0 });
      expect(webhook?.lastError).toMatch(/private|loopback/);
      expect(received.filter((r) => r.path === path)).toHaveLength(0);
    } finally {
      await w.close();
      await api.stop();
    }
  });
});
