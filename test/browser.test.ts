import { createHash } from "node:crypto";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { request } from "node:http";
import { connect as connectH2 } from "node:http2";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { pino } from "pino";
import {
  type Browser,
  type BrowserContext,
  chromium,
  type Locator,
  type Page,
} from "playwright-core";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { createDownloadClient } from "../clients/lib/client.js";
import { loadConfig } from "../core/config.js";
import { recordRun } from "../core/forecast.js";
import { JobStore } from "../core/job-store.js";
import { newJobId, newJobRecord } from "../core/jobs.js";
import { SAMPLE_FILES, sampleStream, seedSamples } from "../local/samples.js";
import { buildWeb } from "../scripts/build-web.js";
import { type ApiServer, startApiServer } from "../server/server.js";
import { type RunningWorker, startWorker } from "../worker/worker.js";
import { type ApiStack, startApiStack } from "./helpers/api.js";
import { readZip } from "./helpers/zip.js";

// The page as a person uses it, in real Chromium, against the real API and a worker:
// start a job, watch the bar move, reload and find the same job, cancel one, download
// the ZIP and check its bytes, and read a plain-words message when the API goes away.

const ROOT = resolve(import.meta.dirname, "..");
const SHOTS = resolve(ROOT, "test-output/screenshots");
const CHROMIUM = "/usr/bin/chromium";
const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];
// 1 + 2 + 3 MB of samples at 1 MB/s: the three-file job runs about 6 s.
const THROTTLE = "1000000";
const USED = SAMPLE_FILES.slice(0, 3);
/** 5 MB and 13 MB, for jobs that must still be running when the test looks. */
const LONGER = SAMPLE_FILES[3];
const LONGEST = SAMPLE_FILES[5];
const silent = pino({ level: "silent" });
// vitest polls for 1 s by default; a page load on a busy 2-core machine can take longer.
const PATIENCE = { timeout: 30_000 };
// The API requires a bearer token (AUTH_TOKENS holds its SHA-256); the page asks for it.
const TOKEN = "browser-test-token";
const AUTH = {
  AUTH_TOKENS: `browser:${createHash("sha256").update(TOKEN).digest("hex")}`,
  AUTH_DISABLED: "false",
};

/** Signs the stable download links (result.link_url) the page offers. */
const LINK_SECRET = "browser-test-link-secret-0123456789abcdef";

let st: ApiStack;
let worker: RunningWorker;
let browser: Browser;
let dist: string;
let devDist: string;
const sources = new Map<string, Buffer>();
const extraServers: ApiServer[] = [];

async function sampleBytes(fileId: number, size: number): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const c of sampleStream(fileId, size)) chunks.push(c as Buffer);
  return Buffer.concat(chunks);
}

beforeAll(async () => {
  const tmp = mkdtempSync(join(tmpdir(), "dj-web-"));
  dist = join(tmp, "prod");
  devDist = join(tmp, "dev");
  await Promise.all([buildWeb({ outDir: dist }), buildWeb({ outDir: devDist, development: true })]);
  st = await startApiStack({
    ...AUTH,
    WEB_ROOT: dist,
    THROTTLE_BYTES_PER_SECOND: THROTTLE,
    PROGRESS_INTERVAL_MS: "100",
    DOWNLOAD_LINK_SECRET: LINK_SECRET,
  });
  await seedSamples(st.svc.storage, {
    files: [...USED, LONGER, LONGEST].filter((f) => f !== undefined),
  });
  for (const f of USED) sources.set(f.fileName, await sampleBytes(f.fileId, f.sizeBytes));
  worker = await startWorker(st.cfg, silent);
  if (!existsSync(CHROMIUM))
    throw new Error(`${CHROMIUM} is missing: apt-get install -y chromium (CI's .ci/run does)`);
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: CHROMIUM_ARGS,
    headless: true,
  });
  mkdirSync(SHOTS, { recursive: true });
});

