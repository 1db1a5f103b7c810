import { execFile } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdtemp, readdir, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { afterAll, afterEach, beforeAll, describe, expect, test } from "vitest";
import { createJob } from "../core/job-transitions.js";
import { newJobId } from "../core/jobs.js";
import { type ApiStack, startApiStack, TEST_TOKEN } from "./helpers/api.js";
import { type CuttingProxy, startCuttingProxy } from "./helpers/cutting-proxy.js";
import { type Services, startServices } from "./helpers/services.js";
import { sha256 } from "./helpers/zip.js";

// `download-jobs download` over a network that breaks: the ZIP's presigned URLs point at
// a proxy in front of the real S3 server that resets the transfer part-way. The CLI must
// fetch only the bytes after the cut (Range + If-Match), replace an URL that expired
// meanwhile by asking the API again, and still save exactly the ZIP (SHA-256 checked).
// The proxy counts what S3 sent: the bytes before the cut are never sent twice.

const CLI = join(import.meta.dirname, "..", "bin", "download-jobs.js");
const run = promisify(execFile);
const SIZE = 3 * 1024 * 1024;
/** Room for the response heads (a few hundred bytes each) on top of the body. */
const HEADS = 16 * 1024;
/** At most this much of an answer is received but not yet saved when it breaks. */
const IN_FLIGHT = 256 * 1024;

/** The first byte a request's Range header asks for; undefined without one. */
function rangeStart(head: string | undefined): number | undefined {
  const m = /^range: bytes=(\d+)-$/im.exec(head ?? "");
  return m === null ? undefined : Number(m[1]);
}

let svc: Services;
let dir: string;
const stacks: { stack: ApiStack; proxy: CuttingProxy }[] = [];

beforeAll(async () => {
  svc = await startServices();
  dir = await mkdtemp(join(tmpdir(), "dj-resume-"));
});
afterEach(async () => {
  for (const { stack, proxy } of stacks.splice(0)) {
    await stack.stop();
    await proxy.close();
  }
});
afterAll(async () => {
  await svc?.stop();
  if (dir !== undefined) await rm(dir, { recursive: true, force: true });
});

/** An API whose download URLs lead through a cutting proxy to S3, and a completed job. */
async function setUp(
  plan: Parameters<typeof startCuttingProxy>[1],
  env: Record<string, string> = {},
): Promise<{ stack: ApiStack; proxy: CuttingProxy; jobId: string; zip: Buffer }> {
  const proxy = await startCuttingProxy({ port: svc.s3.port }, plan);
  const stack = await startApiStack(
    { S3_PUBLIC_ENDPOINT: `http://127.0.0.1:${proxy.port}`, ...env },
    { services: svc },
  );
  stacks.push({ stack, proxy });
  const jobId = newJobId();
  await createJob(stack.store, jobId, [1], stack.owner);
  await stack.startJob(jobId);
  const zip = randomBytes(SIZE);
  await stack.complete(jobId, zip);
  return { stack, proxy, jobId, zip };
}

async function download(stack: ApiStack, jobId: string, file: string) {
  try {
    const { stdout, stderr } = await run(process.execPath, [CLI, "download", jobId, "-o", file], {
      cwd: dir,
      env: { ...process.env, DOWNLOAD_JOBS_URL: stack.server.url, DOWNLOAD_JOBS_TOKEN: TEST_TOKEN },
    });
    return { code: 0, stdout, stderr };
  } catch (err) {
    const e = err as { code: number; stdout: string; stderr: string };
    return { code: e.code, stdout: e.stdout, stderr: e.stderr };
  }
}

const gets = (proxy: CuttingProxy) => proxy.requests().filter((h) => h.startsWith("GET "));

