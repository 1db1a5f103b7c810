import http from "node:http";
import type { AddressInfo } from "node:net";
import { createClient } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { pino } from "pino";
import { afterAll, beforeAll, expect, test } from "vitest";
import { loadConfig } from "../core/config.js";
import type { JobRecord } from "../core/jobs.js";
import { DownloadService } from "../gen/downloads/v1/download_service_pb.js";
import { type RealisticS3, startRealisticS3 } from "../local/realistic-s3.js";
import { addLocalS3AccessKey, revokeLocalS3AccessKey } from "../local/s3-server.js";
import { type RunningWorker, startWorker } from "../worker/worker.js";
import { type ApiStack, startApiStack, withTestToken } from "./helpers/api.js";
import { readZip } from "./helpers/zip.js";

// An IAM role instead of static keys: the API and the worker run with no
// S3_ACCESS_KEY_ID / S3_SECRET_ACCESS_KEY, so the AWS SDK's default credential chain
// finds temporary credentials at a container credentials endpoint (as on ECS, or EKS
// Pod Identity) that this test serves on loopback (AWS_CONTAINER_CREDENTIALS_FULL_URI).
// The credentials rotate while the service runs; the old key is then revoked in the S3
// server, so any use of it after the rotation would fail the job.

const MINUTE = 60_000;

interface RoleCredentials {
  AccessKeyId: string;
  SecretAccessKey: string;
  Token: string;
  Expiration: string;
}

let current: RoleCredentials;
let credentialRequests = 0;
let endpoint: http.Server;
let st: ApiStack;
let proxy: RealisticS3;
let worker: RunningWorker;
const sources = new Map<number, Buffer>();

function issue(n: number, lifetimeMs: number): RoleCredentials {
  addLocalS3AccessKey(`ASIAROLE${n}`, `role-secret-${n}`);
  return {
    AccessKeyId: `ASIAROLE${n}`,
    SecretAccessKey: `role-secret-${n}`,
    Token: `role-session-token-${n}`,
    Expiration: new Date(Date.now() + lifetimeMs).toISOString(),
  };
}

beforeAll(async () => {
  // Short-lived, so that the rotation below happens within the test.
  current = issue(1, 30_000);
  endpoint = http.createServer((_req, res) => {
    credentialRequests += 1;
    res.writeHead(200, { "content-type": "application/json" });
    res.end(JSON.stringify(current));
  });
  await new Promise<void>((ok) => endpoint.listen(0, "127.0.0.1", ok));
  // This file runs in a process of its own (vitest forks): the chain reads these.
  process.env.AWS_CONTAINER_CREDENTIALS_FULL_URI = `http://127.0.0.1:${(endpoint.address() as AddressInfo).port}/v2/credentials/role`;
  for (const name of [
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
  ])
    delete process.env[name];
  process.env.AWS_CONFIG_FILE = "/nonexistent";
  process.env.AWS_SHARED_CREDENTIALS_FILE = "/nonexistent";

  // Empty means unset: no static keys anywhere.
  st = await startApiStack({
    S3_ACCESS_KEY_ID: "",
    S3_SECRET_ACCESS_KEY: "",
    PRESIGN_EXPIRY_SECONDS: "900",
  });
  expect(st.cfg.S3_ACCESS_KEY_ID).toBeUndefined();
  for (const id of [901, 902, 903]) sources.set(id, await st.svc.putSource(id, 300_000 + id));
  proxy = await startRealisticS3(st.svc.s3.endpoint, "loopback");
  worker = await startWorker(
    { ...st.cfg, S3_ENDPOINT: proxy.endpoint, S3_PUBLIC_ENDPOINT: st.svc.s3.endpoint },
    pino({ level: "silent" }),
  );
});

afterAll(async () => {
  await worker?.close();
  await proxy?.close();
  await st?.stop();
  await new Promise((ok) => endpoint?.close(ok));
  delete process.env.AWS_CONTAINER_CREDENTIALS_FULL_URI;
});

const client = () =>
  createClient(
    DownloadService,
    createConnectTransport({
      baseUrl: st.server.url,
      httpVersion: "1.1",
      interceptors: [withTestToken],
    }),
  );

