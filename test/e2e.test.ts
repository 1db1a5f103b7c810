import { createClient } from "@connectrpc/connect";
import { createConnectTransport, createGrpcTransport } from "@connectrpc/connect-node";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { DownloadService, type Job, JobState } from "../gen/downloads/v1/download_service_pb.js";
import { type ApiStack, startApiStack } from "./helpers/api.js";
import { spawnWorker, type WorkerProcess } from "./helpers/worker-process.js";
import { readZip, sha256 } from "./helpers/zip.js";

// The whole service as a user meets it: the API in this process, the worker in another,
// real Redis and S3, and clients nobody special-cased. The ZIP is fetched through its
// presigned URL and every entry compared with its source, byte for byte.

const PROTO = "proto/downloads/v1/download_service.proto";

let st: ApiStack;
let worker: WorkerProcess;
const sources = new Map<number, Buffer>();

beforeAll(async () => {
  // Not about auth (test/trust-*.test.ts is): every caller is the anonymous owner.
  st = await startApiStack({ WATCH_HEARTBEAT_MS: "1000", AUTH_DISABLED: "true" });
  const files: [number, number, string?][] = [
    [501, 2 * 1024 * 1024, "photo.jpg"],
    [502, 777_777, "notes.txt"],
    [503, 12_345],
    [504, 3 * 1024 * 1024 + 5, "video.mp4"],
    [505, 4 * 1024 * 1024, "slow.bin"],
  ];
  for (const [id, size, name] of files) sources.set(id, await st.svc.putSource(id, size, name));
  worker = spawnWorker({
    ...st.svc.env,
    QUEUE_PREFIX: st.cfg.QUEUE_PREFIX,
    // Slow enough that a watcher sees PROCESSING and a cancel lands mid-job.
    THROTTLE_BYTES_PER_SECOND: String(4 * 1024 * 1024),
    PROGRESS_INTERVAL_MS: "100",
  });
});
afterAll(async () => {
  await worker?.kill("SIGTERM");
  await st?.stop();
});

async function expectZipMatches(job: Job, fileIds: number[]): Promise<void> {
  const result = job.result;
  if (result === undefined) throw new Error("completed job has no result");
  const res = await fetch(result.downloadUrl);
  expect(res.status).toBe(200);
  expect(res.headers.get("content-disposition")).toContain(result.fileName);
  const zip = Buffer.from(await res.arrayBuffer());
  expect(BigInt(zip.length)).toBe(result.sizeBytes);
  expect(sha256(zip)).toBe(result.sha256);
  const entries = await readZip(zip);
  expect(entries.size).toBe(fileIds.length);
  for (const [i, id] of fileIds.entries()) {
    const name = job.files[i]?.entryName ?? "";
    expect(
      entries.get(name)?.equals(sources.get(id) as Buffer),
      `entry ${name} of file ${id}`,
    ).toBe(true);
  }
}

function resultObjectExists(jobId: string): Promise<boolean> {
  return st.svc.storage.resultExists(st.svc.storage.resultKey(jobId));
}