afterAll(async () => {
  await browser?.close();
  for (const s of extraServers) await s.close();
  await worker?.close();
  await st?.stop();
  if (dist !== undefined) rmSync(resolve(dist, ".."), { recursive: true, force: true });
});

/** A fresh browser profile on the page, with the token entered unless `token` is false. */
async function newPage(
  base = st.server.url,
  opts: { token?: boolean } = {},
): Promise<{ ctx: BrowserContext; page: Page }> {
  const ctx = await browser.newContext({ acceptDownloads: true });
  const page = await ctx.newPage();
  await page.goto(base);
  if (opts.token !== false) await enterToken(page);
  return { ctx, page };
}

async function enterToken(page: Page): Promise<void> {
  await page.getByLabel("Access token").fill(TOKEN);
  await page.getByRole("button", { name: "Use token" }).click();
  await expect
    .poll(() => page.evaluate(() => localStorage.getItem("download-jobs.token")), PATIENCE)
    .toBe(TOKEN);
}

/** The API's config for another server on the same Redis, S3 and queue prefix. */
function apiConfig(overrides: Record<string, string>) {
  return loadConfig({
    ...st.svc.env,
    ...AUTH,
    DOWNLOAD_LINK_SECRET: LINK_SECRET,
    QUEUE_PREFIX: st.cfg.QUEUE_PREFIX,
    PORT: "0",
    HOST: "127.0.0.1",
    ...overrides,
  });
}

/** Ticks the files, presses Start and returns the new job's id once the page shows it. */
async function startJob(page: Page, fileNames: string[]): Promise<string> {
  const id = page.getByTestId("job-id");
  const before = (await id.count()) > 0 ? await id.getAttribute("title") : null;
  for (const name of fileNames)
    await page.getByRole("checkbox", { name: new RegExp(`^${name} `) }).check();
  await page.getByRole("button", { name: "Start download" }).click();
  let now: string | null = null;
  await expect
    .poll(async () => {
      now = await attr(id, "title");
      return now !== null && now !== before && /^[0-9a-f-]{36}$/.test(now);
    })
    .toBe(true);
  return now ?? "";
}

const overall = (page: Page) => page.getByRole("progressbar", { name: "Overall progress" });

// Playwright's own web-first assertions live in @playwright/test; here vitest polls the
// locators instead, each read bounded so one poll never hangs.
const text = (loc: Locator) => loc.textContent({ timeout: 1_000 }).catch(() => null);
const attr = (loc: Locator, name: string) =>
  loc.getAttribute(name, { timeout: 1_000 }).catch(() => null);
const stateText = (page: Page) => text(page.getByRole("status"));

async function valueNow(page: Page): Promise<number> {
  const v = await overall(page)
    .getAttribute("aria-valuenow", { timeout: 1_000 })
    .catch(() => null);
  return v === null ? -1 : Number(v);
}

function shot(page: Page, name: string): Promise<Buffer> {
  return page.screenshot({ path: join(SHOTS, `${name}.png`), fullPage: true });
}

/** A raw HTTP/1.1 GET, so paths reach the server exactly as written (fetch would normalise them). */
function rawGet(
  path: string,
  headers: Record<string, string> = {},
): Promise<{
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: string;
}> {
  const url = new URL(st.server.url);
  return new Promise((resolveGet, reject) => {
    const req = request(
      { host: url.hostname, port: url.port, path, method: "GET", headers },
      (res) => {
        const chunks: Buffer[] = [];
        res.on("data", (c: Buffer) => chunks.push(c));
        res.on("end", () =>
          resolveGet({
            status: res.statusCode ?? 0,
            headers: res.headers,
            body: Buffer.concat(chunks).toString(),
          }),
        );
        res.on("error", reject);
      },
    );
    req.on("error", reject);
    req.end();
  });
}

