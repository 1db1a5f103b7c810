import { spawn } from "node:child_process";
import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { type Client, Code, ConnectError, createClient } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import type { Browser } from "playwright-core";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { newJobId } from "../core/jobs.js";
import { DownloadService } from "../gen/downloads/v1/download_service_pb.js";
import { WatchTokens } from "../server/rpc/watch-token.js";
import { type ApiStack, startApiStack, TEST_AUTH_HEADER, withTestToken } from "./helpers/api.js";
import { launchChromium } from "./helpers/chromium.js";
import { readEvents } from "./helpers/sse.js";
import { tamper } from "./helpers/tamper.js";

// A job's server-sent events as EventSource, curl -N and a plain fetch read them, with
// the owner's bearer token or a scoped watch token, from this origin and another.

const SECRET = "test-watch-token-secret-0123456789abcdef";
const HEARTBEAT_MS = 300;

let st: ApiStack;
let client: Client<typeof DownloadService>;

beforeAll(async () => {
  st = await startApiStack({
    WATCH_TOKEN_SECRET: SECRET,
    WATCH_HEARTBEAT_MS: String(HEARTBEAT_MS),
  });
  client = createClient(
    DownloadService,
    createConnectTransport({
      baseUrl: st.server.url,
      httpVersion: "1.1",
      interceptors: [withTestToken],
    }),
  );
});
afterAll(async () => {
  await st?.stop();
});

const newJob = async () => (await client.initiate({ fileIds: [1, 2] })).job?.jobId ?? "";

const eventsUrl = (jobId: string) => `${st.server.url}/v1/jobs/${jobId}/events`;

describe("the owner, with the bearer token", () => {
  test("gets the snapshot, each change with id = version, heartbeats (a queued job's with its estimate), and the end", async () => {
    const jobId = await newJob();
    const r = readEvents(eventsUrl(jobId), TEST_AUTH_HEADER);
    await expect.poll(() => r.jobs().length, { timeout: 30_000 }).toBe(1);
    const res = r.response();
    expect(res?.headers.get("content-type")).toMatch(/^text\/event-stream/);
    expect(res?.headers.get("x-accel-buffering")).toBe("no");
    expect(res?.headers.get("cache-control")).toContain("no-transform");
    expect(res?.headers.get("access-control-allow-origin")).toBe("*");
    // While queued, a heartbeat says where the job stands: `event: estimate`, no id.
    await expect
      .poll(() => r.events.find((e) => e.event === "estimate"), { timeout: 30_000 })
      .toBeDefined();
    const estimate = r.events.find((e) => e.event === "estimate");
    expect(estimate?.id).toBeUndefined();
    expect(JSON.parse(estimate?.data ?? "{}")).toMatchObject({
      heartbeat: { version: 1, estimate: { position: expect.any(Number) } },
    });

    // Once running, heartbeats are comments.
    await st.startJob(jobId);
    await expect
      .poll(() => r.events.some((e) => e.comment?.startsWith("heartbeat")), { timeout: 30_000 })
      .toBe(true);
    await st.progress(jobId, 500, 1000);
    await st.complete(jobId, Buffer.from("PK zip"));
    await r.done;
    const jobs = r.jobs();
    for (const { id, job } of jobs) expect(id).toBe(job.version);
    // Progress within one state may be coalesced for a slow reader; states never are.
    const states = jobs.map((j) => j.job.state).filter((s, i, all) => all[i - 1] !== s);
    expect(states).toEqual(["JOB_STATE_QUEUED", "JOB_STATE_PROCESSING", "JOB_STATE_COMPLETED"]);
    const versions = jobs.map((j) => j.id);
    expect(versions).toEqual([...versions].sort((a, b) => a - b));
    expect(r.events.at(-1)?.event).toBe("end");
  });

  test("resumes after Last-Event-ID, and a reconnect after the end gets 204", async () => {
    const jobId = await newJob();
    await st.startJob(jobId);
    const v = (await st.progress(jobId, 100, 1000)).version;
    const r = readEvents(eventsUrl(jobId), { ...TEST_AUTH_HEADER, "last-event-id": String(v) });
    // Nothing new yet: a heartbeat at once, no job.
    await expect
      .poll(() => r.events.some((e) => e.comment?.startsWith("heartbeat")), { timeout: 30_000 })
      .toBe(true);
    expect(r.jobs()).toEqual([]);
    await st.complete(jobId, Buffer.from("PK zip"));
    await r.done;
    expect(r.jobs().map((j) => j.id)).toEqual([v + 1]);

    const after = await fetch(eventsUrl(jobId), {
      headers: { ...TEST_AUTH_HEADER, "last-event-id": String(v + 1) },
    });
    expect(after.status).toBe(204);
  });

  test("curl -N follows it to the end", async () => {
    const jobId = await newJob();
    const curl = spawn("curl", [
      "-sN",
      "-H",
      TEST_AUTH_HEADER.authorization.replace(/^/, "Authorization: "),
      eventsUrl(jobId),
    ]);
    let text = "";
    curl.stdout.on("data", (d: Buffer) => {
      text += d.toString();
    });
    const exited = new Promise<number | null>((resolve) => curl.on("close", resolve));
    await expect.poll(() => text.includes("id: 1\n"), { timeout: 30_000 }).toBe(true);
    await st.startJob(jobId);
    await expect.poll(() => text.includes("id: 2\n"), { timeout: 30_000 }).toBe(true);
    await client.cancel({ jobId });
    expect(await exited).toBe(0);
    expect(text).toContain("JOB_STATE_CANCELLED");
    expect(text).toContain("event: end");
  });

  test("a page of another origin may ask first (CORS preflight)", async () => {
    const res = await fetch(eventsUrl(await newJob()), {
      method: "OPTIONS",
      headers: {
        origin: "https://elsewhere.example",
        "access-control-request-method": "GET",
        "access-control-request-headers": "authorization, last-event-id",
      },
    });
    expect(res.status).toBe(204);
    expect(res.headers.get("access-control-allow-origin")).toBe("*");
    expect(res.headers.get("access-control-allow-headers")).toContain("last-event-id");
    expect(res.headers.get("access-control-allow-methods")).toContain("GET");
  });

  test("bad requests get an HTTP status and a Connect error saying what is wrong", async () => {
    const noToken = await fetch(eventsUrl(await newJob()));
    expect(noToken.status).toBe(401);
    expect(((await noToken.json()) as { code: string }).code).toBe("unauthenticated");

    const unknown = await fetch(eventsUrl(newJobId()), { headers: TEST_AUTH_HEADER });
    expect(unknown.status).toBe(404);
    const badId = await fetch(eventsUrl("not-a-job"), { headers: TEST_AUTH_HEADER });
    expect(badId.status).toBe(400);
    const badResume = await fetch(eventsUrl(await newJob()), {
      headers: { ...TEST_AUTH_HEADER, "last-event-id": "yesterday" },
    });
    expect(badResume.status).toBe(400);
    expect(((await badResume.json()) as { message: string }).message).toContain("Last-Event-ID");
  });
});