describe("end to end", () => {
  test("Connect over HTTP/1.1: Initiate, WatchJob to COMPLETED, and the ZIP holds the exact sources", async () => {
    const client = createClient(
      DownloadService,
      createConnectTransport({ baseUrl: st.server.url, httpVersion: "1.1" }),
    );
    const ids = [501, 502, 503];
    const { job } = await client.initiate({ fileIds: ids });
    expect(job?.state).toBe(JobState.QUEUED);
    const seen: Job[] = [];
    for await (const msg of client.watchJob({ jobId: job?.jobId ?? "" })) {
      if (msg.event.case === "job") seen.push(msg.event.value);
    }
    const states = seen.map((j) => j.state);
    expect(states[0]).toBe(JobState.QUEUED);
    expect(states).toContain(JobState.PROCESSING);
    expect(states.at(-1)).toBe(JobState.COMPLETED);
    const versions = seen.map((j) => j.version);
    expect(versions).toEqual([...versions].sort((a, b) => a - b));
    expect(new Set(versions).size).toBe(versions.length);
    const last = seen.at(-1) as Job;
    expect(last.progress?.percent).toBe(100);
    expect(last.progress?.filesDone).toBe(3);
    await expectZipMatches(last, ids);
  });

  test("gRPC over h2c: polling GetStatus reaches COMPLETED with a fresh presigned URL each read", async () => {
    const client = createClient(DownloadService, createGrpcTransport({ baseUrl: st.server.url }));
    const ids = [504, 503];
    const { job } = await client.initiate({ fileIds: ids });
    let current: Job | undefined;
    await expect
      .poll(
        async () => {
          current = (await client.getStatus({ jobId: job?.jobId ?? "" })).job;
          return current?.state;
        },
        { interval: 100 },
      )
      .toBe(JobState.COMPLETED);
    await expectZipMatches(current as Job, ids);
    const again = (await client.getStatus({ jobId: job?.jobId ?? "" })).job;
    expect(again?.result?.sha256).toBe(current?.result?.sha256);
    expect(again?.result?.expireTime).toBeDefined();
  });

  test("@grpc/grpc-js watches a real job to the end and the result downloads", async () => {
    const def = await protoLoader.load(PROTO, {
      keepCase: false,
      longs: String,
      enums: String,
      defaults: true,
      oneofs: true,
    });
    const pkg = grpc.loadPackageDefinition(def) as unknown as {
      downloads: {
        v1: { DownloadService: new (addr: string, creds: grpc.ChannelCredentials) => grpc.Client };
      };
    };
    const client = new pkg.downloads.v1.DownloadService(
      `127.0.0.1:${st.server.port}`,
      grpc.credentials.createInsecure(),
    ) as grpc.Client & {
      initiate(
        req: unknown,
        cb: (err: grpc.ServiceError | null, res?: { job: { jobId: string } }) => void,
      ): void;
      watchJob(req: unknown): grpc.ClientReadableStream<{
        job?: { state: string; version: number; result?: { downloadUrl: string } | null } | null;
      }>;
    };
    try {
      const started = await new Promise<{ job: { jobId: string } }>((ok, fail) =>
        client.initiate({ fileIds: [502] }, (err, res) =>
          err ? fail(err) : ok(res as { job: { jobId: string } }),
        ),
      );
      const stream = client.watchJob({ jobId: started.job.jobId });
      const states: string[] = [];
      let url = "";
      stream.on("data", (m) => {
        if (m.job) {
          states.push(m.job.state);
          url = m.job.result?.downloadUrl ?? url;
        }
      });
      const status = await new Promise<grpc.StatusObject>((ok) => stream.on("status", ok));
      expect(status.code).toBe(grpc.status.OK);
      expect(states.at(-1)).toBe("JOB_STATE_COMPLETED");
      const entries = await readZip(Buffer.from(await (await fetch(url)).arrayBuffer()));
      expect(entries.get("notes.txt")?.equals(sources.get(502) as Buffer)).toBe(true);
    } finally {
      client.close();
    }
  });

  test("Cancel through the API stops the job in the worker process and leaves no result object", async () => {
    const client = createClient(
      DownloadService,
      createConnectTransport({ baseUrl: st.server.url, httpVersion: "1.1" }),
    );
    const { job } = await client.initiate({ fileIds: [505, 504] });
    const jobId = job?.jobId ?? "";
    const seen: Job[] = [];
    const watching = (async () => {
      for await (const msg of client.watchJob({ jobId })) {
        if (msg.event.case === "job") seen.push(msg.event.value);
      }
    })();
    await expect
      .poll(() =>
        seen.some((j) => j.state === JobState.PROCESSING && (j.progress?.bytesDone ?? 0n) > 0n),
      )
      .toBe(true);
    const { job: cancelled } = await client.cancel({ jobId });
    expect(cancelled?.state).toBe(JobState.CANCELLED);
    await watching;
    expect(seen.at(-1)?.state).toBe(JobState.CANCELLED);
    // The worker process stops: its BullMQ job ends failed (not retried) within a second or so.
    const bull = await st.queue.getJob(jobId);
    await expect.poll(async () => bull?.getState()).toBe("failed");
    expect(await resultObjectExists(jobId)).toBe(false);
    const again = await client.cancel({ jobId });
    expect(again.job?.state).toBe(JobState.CANCELLED);
    expect(again.job?.version).toBe(cancelled?.version);
  });

  test("a missing source file fails the job with not_found naming the missing ids", async () => {
    const client = createClient(
      DownloadService,
      createConnectTransport({ baseUrl: st.server.url, httpVersion: "1.1" }),
    );
    const { job } = await client.initiate({ fileIds: [503, 404_404] });
    let last: Job | undefined;
    for await (const msg of client.watchJob({ jobId: job?.jobId ?? "" })) {
      if (msg.event.case === "job") last = msg.event.value;
    }
    expect(last?.state).toBe(JobState.FAILED);
    expect(last?.error).toMatchObject({
      code: "not_found",
      retryable: false,
      missingFileIds: [404_404],
    });
    expect(last?.attempts).toBe(1);
  });

  test("RetryJob: a job that failed on a missing file runs again under its id once the file exists", async () => {
    const client = createClient(
      DownloadService,
      createConnectTransport({ baseUrl: st.server.url, httpVersion: "1.1" }),
    );
    const watchToEnd = async (jobId: string) => {
      let last: Job | undefined;
      for await (const msg of client.watchJob({ jobId })) {
        if (msg.event.case === "job") last = msg.event.value;
      }
      return last;
    };
    const { job } = await client.initiate({ fileIds: [503, 606_606], labels: { order: "e2e" } });
    const jobId = job?.jobId ?? "";
    const failed = await watchToEnd(jobId);
    expect(failed?.state).toBe(JobState.FAILED);
    sources.set(606_606, await st.svc.putSource(606_606, 54_321, "late.bin"));

    // The FAILED record can reach the watcher before the worker has let go of the run;
    // RetryJob then says so and asks to be called again in a few seconds, as a user would.
    const retried = await retryWhileStopping(() => client.retryJob({ jobId }));
    expect(retried.job).toMatchObject({ jobId, state: JobState.QUEUED, labels: { order: "e2e" } });
    const done = await watchToEnd(jobId);
    expect(done?.state).toBe(JobState.COMPLETED);
    expect(done?.attempts).toBe((failed?.attempts ?? 0) + 1);
    expect(done?.createTime).toEqual(failed?.createTime);
    await expectZipMatches(done as Job, [503, 606_606]);

    // Deleting it takes the ZIP (the second run's object) away at once.
    const key = st.svc.storage.resultKey(jobId, done?.attempts);
    expect(await st.svc.storage.resultExists(key)).toBe(true);
    await client.deleteJob({ jobId });
    expect(await st.svc.storage.resultExists(key)).toBe(false);
  });
});

/**
 * Calls RetryJob again while the job's last run is still stopping in its worker: the
 * answer is then `unavailable` (14 in Connect and gRPC alike), which says to call again.
 */
async function retryWhileStopping<T>(call: () => Promise<T>): Promise<T> {
  for (let tries = 1; ; tries++) {
    try {
      return await call();
    } catch (err) {
      const stopping = String(err).includes("still stopping");
      if (stopping) expect((err as { code?: unknown }).code).toBe(14);
      if (tries >= 60 || !stopping) throw err;
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  }
}
