import { createHash } from "node:crypto";
import { UnrecoverableError, Worker } from "bullmq";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { QUEUE_NAME } from "../core/queue.js";
import { createRedis } from "../core/redis.js";
import { waitUntil } from "../local/ports.js";
import { type ApiStack, startApiStack } from "./helpers/api.js";

// The queue dashboard as an operator meets it: a browser that is asked for the admin
// token, the page and its assets, the JSON its page reads, and a dashboard that refuses
// every change, whoever asks.

const ADMIN_TOKEN = "admin-token-7d1e0c9b2a4f6e8d";
const sha256 = (s: string) => createHash("sha256").update(s).digest("hex");
const basic = (user: string, password: string) =>
  `Basic ${Buffer.from(`${user}:${password}`).toString("base64")}`;

let st: ApiStack;
let failedJobId: string;

beforeAll(async () => {
  st = await startApiStack({ ADMIN_TOKEN_SHA256: sha256(ADMIN_TOKEN) });
  // One failed job in the queue, as an operator would want to retry it.
  const job = await st.queue.add("bundle", { jobId: "x", fileIds: [1] });
  failedJobId = job.id ?? "";
  const conn = createRedis(st.svc.redis.url, { role: "worker" });
  const worker = new Worker(
    QUEUE_NAME,
    async () => {
      throw new UnrecoverableError("broken on purpose");
    },
    { connection: conn, prefix: st.cfg.QUEUE_PREFIX },
  );
  await waitUntil(
    "a failed job",
    async () => (await st.queue.getJobState(failedJobId)) === "failed",
  );
  await worker.close();
  conn.disconnect();
});

afterAll(async () => {
  await st?.stop();
});

const admin = (path: string, init: RequestInit = {}) =>
  fetch(`${st.server.url}/admin/queues${path}`, init);
const bearer = { authorization: `Bearer ${ADMIN_TOKEN}` };

describe("the queue dashboard at /admin/queues", () => {
  test("asks for the admin token: 401 without it or with a wrong one, and a browser gets a password prompt", async () => {
    const none = await admin("");
    expect(none.status).toBe(401);
    expect(none.headers.get("www-authenticate")).toMatch(/^Basic realm=/);
    expect((await admin("/api/queues")).status).toBe(401);
    expect((await admin("", { headers: { authorization: "Bearer not-the-token" } })).status).toBe(
      401,
    );
    expect(
      (await admin("", { headers: { authorization: basic("admin", "not-the-token") } })).status,
    ).toBe(401);
    // The RPC bearer token of an owner is not the admin token.
    expect(
      (
        await admin("", {
          headers: { authorization: `Bearer ${st.cfg.AUTH_TOKENS?.[0]?.sha256 ?? ""}` },
        })
      ).status,
    ).toBe(401);
  });

  test("with the token (bearer or basic-auth password) serves the page and the assets it loads", async () => {
    for (const authorization of [bearer.authorization, basic("anyone", ADMIN_TOKEN)]) {
      const page = await admin("", { headers: { authorization } });
      expect(page.status).toBe(200);
      expect(page.headers.get("content-type")).toContain("text/html");
      const html = await page.text();
      expect(html).toContain("download-jobs queues");
      const script = /<script[^>]+src="([^"]+)"/.exec(html)?.[1];
      expect(script).toBeDefined();
      const asset = await fetch(new URL(script as string, `${st.server.url}/admin/queues/`), {
        headers: { authorization },
      });
      expect(asset.status).toBe(200);
      expect((await asset.arrayBuffer()).byteLength).toBeGreaterThan(1000);
    }
  });

  test("lists our queues, read-only, with the failed job", async () => {
    const res = await admin("/api/queues?activeQueue=bundles&status=failed&page=1", {
      headers: bearer,
    });
    expect(res.status).toBe(200);
    const body = (await res.json()) as {
      queues: {
        name: string;
        readOnlyMode: boolean;
        counts: Record<string, number>;
        jobs: { id: string }[];
      }[];
    };
    expect(body.queues.map((q) => q.name).sort()).toEqual(["bundles", "maintenance", "webhooks"]);
    expect(body.queues.every((q) => q.readOnlyMode)).toBe(true);
    const bundles = body.queues.find((q) => q.name === "bundles");
    expect(bundles?.counts.failed).toBe(1);
    expect(bundles?.jobs.map((j) => j.id)).toEqual([failedJobId]);
  });

  test("refuses every change: retry, clean, pause and add answer 405 and the failed job stays failed", async () => {
    for (const [method, path] of [
      ["PUT", "/api/queues/bundles/retry/failed"],
      ["PUT", "/api/queues/bundles/clean/failed"],
      ["PUT", "/api/queues/bundles/pause"],
      ["POST", "/api/queues/bundles/add"],
      ["PUT", `/api/queues/bundles/${failedJobId}/retry/failed`],
    ] as const) {
      const res = await admin(path, {
        method,
        headers: { ...bearer, "content-type": "application/json" },
        body: JSON.stringify({ name: "x", data: {} }),
      });
      expect(res.status, `${method} ${path}`).toBe(405);
    }
    expect(await st.queue.getJobState(failedJobId)).toBe("failed");
    expect(await st.queue.isPaused()).toBe(false);
    expect(await st.queue.getJobCounts("waiting", "failed")).toEqual({ waiting: 0, failed: 1 });
  });

  test("is off (404) when ADMIN_TOKEN_SHA256 is unset, token or not", async () => {
    const other = await startApiStack({}, { services: st.svc });
    try {
      expect((await fetch(`${other.server.url}/admin/queues`)).status).toBe(404);
      expect((await fetch(`${other.server.url}/admin/queues`, { headers: bearer })).status).toBe(
        404,
      );
    } finally {
      await other.stop();
    }
  });
});