describe("a scoped watch token", () => {
  test("lets anyone holding it follow that job only, until it expires", async () => {
    const jobId = await newJob();
    const made = await client.createWatchToken({ jobId, ttl: { seconds: 120n } });
    expect(made.eventsPath).toBe(
      `/v1/jobs/${jobId}/events?access_token=${encodeURIComponent(made.token)}`,
    );
    expect(Number(made.expireTime?.seconds ?? 0n) * 1000).toBeGreaterThan(Date.now());

    // No bearer token: the scoped token alone.
    const r = readEvents(`${st.server.url}${made.eventsPath}`);
    await expect.poll(() => r.jobs().length, { timeout: 30_000 }).toBe(1);
    await client.cancel({ jobId });
    await r.done;
    expect(r.jobs().at(-1)?.job.state).toBe("JOB_STATE_CANCELLED");

    // As a bearer token too.
    const asBearer = await fetch(eventsUrl(jobId), {
      headers: { authorization: `Bearer ${made.token}` },
    });
    expect(asBearer.status).toBe(200);
    await asBearer.body?.cancel();

    const other = await newJob();
    const wrongJob = await fetch(
      `${eventsUrl(other)}?access_token=${encodeURIComponent(made.token)}`,
    );
    expect(wrongJob.status).toBe(403);
    const wrong = (await wrongJob.json()) as { code: string; message: string };
    expect(wrong.code).toBe("permission_denied");
    expect(wrong.message).toContain(`is for job ${jobId}`);

    const altered = tamper(made.token);
    const forged = await fetch(`${eventsUrl(jobId)}?access_token=${encodeURIComponent(altered)}`);
    expect(forged.status).toBe(401);
    expect(((await forged.json()) as { message: string }).message).toContain("signature");

    // Made by this server's secret two hours ago with a ten-minute life.
    const old = new WatchTokens(SECRET).create(jobId, st.owner, undefined, Date.now() - 7_200_000);
    const expired = await fetch(
      `${eventsUrl(jobId)}?access_token=${encodeURIComponent(old.token)}`,
    );
    expect(expired.status).toBe(401);
    const exp = (await expired.json()) as { code: string; message: string };
    expect(exp.code).toBe("unauthenticated");
    expect(exp.message).toContain("expired");

    const malformed = await fetch(`${eventsUrl(jobId)}?access_token=abc`);
    expect(malformed.status).toBe(401);
    expect(((await malformed.json()) as { message: string }).message).toContain("malformed");
  });

  test("CreateWatchToken refuses unknown jobs, bad lifetimes, and a server without a secret", async () => {
    const unknown = await client
      .createWatchToken({ jobId: newJobId() })
      .catch((e: unknown) => ConnectError.from(e));
    expect((unknown as ConnectError).code).toBe(Code.NotFound);
    const tooLong = await client
      .createWatchToken({ jobId: await newJob(), ttl: { seconds: 86_400n } })
      .catch((e: unknown) => ConnectError.from(e));
    expect((tooLong as ConnectError).code).toBe(Code.InvalidArgument);
    expect((tooLong as ConnectError).rawMessage).toContain("at most 3600 s");

    const off = await startApiStack({}, { services: st.svc });
    try {
      const c = createClient(
        DownloadService,
        createConnectTransport({
          baseUrl: off.server.url,
          httpVersion: "1.1",
          interceptors: [withTestToken],
        }),
      );
      const jobId = (await c.initiate({ fileIds: [1] })).job?.jobId ?? "";
      const err = await c.createWatchToken({ jobId }).catch((e: unknown) => ConnectError.from(e));
      expect((err as ConnectError).code).toBe(Code.FailedPrecondition);
      expect((err as ConnectError).rawMessage).toContain("WATCH_TOKEN_SECRET");
    } finally {
      await off.stop();
    }
  });
});