async function runJob(fileIds: number[]) {
  const jobId = (await client().initiate({ fileIds })).job?.jobId ?? "";
  let rec: JobRecord | undefined;
  await expect
    .poll(async () => (rec = await st.store.get(jobId)).state, { timeout: 60_000 })
    .toMatch(/COMPLETED|FAILED/);
  expect(rec?.state, rec?.error?.message).toBe("COMPLETED");
  const readAt = Date.now();
  const { job } = await client().getStatus({ jobId });
  const url = new URL(job?.result?.downloadUrl ?? "");
  const res = await fetch(url);
  expect(res.status).toBe(200);
  const entries = await readZip(Buffer.from(await res.arrayBuffer()));
  for (const id of fileIds)
    expect(entries.get(`file-${id}`)?.equals(sources.get(id) as Buffer)).toBe(true);
  const expireMs = Number(job?.result?.expireTime?.seconds ?? 0n) * 1000;
  return { url, readAt, expireMs };
}

test("without static keys the service signs with the role's temporary credentials, and URLs die with them", async () => {
  const first = current;
  const { url, readAt, expireMs } = await runJob([901, 902]);
  // The worker's S3 calls carried the session token; none went unsigned by the role.
  expect(proxy.stats.bySessionToken.get(first.Token) ?? 0).toBeGreaterThan(3);
  expect([...proxy.stats.bySessionToken.keys()]).toEqual([first.Token]);
  expect(url.searchParams.get("X-Amz-Security-Token")).toBe(first.Token);
  expect(url.searchParams.get("X-Amz-Credential")).toMatch(/^ASIAROLE1\//);
  // The credentials end before the 15 min of PRESIGN_EXPIRY_SECONDS: the URL ends with
  // them, and expire_time says so.
  const credentialsEnd = Date.parse(first.Expiration);
  expect(expireMs).toBeLessThanOrEqual(credentialsEnd);
  expect(expireMs).toBeGreaterThan(credentialsEnd - 2000);
  const signedAt = Date.parse(
    (url.searchParams.get("X-Amz-Date") ?? "").replace(
      /^(\d{4})(\d\d)(\d\d)T(\d\d)(\d\d)(\d\d)Z$/,
      "$1-$2-$3T$4:$5:$6Z",
    ),
  );
  expect(signedAt + Number(url.searchParams.get("X-Amz-Expires")) * 1000).toBeLessThanOrEqual(
    credentialsEnd,
  );
  expect(expireMs).toBeLessThan(readAt + 900_000);
});

test("credentials that rotate while the service runs are picked up; the old key is never used again", async () => {
  const before = credentialRequests;
  const old = current;
  // From here on the endpoint hands out new credentials, good for an hour.
  current = issue(2, 60 * MINUTE);
  // The SDK keeps using credentials until they expire (refreshing in the background
  // within five minutes of their end, as they are still valid); once they have expired,
  // revoke the old key, so a job that still used it would fail.
  await expect
    .poll(() => Date.now(), { timeout: 60_000, interval: 200 })
    .toBeGreaterThan(Date.parse(old.Expiration) + 100);
  revokeLocalS3AccessKey(old.AccessKeyId);
  const oldCalls = proxy.stats.bySessionToken.get(old.Token) ?? 0;
  const { url, readAt, expireMs } = await runJob([902, 903]);
  expect(credentialRequests).toBeGreaterThan(before);
  expect(proxy.stats.bySessionToken.get(current.Token) ?? 0).toBeGreaterThan(3);
  // Not one call of the second job was signed with the expired credentials.
  expect(proxy.stats.bySessionToken.get(old.Token) ?? 0).toBe(oldCalls);
  expect(url.searchParams.get("X-Amz-Security-Token")).toBe(current.Token);
  expect(url.searchParams.get("X-Amz-Credential")).toMatch(/^ASIAROLE2\//);
  // An hour of credentials: the configured 15 minutes decide now. A completed job's URL
  // is signed as of the start of its URL window (at most a minute, server/rpc/presenter.ts),
  // so it may end up to a minute before readAt + 15 min.
  expect(expireMs).toBeGreaterThan(readAt + 900_000 - 61_000);
  expect(expireMs).toBeLessThanOrEqual(Date.now() + 900_000);
});

test("the configuration takes both static keys or neither", () => {
  expect(() => loadConfig({ S3_ACCESS_KEY_ID: "AKIAEXAMPLE" })).toThrow(/S3_SECRET_ACCESS_KEY/);
  expect(loadConfig({ S3_ENDPOINT: "http://127.0.0.1:9000" }).S3_ACCESS_KEY_ID).toBeUndefined();
});
