import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { DownloadLinks } from "../core/download-link.js";
import { createJob, markExpired } from "../core/job-transitions.js";
import { newJobId } from "../core/jobs.js";
import { type ApiStack, startApiStack, testClient } from "./helpers/api.js";
import { tamper } from "./helpers/tamper.js";
import { sha256 } from "./helpers/zip.js";

// The stable download link of a completed job (GET /d/<job>?exp=..&sig=..): the same link
// on every read, no bearer token, a 302 to a freshly presigned URL of the real ZIP in S3;
// every refusal (no signature, another job's, altered, expired, job or ZIP gone) says why.

const SECRET = "download-link-test-secret-0123456789abcdef";

let st: ApiStack;
let client: ReturnType<typeof testClient>;

beforeAll(async () => {
  st = await startApiStack({
    DOWNLOAD_LINK_SECRET: SECRET,
    // Short-lived presigned URLs, so two reads a second apart get different ones.
    PRESIGN_EXPIRY_SECONDS: "60",
  });
  client = testClient(st.server.url);
});
afterAll(async () => {
  await st?.stop();
});

async function completedJob(zip: Buffer): Promise<{ jobId: string; link: string }> {
  const jobId = newJobId();
  await createJob(st.store, jobId, [1], st.owner);
  await st.startJob(jobId);
  await st.complete(jobId, zip);
  const { job } = await client.getStatus({ jobId });
  const link = job?.result?.linkUrl ?? "";
  return { jobId, link };
}

/** GETs the link without following the redirect (no bearer token: the link is the credential). */
async function open(link: string): Promise<{ status: number; location: string; text: string }> {
  const res = await fetch(new URL(link, st.server.url), { redirect: "manual" });
  return {
    status: res.status,
    location: res.headers.get("location") ?? "",
    text: await res.text(),
  };
}

describe("stable download link", () => {
  test("a completed job's link stays the same and redirects to its ZIP without a token", async () => {
    const zip = Buffer.from("PK stable link test bytes ".repeat(1000));
    const { jobId, link } = await completedJob(zip);
    expect(link).toMatch(new RegExp(`^/d/${jobId}\\?exp=\\d+&sig=[A-Za-z0-9_-]+$`));
    // The same link on every read (GetStatus, WatchJob), unlike the presigned URL.
    const again = await client.getStatus({ jobId });
    expect(again.job?.result?.linkUrl).toBe(link);
    for await (const msg of client.watchJob({ jobId })) {
      if (msg.event.case === "job") expect(msg.event.value.result?.linkUrl).toBe(link);
    }
    const first = await open(link);
    expect(first.status).toBe(302);
    const res = await fetch(first.location);
    expect(res.status).toBe(200);
    const got = Buffer.from(await res.arrayBuffer());
    expect(sha256(got)).toBe(sha256(zip));
    // following redirects works too, as a browser or curl -L does
    const followed = await fetch(new URL(link, st.server.url));
    expect(followed.status).toBe(200);
    expect(Buffer.from(await followed.arrayBuffer()).equals(zip)).toBe(true);
  });

  test("a link without a signature, altered, for another job or expired is refused saying why", async () => {
    const { jobId, link } = await completedJob(Buffer.from("bytes of a zip"));
    const other = await completedJob(Buffer.from("bytes of another zip"));
    const url = new URL(link, st.server.url);

    const bare = await open(`/d/${jobId}`);
    expect(bare.status).toBe(401);
    expect(bare.text).toMatch(/no signature/);

    const altered = new URL(url);
    altered.searchParams.set("sig", tamper(url.searchParams.get("sig") ?? ""));
    const tampered = await open(altered.href);
    expect(tampered.status).toBe(403);
    expect(tampered.text).toMatch(/signature .* does not match/);

    // One job's signature does not open another job.
    const swapped = await open(`/d/${other.jobId}${url.search}`);
    expect(swapped.status).toBe(403);

    // A later exp with the old signature: the signature covers exp too.
    const longer = new URL(url);
    longer.searchParams.set("exp", String(Number(url.searchParams.get("exp")) + 3600));
    expect((await open(longer.href)).status).toBe(403);

    // Signed correctly, but past its time.
    const past = new DownloadLinks(SECRET).link(jobId, Math.floor(Date.now() / 1000) - 60);
    const expired = await open(past);
    expect(expired.status).toBe(401);
    expect(expired.text).toMatch(/expired at/);

    // Signed with another secret.
    const foreign = new DownloadLinks("another-secret-of-at-least-32-characters!!").link(
      jobId,
      Math.floor(Date.now() / 1000) + 3600,
    );
    expect((await open(foreign)).status).toBe(403);

    const malformed = await open("/d/not-a-job?exp=1&sig=x");
    expect(malformed.status).toBe(400);
    expect(malformed.text).toMatch(/malformed/);
  });

  test("the link stops working once the ZIP or the job is gone", async () => {
    const { jobId, link } = await completedJob(Buffer.from("short-lived zip"));
    expect((await open(link)).status).toBe(302);
    // Retention deleted the ZIP: the job stays, its link answers 410 and is no longer given.
    const rec = await st.store.get(jobId);
    await markExpired(st.store, jobId, rec.result as NonNullable<typeof rec.result>);
    const gone = await open(link);
    expect(gone.status).toBe(410);
    expect(gone.text).toMatch(/deleted/);
    expect((await client.getStatus({ jobId })).job?.result?.linkUrl).toBe("");

    // The job record itself is gone (its TTL ran out).
    const second = await completedJob(Buffer.from("another short-lived zip"));
    await st.redis.del(st.store.key(second.jobId));
    const missing = await open(second.link);
    expect(missing.status).toBe(404);
    expect(missing.text).toMatch(/no longer exists/);
  });

  test("a queued job has no link, and only GET and HEAD are answered", async () => {
    const { job } = await client.initiate({ fileIds: [7] });
    expect(job?.result).toBeUndefined();
    const { link } = await completedJob(Buffer.from("zip for methods"));
    const post = await fetch(new URL(link, st.server.url), { method: "POST", redirect: "manual" });
    expect(post.status).toBe(405);
    const head = await fetch(new URL(link, st.server.url), { method: "HEAD", redirect: "manual" });
    expect(head.status).toBe(302);
  });
});

describe("without DOWNLOAD_LINK_SECRET", () => {
  test("jobs carry no link and /d/ says how to turn links on", async () => {
    const off = await startApiStack({}, { services: st.svc });
    try {
      const jobId = newJobId();
      await createJob(off.store, jobId, [1], off.owner);
      await off.startJob(jobId);
      await off.complete(jobId, Buffer.from("zip"));
      const offClient = testClient(off.server.url);
      const { job } = await offClient.getStatus({ jobId });
      expect(job?.result?.linkUrl).toBe("");
      expect(job?.result?.downloadUrl).not.toBe("");
      const res = await fetch(`${off.server.url}/d/${jobId}?exp=1&sig=x`);
      expect(res.status).toBe(404);
      expect(await res.text()).toMatch(/DOWNLOAD_LINK_SECRET/);
    } finally {
      await off.stop();
    }
  });
});