describe("EventSource in Chromium, on a page of another origin", () => {
  let browser: Browser;
  let page: Server;
  let pageUrl: string;

  beforeAll(async () => {
    page = createServer((_req, res) => {
      res.writeHead(200, { "content-type": "text/html; charset=utf-8" });
      res.end("<!doctype html><title>elsewhere</title><ul id=log></ul>");
    });
    await new Promise<void>((resolve) => page.listen(0, "127.0.0.1", resolve));
    // Another origin: another port (and localhost rather than 127.0.0.1).
    pageUrl = `http://localhost:${(page.address() as AddressInfo).port}/`;
    browser = await launchChromium();
  }, 120_000);
  afterAll(async () => {
    await browser?.close();
    await new Promise((resolve) => page?.close(resolve));
  });

  test("follows the job with a scoped token and stops after the end", async () => {
    const jobId = await newJob();
    const { eventsPath } = await client.createWatchToken({ jobId });
    const tab = await browser.newPage();
    try {
      await tab.goto(pageUrl);
      await tab.evaluate((url) => {
        const w = window as unknown as { states: string[]; ended: boolean; closed: boolean };
        w.states = [];
        w.ended = false;
        const es = new EventSource(url);
        es.onmessage = (e) =>
          w.states.push((JSON.parse(e.data) as { job: { state: string } }).job.state);
        es.addEventListener("end", () => {
          w.ended = true;
          es.close();
        });
      }, `${st.server.url}${eventsPath}`);
      const states = () =>
        tab.evaluate(() => (window as unknown as { states: string[] }).states.join(","));
      await expect.poll(states, { timeout: 30_000 }).toBe("JOB_STATE_QUEUED");
      await st.startJob(jobId);
      await expect.poll(states, { timeout: 30_000 }).toContain("JOB_STATE_PROCESSING");
      await st.complete(jobId, Buffer.from("PK zip"));
      await expect
        .poll(() => tab.evaluate(() => (window as unknown as { ended: boolean }).ended), {
          timeout: 30_000,
        })
        .toBe(true);
      expect(await states()).toBe("JOB_STATE_QUEUED,JOB_STATE_PROCESSING,JOB_STATE_COMPLETED");
    } finally {
      await tab.close();
    }
  });
});
