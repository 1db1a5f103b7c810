import { HeadObjectCommand } from "@aws-sdk/client-s3";
import { timestampMs } from "@bufbuild/protobuf/wkt";
import { createClient } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { pino } from "pino";
import { afterAll, beforeAll, expect, test } from "vitest";
import {
  DownloadService,
  InitiateOutcome,
  JobState,
} from "../gen/downloads/v1/download_service_pb.js";
import { type RunningWorker, startWorker } from "../worker/worker.js";
import { type ApiStack, startApiStack, withTestToken } from "./helpers/api.js";
import { readZip } from "./helpers/zip.js";

// Result retention: a result ZIP lives RESULT_TTL_SECONDS after its job completed; then
// a worker's scheduled sweep deletes it, the job says its result expired (no URL), and
// asking for the same files again makes the ZIP afresh instead of handing out the dead one.

const TTL_SECONDS = 2;

let st: ApiStack;
let worker: RunningWorker;
let source: Buffer;

beforeAll(async () => {
  st = await startApiStack({
    RESULT_TTL_SECONDS: String(TTL_SECONDS),
    RETENTION_INTERVAL_MS: "300",
    DEDUP_IN_FLIGHT: "true",
    REUSE_RESULTS: "true",
  });
  source = await st.svc.putSource(301, 20_000, "report.csv");
  worker = await startWorker(st.cfg, pino({ level: "silent" }));
});
afterAll(async () => {
  await worker?.close();
  await st?.stop();
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

async function completed(jobId: string) {
  await expect
    .poll(async () => (await client().getStatus({ jobId })).job?.state, {
      interval: 50,
    })
    .toBe(JobState.COMPLETED);
  return (await client().getStatus({ jobId })).job;
}

const objectStatus = (key: string) =>
  st.svc.storage.client
    .send(new HeadObjectCommand({ Bucket: st.cfg.RESULT_BUCKET, Key: key }))
    .then(
      () => 200,
      (e: { $metadata?: { httpStatusCode?: number } }) => e.$metadata?.httpStatusCode ?? 0,
    );

test("an expired result is deleted, the job reports it, and Initiate makes the ZIP again", async () => {
  const first = await client().initiate({ fileIds: [301] });
  const job = await completed(first.job?.jobId ?? "");
  const result = job?.result;
  expect(result?.expired).toBe(false);
  // purge_time is RESULT_TTL_SECONDS after the job ended.
  const purgeAt = timestampMs(result?.purgeTime ?? ({ seconds: 0n, nanos: 0 } as never));
  const endedAt = timestampMs(job?.endTime ?? ({ seconds: 0n, nanos: 0 } as never));
  expect(purgeAt - endedAt).toBe(TTL_SECONDS * 1000);
  const url = result?.downloadUrl ?? "";
  expect((await fetch(url)).status).toBe(200);
  const key = st.svc.storage.resultKey(job?.jobId ?? "");
  expect(await objectStatus(key)).toBe(200);

  await expect
    .poll(
      async () => (await client().getStatus({ jobId: job?.jobId ?? "" })).job?.result?.expired,
      { interval: 100 },
    )
    .toBe(true);
  const expired = (await client().getStatus({ jobId: job?.jobId ?? "" })).job;
  expect(expired?.state).toBe(JobState.COMPLETED);
  expect(expired?.result?.downloadUrl).toBe("");
  expect(expired?.error).toBeUndefined();
  expect(await objectStatus(key)).toBe(404);
  // The URL handed out before is dead too.
  expect((await fetch(url)).status).toBe(404);

  // Same files again: not the expired job, a new one that rebuilds the ZIP.
  const again = await client().initiate({ fileIds: [301] });
  expect(again.outcome).toBe(InitiateOutcome.CREATED);
  expect(again.job?.jobId).not.toBe(job?.jobId);
  const rebuilt = await completed(again.job?.jobId ?? "");
  const zip = Buffer.from(await (await fetch(rebuilt?.result?.downloadUrl ?? "")).arrayBuffer());
  expect((await readZip(zip)).get("report.csv")?.equals(source)).toBe(true);
});