describe("the page at /", () => {
  test("is served with its content types, an ETag, cache headers, and nothing outside the build", async () => {
    const page = await rawGet("/");
    expect(page.status).toBe(200);
    expect(page.headers["content-type"]).toBe("text/html; charset=utf-8");
    expect(page.headers["cache-control"]).toBe("no-cache");
    expect(page.headers["content-security-policy"]).toContain("default-src 'self'");
    const etag = String(page.headers.etag);
    expect((await rawGet("/", { "if-none-match": etag })).status).toBe(304);

    const script = /src="(\/assets\/main-[^"]+\.js)"/.exec(page.body)?.[1];
    const style = /href="(\/assets\/styles-[^"]+\.css)"/.exec(page.body)?.[1];
    expect(script).toBeDefined();
    const js = await rawGet(script ?? "");
    expect(js.status).toBe(200);
    expect(js.headers["content-type"]).toBe("text/javascript; charset=utf-8");
    expect(js.headers["cache-control"]).toBe("public, max-age=31536000, immutable");
    expect(js.body).toBe(readFileSync(join(dist, script ?? "")).toString());
    expect((await rawGet(style ?? "")).headers["content-type"]).toBe("text/css; charset=utf-8");

    for (const path of [
      "/../package.json",
      "/assets/../index.html",
      "/assets/..%2f..%2fpackage.json",
      "/assets/%2e%2e%2findex.html",
      "/assets/..%5cindex.html",
      "/assets/.hidden",
      "/assets/missing.js",
      "/package.json",
      "/clients/web/app.tsx",
    ]) {
      expect((await rawGet(path)).status, path).toBe(404);
    }
  });

  test("is served over h2c too, as HTTP/2 clients on the same port see it", async () => {
    const session = connectH2(st.server.url);
    try {
      const head = await new Promise<Record<string, unknown>>((resolveHead, reject) => {
        const req = session.request({ ":path": "/", ":method": "GET" });
        req.on("response", (h) => resolveHead(h));
        req.on("error", reject);
        req.resume();
        req.end();
      });
      expect(head[":status"]).toBe(200);
      expect(head["content-type"]).toBe("text/html; charset=utf-8");
      expect(head.etag).toMatch(/^"[\w-]+"$/);
    } finally {
      session.close();
    }
  });

  test("an empty WEB_ROOT serves no page, the API still answers", async () => {
    const cfg = apiConfig({ WEB_ROOT: "" });
    expect(cfg.WEB_ROOT).toBe("");
    const server = await startApiServer(cfg, silent);
    extraServers.push(server);
    expect((await fetch(`${server.url}/`)).status).toBe(404);
    const res = await fetch(`${server.url}/downloads.v1.DownloadService/GetStatus`, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: `Bearer ${TOKEN}` },
      body: JSON.stringify({ jobId: "00000000-0000-4000-8000-000000000000" }),
    });
    expect(res.status).toBe(404);
    expect(((await res.json()) as { code: string }).code).toBe("not_found");
  });
});

