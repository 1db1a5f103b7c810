import { request } from "node:http";
import { type Client, Code, ConnectError, createClient } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { newJobId } from "../core/jobs.js";
import { createRedis, waitForRedis } from "../core/redis.js";
import { DownloadService, JobState } from "../gen/downloads/v1/download_service_pb.js";
import {
  type ApiStack,
  startApiStack,
  TEST_AUTH_HEADER,
  TEST_CONNECTION_NAME,
  withTestToken,
} from "./helpers/api.js";

// Initiate, GetStatus and Cancel as a caller sees them, and every kind of bad input:
// each is a 4xx-class Connect error, and the server keeps serving afterwards.

const MAX_FILES = 5;
const MAX_BYTES = 2048;

let st: ApiStack;
let client: Client<typeof DownloadService>;

beforeAll(async () => {
  st = await startApiStack({
    MAX_FILES_PER_JOB: String(MAX_FILES),
    MAX_REQUEST_BYTES: String(MAX_BYTES),
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

const codeOf = async (p: Promise<unknown>) =>
  ConnectError.from(
    await p.then(
      () => undefined,
      (e: unknown) => e,
    ),
  ).code;

describe("Initiate and GetStatus", () => {
  test("Initiate queues the job for the workers and returns it at once", async () => {
    const { job } = await client.initiate({ fileIds: [70003, 70001] });
    expect(job).toMatchObject({
      state: JobState.QUEUED,
      fileIds: [70003, 70001],
      version: 1,
      attempts: 0,
    });
    expect(job?.createTime).toBeDefined();
    expect(job?.startTime).toBeUndefined();
    const queued = await st.queue.getJob(job?.jobId ?? "");
    // The job's id and files; the data also carries what the worker logs and traces with.
    expect(queued?.data).toMatchObject({ jobId: job?.jobId, fileIds: [70003, 70001] });
    // Waiting in BullMQ's prioritized set: its place says whose turn it is (core/queue.ts).
    expect(await queued?.getState()).toBe("prioritized");
  });

  test("GetStatus: unknown id is NOT_FOUND, malformed or missing id is INVALID_ARGUMENT", async () => {
    expect(await codeOf(client.getStatus({ jobId: newJobId() }))).toBe(Code.NotFound);
    expect(await codeOf(client.getStatus({ jobId: "not-a-job" }))).toBe(Code.InvalidArgument);
    expect(await codeOf(client.getStatus({ jobId: "" }))).toBe(Code.InvalidArgument);
  });

  test("a failed job carries its error and no result", async () => {
    const { job } = await client.initiate({ fileIds: [9] });
    await st.fail(job?.jobId ?? "");
    const { job: failed } = await client.getStatus({ jobId: job?.jobId ?? "" });
    expect(failed?.state).toBe(JobState.FAILED);
    expect(failed?.error).toMatchObject({
      code: "not_found",
      retryable: false,
      missingFileIds: [9],
    });
    expect(failed?.result).toBeUndefined();
    expect(failed?.endTime).toBeDefined();
  });
});

describe("Cancel", () => {
  test("a queued job becomes CANCELLED at once and leaves the queue", async () => {
    const jobId = (await client.initiate({ fileIds: [1, 2] })).job?.jobId ?? "";
    expect(await st.queue.getJob(jobId)).toBeDefined();
    const { job } = await client.cancel({ jobId });
    expect(job?.state).toBe(JobState.CANCELLED);
    expect(job?.endTime).toBeDefined();
    expect(await st.queue.getJob(jobId)).toBeUndefined();
    expect((await client.getStatus({ jobId })).job?.state).toBe(JobState.CANCELLED);
  });

  test("a running job is marked CANCELLED and the workers are told to stop it", async () => {
    const jobId = (await client.initiate({ fileIds: [3] })).job?.jobId ?? "";
    await st.startJob(jobId);
    const sub = createRedis(st.svc.redis.url, { role: "subscriber", name: TEST_CONNECTION_NAME });
    try {
      await waitForRedis(sub);
      const told: string[] = [];
      sub.on("message", (_ch: string, msg: string) => told.push(msg));
      await sub.subscribe(st.store.cancelChannel);
      const { job } = await client.cancel({ jobId });
      expect(job?.state).toBe(JobState.CANCELLED);
      await expect.poll(() => told).toContain(jobId);
    } finally {
      sub.disconnect();
    }
  });

  test("cancelling a cancelled job returns it unchanged", async () => {
    const jobId = (await client.initiate({ fileIds: [4] })).job?.jobId ?? "";
    const first = (await client.cancel({ jobId })).job;
    const again = (await client.cancel({ jobId })).job;
    expect(again?.state).toBe(JobState.CANCELLED);
    expect(again?.version).toBe(first?.version);
    expect(again?.updateTime).toEqual(first?.updateTime);
  });

  test("cancelling a completed or failed job is FAILED_PRECONDITION and changes nothing", async () => {
    const done = (await client.initiate({ fileIds: [5] })).job?.jobId ?? "";
    await st.startJob(done);
    await st.complete(done, Buffer.from("zip"));
    expect(await codeOf(client.cancel({ jobId: done }))).toBe(Code.FailedPrecondition);
    expect((await client.getStatus({ jobId: done })).job?.state).toBe(JobState.COMPLETED);

    const failed = (await client.initiate({ fileIds: [6] })).job?.jobId ?? "";
    await st.fail(failed);
    expect(await codeOf(client.cancel({ jobId: failed }))).toBe(Code.FailedPrecondition);
    expect((await client.getStatus({ jobId: failed })).job?.state).toBe(JobState.FAILED);
  });

  test("cancelling an unknown job is NOT_FOUND, a malformed id INVALID_ARGUMENT", async () => {
    expect(await codeOf(client.cancel({ jobId: newJobId() }))).toBe(Code.NotFound);
    expect(await codeOf(client.cancel({ jobId: "42" }))).toBe(Code.InvalidArgument);
  });
});

describe("bad input gets a clear 4xx error and loses nothing", () => {
  const post = (method: string, body: string, contentType = "application/json") =>
    fetch(`${st.server.url}/downloads.v1.DownloadService/${method}`, {
      method: "POST",
      headers: { "Content-Type": contentType, ...TEST_AUTH_HEADER },
      body,
    });

  /** Status, Connect code and whether the error says something, for a JSON POST. */
  const outcome = async (res: Response) => {
    const text = await res.text();
    const body = text === "" ? {} : (JSON.parse(text) as { code?: string; message?: string });
    return { status: res.status, code: body.code, explained: (body.message ?? "").length > 0 };
  };

  const invalid = { status: 400, code: "invalid_argument", explained: true };

  test.each([
    ["no file ids", "Initiate", "{}"],
    ["an empty file_ids list", "Initiate", '{"fileIds":[]}'],
    ["a zero file id", "Initiate", '{"fileIds":[1,0]}'],
    ["a negative file id", "Initiate", '{"fileIds":[-7]}'],
    ["a duplicate file id", "Initiate", '{"fileIds":[3,4,3]}'],
    ["more files than the limit", "Initiate", JSON.stringify({ fileIds: [1, 2, 3, 4, 5, 6] })],
    ["a fractional file id", "Initiate", '{"fileIds":[1.5]}'],
    ["a file id that is not a number", "Initiate", '{"fileIds":["abc"]}'],
    ["a file id beyond int32", "Initiate", '{"fileIds":[3000000000]}'],
    ["an unknown field", "Initiate", '{"fileIds":[1],"priority":"high"}'],
    ["a misspelt field", "GetStatus", '{"job_idd":"x"}'],
    ["malformed JSON", "Initiate", '{"fileIds":[1,'],
    ["a JSON array instead of an object", "Initiate", "[1,2]"],
    ["a malformed job id", "GetStatus", '{"jobId":"../../etc/passwd"}'],
    ["a job id of the wrong type", "Cancel", '{"jobId":42}'],
  ])("%s is INVALID_ARGUMENT (HTTP 400)", async (_what, method, body) => {
    expect(await outcome(await post(method, body))).toEqual(invalid);
  });

  test("a wrong content type is HTTP 415", async () => {
    const res = await post("Initiate", '{"fileIds":[1]}', "text/plain");
    expect(res.status).toBe(415);
  });

  test("an oversized body is RESOURCE_EXHAUSTED (HTTP 429), with or without Content-Length", async () => {
    const big = JSON.stringify({ fileIds: Array.from({ length: 1000 }, (_, i) => i + 1) });
    expect(big.length).toBeGreaterThan(MAX_BYTES);
    const res = await outcome(await post("Initiate", big));
    expect(res).toEqual({ status: 429, code: "resource_exhausted", explained: true });

    // Chunked: the limit holds while reading, not only by the declared length.
    const chunked = await new Promise<{ status: number; body: string }>((ok, fail) => {
      const req = request(
        `${st.server.url}/downloads.v1.DownloadService/Initiate`,
        {
          method: "POST",
          headers: {
            "Content-Type": "application/json",
            "Transfer-Encoding": "chunked",
            ...TEST_AUTH_HEADER,
          },
        },
        (res) => {
          let body = "";
          res.on("data", (d: Buffer) => (body += d.toString()));
          res.on("end", () => ok({ status: res.statusCode ?? 0, body }));
        },
      );
      req.on("error", fail);
      for (let i = 0; i < big.length; i += 256) req.write(big.slice(i, i + 256));
      req.end();
    });
    expect(chunked.status).toBe(429);
    expect((JSON.parse(chunked.body) as { code: string }).code).toBe("resource_exhausted");
  });

  test("an oversized binary request from the generated client is RESOURCE_EXHAUSTED", async () => {
    const binary = createClient(
      DownloadService,
      createConnectTransport({
        baseUrl: st.server.url,
        httpVersion: "1.1",
        useBinaryFormat: true,
        interceptors: [withTestToken],
      }),
    );
    const ids = Array.from({ length: 2000 }, (_, i) => i + 1);
    expect(await codeOf(binary.initiate({ fileIds: ids }))).toBe(Code.ResourceExhausted);
    expect(await codeOf(binary.initiate({ fileIds: [1, 2, 3, 4, 5, 6] }))).toBe(
      Code.InvalidArgument,
    );
  });

  test("an unknown procedure is HTTP 404", async () => {
    const res = await post("Delete", "{}");
    expect(res.status).toBe(404);
  });

  test("after all of that the server still serves, and earlier jobs are intact", async () => {
    const before = (await client.initiate({ fileIds: [10, 11] })).job?.jobId ?? "";
    await post("Initiate", '{"fileIds":[1,');
    await post("Initiate", "x".repeat(MAX_BYTES * 2));
    const { job } = await client.initiate({ fileIds: [12] });
    expect(job?.state).toBe(JobState.QUEUED);
    expect((await client.getStatus({ jobId: before })).job).toMatchObject({
      jobId: before,
      fileIds: [10, 11],
    });
  });
});