describe("download-jobs download resumes", () => {
  test("a transfer cut part-way resumes after the cut and saves the exact ZIP", async () => {
    const cut = Math.floor(SIZE * 0.6);
    const { stack, proxy, jobId, zip } = await setUp({ cutAfter: [cut] });
    const res = await download(stack, jobId, "cut.zip");
    expect(res.code, `${res.stderr}\n${res.stdout}\n${JSON.stringify(gets(proxy))}`).toBe(0);
    expect(res.stdout).toContain("verified");
    expect(res.stderr).toMatch(/resuming at byte \d+/);
    const saved = await readFile(join(dir, "cut.zip"));
    expect(sha256(saved)).toBe(sha256(zip));
    // The second GET asks for the rest only, of the same object.
    const [first, second] = gets(proxy);
    expect(first).not.toMatch(/^range:/im);
    expect(second).toMatch(/^if-match: "?[0-9a-f]+"?$/im);
    const from = rangeStart(second);
    // It starts where the saved bytes end: at the cut, less what was still in flight in
    // the client's buffers when the connection broke (those were never saved).
    expect(from).toBeGreaterThan(cut - IN_FLIGHT);
    expect(from).toBeLessThanOrEqual(cut);
    // What S3 sent in all: the ZIP once, the answers' heads and that bit in flight; the
    // bytes saved before the cut were not sent again.
    expect(proxy.bytesServed()).toBeLessThan(SIZE + HEADS + (cut - (from ?? 0)));
    // Nothing but the saved file is left behind.
    expect((await readdir(dir)).filter((f) => f.startsWith("cut.zip"))).toEqual(["cut.zip"]);
  });

  test("a URL that expired before the resume is replaced by a fresh one from the API", async () => {
    const cut = Math.floor(SIZE * 0.3);
    // URLs live 2 s at most; the resume is held 3.5 s, so the URL it carries has expired.
    const { stack, proxy, jobId, zip } = await setUp(
      { cutAfter: [cut], holdMs: [0, 3500] },
      { PRESIGN_EXPIRY_SECONDS: "2" },
    );
    const res = await download(stack, jobId, "expired.zip");
    expect(res.code, `${res.stderr}\n${res.stdout}\n${JSON.stringify(gets(proxy))}`).toBe(0);
    expect(res.stderr).toContain("the download URL expired: asking for a fresh one");
    expect(sha256(await readFile(join(dir, "expired.zip")))).toBe(sha256(zip));
    const starts = gets(proxy).map(rangeStart);
    // Resumed after the cut, not from the start, though the URL changed.
    expect(Math.max(...starts.map((v) => v ?? 0))).toBeGreaterThan(cut - IN_FLIGHT);
  });

  test("transfers that keep breaking give up with a message that says how to resume", async () => {
    const cuts = Array.from({ length: 8 }, () => 320 * 1024);
    const { stack, proxy, jobId, zip } = await setUp({ cutAfter: cuts });
    const res = await download(stack, jobId, "broken.zip");
    expect(res.code).not.toBe(0);
    expect(res.stderr).toMatch(/interrupted \d+ times .* run the command again to resume/);
    // The part is kept for the next run, which resumes it and fetches only the rest.
    const files = await readdir(dir);
    expect(files).toContain("broken.zip.part");
    expect(files).not.toContain("broken.zip");
    const again = await download(stack, jobId, "broken.zip");
    expect(again.code, again.stderr).toBe(0);
    expect(again.stderr).toMatch(/saved by an earlier run/);
    expect(sha256(await readFile(join(dir, "broken.zip")))).toBe(sha256(zip));
    // Every request asked for the bytes after those saved: the starts never go back,
    // across both runs, and end well past any one cut.
    const starts = gets(proxy).map((h) => rangeStart(h) ?? 0);
    expect(starts.length).toBeGreaterThanOrEqual(6);
    for (let i = 1; i < starts.length; i++)
      expect(starts[i]).toBeGreaterThanOrEqual(starts[i - 1] as number);
    expect(starts.at(-1)).toBeGreaterThan(4 * (320 * 1024 - IN_FLIGHT));
  });
});