describe("in Chromium", () => {
  let completedPage: Page | undefined;
  let completedCtx: BrowserContext | undefined;
  let completedJobId = "";

  test("a job's bar advances, a reload resumes the same job, and it ends Ready", async () => {
    const { ctx, page } = await newPage(st.server.url, { token: false });
    await expect.poll(() => page.getByRole("checkbox").count(), PATIENCE).toBe(SAMPLE_FILES.length);
    // Without the token the service refuses, and the page says what to do.
    await page.getByRole("checkbox", { name: new RegExp(`^${USED[0]?.fileName ?? ""} `) }).check();
    await page.getByRole("button", { name: "Start download" }).click();
    await expect
      .poll(() => text(page.getByRole("alert")), PATIENCE)
      .toContain("needs an access token");
    await enterToken(page);

    const jobId = await startJob(
      page,
      USED.map((f) => f.fileName),
    );

    // The bar moves while the job runs: two increasing values seen before the end.
    await expect.poll(() => valueNow(page), { interval: 100 }).toBeGreaterThan(0);
    const first = await valueNow(page);
    expect(first).toBeLessThan(100);
    await expect.poll(() => valueNow(page), { interval: 100 }).toBeGreaterThan(first);
    const beforeReload = await valueNow(page);
    expect(beforeReload).toBeLessThan(100);
    await expect.poll(() => stateText(page), PATIENCE).toBe("Preparing");
    expect(await attr(overall(page), "aria-valuetext")).toMatch(/^\d+%, [\d.]+ [kM]?B of 6\.0 MB/);
    await shot(page, "1-job-running");

    await page.reload();
    await expect.poll(() => attr(page.getByTestId("job-id"), "title"), PATIENCE).toBe(jobId);
    // Resumed, not restarted: the bar continues from where it was (or the job is done).
    await expect.poll(() => valueNow(page), { interval: 50 }).toBeGreaterThanOrEqual(beforeReload);
    await shot(page, "2-after-reload");

    await expect.poll(() => stateText(page), { timeout: 30_000 }).toBe("Ready");
    expect(await valueNow(page)).toBe(100);
    for (const f of USED) {
      expect(
        await attr(page.getByRole("progressbar", { name: f.fileName }), "aria-valuenow"),
        f.fileName,
      ).toBe("100");
    }
    expect(await page.evaluate(() => localStorage.getItem("download-jobs.current-job"))).toBe(
      jobId,
    );
    await expect
      .poll(() => text(page.getByRole("button", { name: new RegExp(jobId.slice(0, 8)) })), PATIENCE)
      .toContain("Ready");
    expect((await st.store.get(jobId)).state).toBe("COMPLETED");
    await shot(page, "3-completed");
    completedPage = page;
    completedCtx = ctx;
    completedJobId = jobId;
  });

  test("the download link saves the ZIP with every file's bytes", async () => {
    expect(completedPage).toBeDefined();
    const page = completedPage as Page;
    const link = page.getByRole("link", { name: /^Download download-.*\.zip$/ });
    const [download] = await Promise.all([page.waitForEvent("download"), link.click()]);
    expect(download.suggestedFilename()).toMatch(
      new RegExp(`^download-.*${completedJobId.slice(0, 8)}.*\\.zip$`),
    );
    const path = await download.path();
    const entries = await readZip(readFileSync(path));
    expect([...entries.keys()].sort()).toEqual([...sources.keys()].sort());
    for (const [name, bytes] of sources) expect(entries.get(name)?.equals(bytes), name).toBe(true);
  });

  test("Cancel stops a running job and the page says Cancelled", async () => {
    // A second tab of the same browser: it opens on the job the first one watched.
    expect(completedCtx).toBeDefined();
    const page = await (completedCtx as BrowserContext).newPage();
    await page.goto(st.server.url);
    await expect
      .poll(() => attr(page.getByTestId("job-id"), "title"), PATIENCE)
      .toBe(completedJobId);
    const third = USED[2]?.fileName ?? "";
    const jobId = await startJob(page, [third]);
    await expect.poll(() => valueNow(page), { interval: 100 }).toBeGreaterThan(0);
    await page.getByRole("button", { name: "Cancel job" }).click();
    await expect.poll(() => stateText(page)).toBe("Cancelled");
    expect(await page.getByRole("button", { name: "Cancel job" }).count()).toBe(0);
    await expect.poll(async () => (await st.store.get(jobId)).state).toBe("CANCELLED");
    await expect
      .poll(() => text(page.getByRole("button", { name: new RegExp(jobId.slice(0, 8)) })), PATIENCE)
      .toContain("Cancelled");
    await shot(page, "4-cancelled");

    // The earlier, completed job is still listed; choosing it shows it again.
    await page.getByRole("button", { name: new RegExp(completedJobId.slice(0, 8)) }).click();
    await expect
      .poll(() => attr(page.getByTestId("job-id"), "title"), PATIENCE)
      .toBe(completedJobId);
    await expect.poll(() => stateText(page), PATIENCE).toBe("Ready");
  });

  test("Your jobs comes from the server: another browser sees them, filters by state, retries and deletes", async () => {
    expect(completedJobId).not.toBe("");
    // A fresh profile: nothing in localStorage, the list is ListJobs'.
    const { ctx, page } = await newPage();
    const rows = page.locator("li.job-row");
    const row = (id: string) => page.locator(`li.job-row[data-job-id="${id}"]`);
    await expect.poll(() => rows.count(), PATIENCE).toBeGreaterThanOrEqual(2);
    await expect.poll(() => text(row(completedJobId)), PATIENCE).toContain("Ready");

    await page.getByLabel("Show").selectOption({ label: "Cancelled" });
    await expect
      .poll(
        async () => (await rows.allTextContents()).every((t) => t.includes("Cancelled")),
        PATIENCE,
      )
      .toBe(true);
    await expect.poll(() => rows.count(), PATIENCE).toBe(1);
    const cancelledId = (await attr(rows.first(), "data-job-id")) ?? "";
    expect((await st.store.get(cancelledId)).state).toBe("CANCELLED");
    await shot(page, "5-list-cancelled");

    // Retry: the same job runs again and the page follows it to the end.
    await rows.first().getByRole("button", { name: "Retry" }).click();
    await expect.poll(() => attr(page.getByTestId("job-id"), "title"), PATIENCE).toBe(cancelledId);
    await expect.poll(() => stateText(page), { timeout: 60_000 }).toBe("Ready");
    expect((await st.store.get(cancelledId)).state).toBe("COMPLETED");

    // Delete the first completed job: gone from the list and from the server.
    await page.getByLabel("Show").selectOption({ label: "All" });
    await expect.poll(() => row(completedJobId).count(), PATIENCE).toBe(1);
    await row(completedJobId).getByRole("button", { name: "Delete" }).click();
    await expect.poll(() => row(completedJobId).count(), PATIENCE).toBe(0);
    await expect(st.store.get(completedJobId)).rejects.toThrow(/not found/);
    await shot(page, "6-list-after-delete");
    await ctx.close();
  });

  test("under React StrictMode (development build) a reload leaves one WatchJob stream open", async () => {
    const cfg = apiConfig({ WEB_ROOT: devDist });
    const server = await startApiServer(cfg, silent);
    extraServers.push(server);
    const ctx = await browser.newContext();
    const page = await ctx.newPage();
    await page.goto(server.url);
    await enterToken(page);
    await startJob(page, [LONGEST?.fileName ?? ""]);
    await expect.poll(() => valueNow(page), { interval: 100 }).toBeGreaterThan(0);

    // Loading with a job to resume is when StrictMode mounts the hook twice.
    const open = new Set<unknown>();
    page.on("request", (r) => {
      if (r.url().endsWith("/WatchJob")) open.add(r);
    });
    page.on("requestfinished", (r) => open.delete(r));
    page.on("requestfailed", (r) => open.delete(r));
    await page.reload();
    await expect.poll(() => valueNow(page), { interval: 100 }).toBeGreaterThan(0);
    await expect.poll(() => open.size).toBe(1);
    // Still running, so that 1 is not a second stream ending with the job.
    expect(await stateText(page)).toBe("Preparing");
    // The stream ends with the job (cancelled here, to spare the wait).
    await page.getByRole("button", { name: "Cancel job" }).click();
    await expect.poll(() => stateText(page), PATIENCE).toBe("Cancelled");
    await expect.poll(() => open.size, PATIENCE).toBe(0);
    await ctx.close();
  });

  test("with the API gone the page says the service is unreachable, then recovers", async () => {
    const { page } = await newPage();
    const jobId = await startJob(page, [LONGER?.fileName ?? ""]);
    await expect.poll(() => valueNow(page), { interval: 100 }).toBeGreaterThanOrEqual(0);
    const port = st.server.port;
    await st.server.close();
    await expect
      .poll(() => text(page.getByRole("alert")))
      .toBe("The service is unreachable; retrying…");
    await shot(page, "5-unreachable");

    // The same address comes back: the page resumes the same job by itself.
    const cfg = apiConfig({ PORT: String(port), WEB_ROOT: dist });
    extraServers.push(await startApiServer(cfg, silent));
    await expect.poll(() => stateText(page)).toBe("Ready");
    expect(await page.getByRole("alert").count()).toBe(0);
    await expect.poll(() => attr(page.getByTestId("job-id"), "title"), PATIENCE).toBe(jobId);
    await shot(page, "6-recovered");
  });
});

describe("queue position, predicted times and the stable link", () => {
  test("a completed job offers a link to share that downloads its ZIP without the page", async () => {
    const { ctx, page } = await newPage();
    const first = USED[0];
    if (first === undefined) throw new Error("no sample");
    await startJob(page, [first.fileName]);
    await expect.poll(() => stateText(page), { timeout: 60_000 }).toBe("Ready");
    const box = page.getByRole("textbox", { name: "Link to share" });
    await expect
      .poll(() => box.inputValue({ timeout: 1_000 }).catch(() => ""), PATIENCE)
      .toMatch(new RegExp(`^${st.server.url}/d/[0-9a-f-]{36}\\?exp=\\d+&sig=`));
    const link = await box.inputValue();
    expect(await text(page.locator(".stable-link"))).toContain("for whoever has it");
    await shot(page, "7-stable-link");
    await ctx.close();
    // Anyone with the link, no token, no page: a redirect to the ZIP of the job's files.
    const res = await fetch(link);
    expect(res.status).toBe(200);
    const entries = await readZip(Buffer.from(await res.arrayBuffer()));
    expect(entries.get(first.fileName)?.equals(sources.get(first.fileName) as Buffer)).toBe(true);
  });

  test("a queued job shows its place in the queue and when it should start and be ready", async () => {
    // An API on a queue of its own that no worker takes from: its jobs stay queued. Two
    // runs measured there, as a worker records them, give the forecast its figures.
    const prefix = `${st.cfg.QUEUE_PREFIX}-q`;
    const cfg = apiConfig({ QUEUE_PREFIX: prefix, WEB_ROOT: dist });
    const store = new JobStore(st.redis, { prefix, recordTtlSeconds: 600 });
    for (const [n, mb] of [
      [1, 2],
      [3, 9],
    ] as const) {
      const rec = newJobRecord(newJobId(), "browser", [n], Date.now());
      rec.progress.bytesTotal = mb * 1_000_000;
      await recordRun(store, rec, mb * 1000);
    }
    const server = await startApiServer(cfg, silent);
    extraServers.push(server);
    const api = createDownloadClient({ baseUrl: server.url, token: TOKEN });
    const ahead = [];
    for (const f of USED.slice(0, 2))
      ahead.push((await api.initiate({ fileIds: [f.fileId] })).job?.jobId ?? "");

    const ctx = await browser.newContext();
    const page = await ctx.newPage();
    await page.goto(server.url);
    await enterToken(page);
    await startJob(page, [USED[2]?.fileName ?? ""]);
    const estimate = page.getByTestId("queue-estimate");
    await expect.poll(() => text(estimate), PATIENCE).toMatch(/^Number 3 in the queue/);
    expect(await text(estimate)).toMatch(/starts in about .* · ready in about /);
    expect(await stateText(page)).toBe("Queued");
    await shot(page, "8-queued");
    // A job ahead goes away: the page moves up without a reload.
    await api.cancel({ jobId: ahead[0] ?? "" });
    await expect.poll(() => text(estimate), { timeout: 30_000 }).toMatch(/^Number 2 in the queue/);
    await api.cancel({ jobId: ahead[1] ?? "" });
    await expect.poll(() => text(estimate), { timeout: 30_000 }).toMatch(/^Next in the queue/);
    await ctx.close();
  });
});
