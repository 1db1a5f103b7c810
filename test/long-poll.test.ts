import { type Client, Code, ConnectError, createClient, type Transport } from "@connectrpc/connect";
import {
  createConnectTransport,
  createGrpcTransport,
  createGrpcWebTransport,
  Http2SessionManager,
} from "@connectrpc/connect-node";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { recordProgress } from "../core/job-transitions.js";
import { newJobId } from "../core/jobs.js";
import {
  DownloadService,
  FileState,
  type GetStatusResponse,
  JobState,
} from "../gen/downloads/v1/download_service_pb.js";
import { type ApiStack, startApiStack, TEST_AUTH_HEADER, withTestToken } from "./helpers/api.js";

// GetStatus as a long-poll and as a conditional GET, as callers see them over every
// protocol, on both ways in (the lean transport and connect-node alone); and what a
// stopped job shows.

const CAP_MS = 3_000;

let st: ApiStack;
/** A second server on the same Redis and S3 that leaves every call to connect-node. */
let plain: ApiStack;
const sessions: Http2SessionManager[] = [];

beforeAll(async () => {
  st = await startApiStack({ STATUS_MAX_WAIT_MS: String(CAP_MS) });
  plain = await startApiStack(
    { STATUS_MAX_WAIT_MS: String(CAP_MS) },
    { leanTransport: false, services: st.svc },
  );
});
afterAll(async () => {
  for (const s of sessions) s.abort();
  await plain?.stop();
  await st?.stop();
});

const h2 = (url: string) => {
  const m = new Http2SessionManager(url);
  sessions.push(m);
  return m;
};

const transports: [string, () => Transport, () => ApiStack][] = [];
for (const [server, stack] of [
  ["lean", () => st],
  ["connect-node", () => plain],
] as const) {
  transports.push(
    [
      `${server}: Connect JSON POST`,
      () =>
        createConnectTransport({
          baseUrl: stack().server.url,
          httpVersion: "1.1",
          interceptors: [withTestToken],
        }),
      stack,
    ],
    [
      `${server}: Connect GET`,
      () =>
        createConnectTransport({
          baseUrl: stack().server.url,
          httpVersion: "1.1",
          useHttpGet: true,
          useBinaryFormat: true,
          interceptors: [withTestToken],
        }),
      stack,
    ],
    [
      `${server}: gRPC (h2c)`,
      () =>
        createGrpcTransport({
          baseUrl: stack().server.url,
          sessionManager: h2(stack().server.url),
          interceptors: [withTestToken],
        }),
      stack,
    ],
    [
      `${server}: gRPC-Web`,
      () =>
        createGrpcWebTransport({
          baseUrl: stack().server.url,
          httpVersion: "1.1",
          interceptors: [withTestToken],
        }),
      stack,
    ],
  );
}

const numsub = async (jobId: string, stack: ApiStack = st) => {
  const reply = (await stack.redis.pubsub("NUMSUB", stack.store.channel(jobId))) as [
    string,
    number,
  ];
  return Number(reply[1]);
};

/** A promise's state right now, without waiting for it. */
async function settled(p: Promise<unknown>): Promise<boolean> {
  let done = false;
  p.then(
    () => {
      done = true;
    },
    () => {
      done = true;
    },
  );
  await new Promise((r) => setImmediate(r));
  return done;
}

describe.each(transports)("long-poll, %s", (_name, makeTransport, stack) => {
  let client: Client<typeof DownloadService>;
  beforeAll(() => {
    client = createClient(DownloadService, makeTransport());
  });

  test("waits while the job stays at the caller's version, answers with the change as soon as it comes", async () => {
    const jobId = (await client.initiate({ fileIds: [1, 2] })).job?.jobId ?? "";
    const first = await client.getStatus({ jobId });
    const version = first.job?.version ?? 0;
    expect(first.job?.state).toBe(JobState.QUEUED);

    const polling = client.getStatus({
      jobId,
      afterVersion: version,
      wait: { seconds: 60n, nanos: 0 },
    });
    // The server follows the job through the watch hub's subscription while it waits.
    await expect.poll(() => numsub(jobId, stack()), { timeout: 30_000 }).toBeGreaterThan(0);
    expect(await settled(polling)).toBe(false);

    await stack().startJob(jobId);
    const answer = await polling;
    expect(answer.job?.state).toBe(JobState.PROCESSING);
    expect(answer.job?.version).toBeGreaterThan(version);
    // Asked for 60 s, above the cap: clamped, and said so.
    expect(answer.wait).toEqual(expect.objectContaining({ seconds: BigInt(CAP_MS / 1000) }));
    expect(answer.waitNotice).toContain("cap");
  });

  test("answers with the same job when the wait ends without a change", async () => {
    const jobId = (await client.initiate({ fileIds: [3] })).job?.jobId ?? "";
    const version = (await client.getStatus({ jobId })).job?.version ?? 0;
    const answer = await client.getStatus({
      jobId,
      afterVersion: version,
      wait: { seconds: 1n, nanos: 0 },
    });
    expect(answer.job?.version).toBe(version);
    expect(answer.job?.state).toBe(JobState.QUEUED);
    expect(answer.wait?.seconds).toBe(1n);
    expect(answer.waitNotice).toBe("");
    // A job that can still change says when a plain poll is worth making again.
    expect(answer.pollAfter?.seconds).toBeGreaterThan(0n);
  });

  test("a wait longer than the caller's own deadline ends before it, with the job", async () => {
    const jobId = (await client.initiate({ fileIds: [7] })).job?.jobId ?? "";
    const version = (await client.getStatus({ jobId })).job?.version ?? 0;
    const answer = await client.getStatus(
      { jobId, afterVersion: version, wait: { seconds: 2n, nanos: 900_000_000 } },
      { timeoutMs: 2_000 },
    );
    expect(answer.job?.version).toBe(version);
    expect(answer.waitNotice).toContain("deadline");
  });

  test("answers at once when the caller is behind, or the job has ended", async () => {
    const jobId = (await client.initiate({ fileIds: [4] })).job?.jobId ?? "";
    const behind = await client.getStatus({ jobId, afterVersion: 0, wait: { seconds: 60n } });
    expect(behind.job?.version).toBeGreaterThan(0);

    const cancelled = await client.cancel({ jobId });
    const ended = await client.getStatus({
      jobId,
      afterVersion: cancelled.job?.version ?? 0,
      wait: { seconds: 60n },
    });
    expect(ended.job?.state).toBe(JobState.CANCELLED);
    expect(ended.pollAfter).toBeUndefined();
  });

  test("refuses a negative wait and an unknown job", async () => {
    const jobId = (await client.initiate({ fileIds: [5] })).job?.jobId ?? "";
    const negative = await client
      .getStatus({ jobId, wait: { seconds: -1n, nanos: 0 } })
      .catch((e: unknown) => ConnectError.from(e));
    expect(negative).toBeInstanceOf(ConnectError);
    expect((negative as ConnectError).code).toBe(Code.InvalidArgument);
    expect((negative as ConnectError).rawMessage).toContain("wait must not be negative");

    const unknown = await client
      .getStatus({ jobId: newJobId(), afterVersion: 1, wait: { seconds: 5n } })
      .catch((e: unknown) => ConnectError.from(e));
    expect((unknown as ConnectError).code).toBe(Code.NotFound);
  });
});

test("a long-poll whose caller goes away stops following the job", async () => {
  const client = createClient(
    DownloadService,
    createConnectTransport({
      baseUrl: st.server.url,
      httpVersion: "1.1",
      interceptors: [withTestToken],
    }),
  );
  const jobId = (await client.initiate({ fileIds: [6] })).job?.jobId ?? "";
  const version = (await client.getStatus({ jobId })).job?.version ?? 0;
  const abort = new AbortController();
  const polling = client
    .getStatus({ jobId, afterVersion: version, wait: { seconds: 60n } }, { signal: abort.signal })
    .catch((e: unknown) => ConnectError.from(e));
  await expect.poll(() => numsub(jobId), { timeout: 30_000 }).toBeGreaterThan(0);
  abort.abort();
  expect(((await polling) as ConnectError).code).toBe(Code.Canceled);
  // The hub unsubscribes a channel nobody follows any more.
  await expect.poll(() => numsub(jobId), { timeout: 30_000 }).toBe(0);
});

describe("conditional GET (curl-style JSON)", () => {
  const getUrl = (base: string, msg: object) =>
    `${base}/downloads.v1.DownloadService/GetStatus?encoding=json&message=${encodeURIComponent(JSON.stringify(msg))}`;

  test("carries an ETag; If-None-Match of the current version gets 304, a change gets 200 and a new tag", async () => {
    const client = createClient(
      DownloadService,
      createConnectTransport({
        baseUrl: st.server.url,
        httpVersion: "1.1",
        interceptors: [withTestToken],
      }),
    );
    const jobId = (await client.initiate({ fileIds: [10] })).job?.jobId ?? "";
    const url = getUrl(st.server.url, { jobId });

    const first = await fetch(url, { headers: TEST_AUTH_HEADER });
    expect(first.status).toBe(200);
    const etag = first.headers.get("etag") ?? "";
    // The version, and a queued job's estimate (core/forecast.ts).
    expect(etag).toMatch(/^"\d+(\.q[\w-]+)?"$/);
    expect(first.headers.get("cache-control")).toMatch(/max-age=\d+/);
    const body = (await first.json()) as { job: { version: number }; pollAfter?: string };
    expect(body.pollAfter).toMatch(/^\d+(\.\d+)?s$/);

    const same = await fetch(url, { headers: { ...TEST_AUTH_HEADER, "if-none-match": etag } });
    expect(same.status).toBe(304);
    expect(same.headers.get("etag")).toBe(etag);
    expect(await same.text()).toBe("");
    // Weak tags and lists match too (RFC 9110).
    const listed = await fetch(url, {
      headers: { ...TEST_AUTH_HEADER, "if-none-match": `"nope", W/${etag}` },
    });
    expect(listed.status).toBe(304);

    await st.startJob(jobId);
    const changed = await fetch(url, { headers: { ...TEST_AUTH_HEADER, "if-none-match": etag } });
    expect(changed.status).toBe(200);
    expect(changed.headers.get("etag")).not.toBe(etag);
    expect(((await changed.json()) as { job: { version: number } }).job.version).toBeGreaterThan(
      body.job.version,
    );
  });

  test("a completed job's tag names the URL window: within it the same URL, and 304", async () => {
    const client = createClient(
      DownloadService,
      createConnectTransport({
        baseUrl: st.server.url,
        httpVersion: "1.1",
        interceptors: [withTestToken],
      }),
    );
    const jobId = (await client.initiate({ fileIds: [11] })).job?.jobId ?? "";
    await st.startJob(jobId);
    await st.complete(jobId, Buffer.from("PK not really a zip"));
    const url = getUrl(st.server.url, { jobId });
    // Two reads in one window give the same tag and URL; a window boundary between
    // them (once a minute at most) gives new ones, so read until two agree.
    for (let i = 0; ; i++) {
      const a = await fetch(url, { headers: TEST_AUTH_HEADER });
      const b = await fetch(url, { headers: TEST_AUTH_HEADER });
      const tagA = a.headers.get("etag") ?? "";
      expect(tagA).toMatch(/^"\d+\.\d+"$/);
      const [ja, jb] = (await Promise.all([a.json(), b.json()])) as {
        job: { result: { downloadUrl: string }; state: string };
        pollAfter?: string;
      }[];
      expect(ja?.job.state).toBe("JOB_STATE_COMPLETED");
      expect(ja?.pollAfter).toBeUndefined();
      if (tagA !== b.headers.get("etag") && i < 3) continue;
      expect(jb?.job.result.downloadUrl).toBe(ja?.job.result.downloadUrl);
      const again = await fetch(url, { headers: { ...TEST_AUTH_HEADER, "if-none-match": tagA } });
      if (again.status === 200 && i < 3) continue;
      expect(again.status).toBe(304);
      break;
    }
  });

  test("a long-poll over GET answers 304 when the wait ends with the caller's version", async () => {
    const client = createClient(
      DownloadService,
      createConnectTransport({
        baseUrl: st.server.url,
        httpVersion: "1.1",
        interceptors: [withTestToken],
      }),
    );
    const jobId = (await client.initiate({ fileIds: [12] })).job?.jobId ?? "";
    const first = await fetch(getUrl(st.server.url, { jobId }), { headers: TEST_AUTH_HEADER });
    const etag = first.headers.get("etag") ?? "";
    const { job } = (await first.json()) as { job: { version: number } };
    const res = await fetch(
      getUrl(st.server.url, { jobId, afterVersion: job.version, wait: "1s" }),
      {
        headers: { ...TEST_AUTH_HEADER, "if-none-match": etag },
      },
    );
    expect(res.status).toBe(304);
  });
});

describe("a stopped job", () => {
  test("cancelled or failed, it shows no file in progress, no ETA and no speed", async () => {
    const client = createClient(
      DownloadService,
      createConnectTransport({
        baseUrl: st.server.url,
        httpVersion: "1.1",
        interceptors: [withTestToken],
      }),
    );
    for (const end of ["cancel", "fail"] as const) {
      const jobId = (await client.initiate({ fileIds: [20, 21] })).job?.jobId ?? "";
      await st.startJob(jobId);
      const rec = await st.store.get(jobId);
      // As the worker writes it while reading the first file.
      await recordProgress(
        st.store,
        { jobId, token: "test-driver", checkLock: false },
        {
          progress: {
            ...rec.progress,
            bytesDone: 500,
            bytesTotal: 2000,
            bytesPerSecond: 250,
            etaSeconds: 6,
          },
          files: rec.files.map((f, i) =>
            i === 0 ? { ...f, state: "IN_PROGRESS", bytesDone: 500, sizeBytes: 1000 } : f,
          ),
        },
      );
      const running = await client.getStatus({ jobId });
      expect(running.job?.files[0]?.state).toBe(FileState.IN_PROGRESS);
      expect(running.job?.progress?.etaSeconds).toBe(6);

      if (end === "cancel") await client.cancel({ jobId });
      else await st.fail(jobId);

      const check = (res: GetStatusResponse) => {
        expect(res.job?.state).toBe(end === "cancel" ? JobState.CANCELLED : JobState.FAILED);
        expect(res.job?.files.map((f) => f.state)).not.toContain(FileState.IN_PROGRESS);
        expect(res.job?.progress?.etaSeconds).toBeUndefined();
        expect(res.job?.progress?.bytesPerSecond).toBe(0n);
        // What was read stays reported.
        expect(res.job?.progress?.bytesDone).toBe(500n);
      };
      check(await client.getStatus({ jobId }));
      for await (const msg of client.watchJob({ jobId })) {
        if (msg.event.case === "job") {
          const job = msg.event.value;
          expect(job.files.map((f) => f.state)).not.toContain(FileState.IN_PROGRESS);
          expect(job.progress?.etaSeconds).toBeUndefined();
        }
      }
      // The JSON a curl user reads says the same.
      const res = await fetch(`${st.server.url}/downloads.v1.DownloadService/GetStatus`, {
        method: "POST",
        headers: { ...TEST_AUTH_HEADER, "content-type": "application/json" },
        body: JSON.stringify({ jobId }),
      });
      const json = JSON.stringify(await res.json());
      expect(json).not.toContain("IN_PROGRESS");
      expect(json).not.toContain("etaSeconds");
      expect(json).not.toContain("bytesPerSecond");
    }
  });
});

describe("streaming answers tell proxies not to buffer them", () => {
  test.each([
    ["lean", () => st],
    ["connect-node", () => plain],
  ] as const)(
    "%s: WatchJob says X-Accel-Buffering: no and Cache-Control: no-transform",
    async (_name, stack) => {
      const client = createClient(
        DownloadService,
        createConnectTransport({
          baseUrl: stack().server.url,
          httpVersion: "1.1",
          interceptors: [withTestToken],
        }),
      );
      const jobId = (await client.initiate({ fileIds: [30] })).job?.jobId ?? "";
      const body = Buffer.from(JSON.stringify({ jobId }));
      const frame = Buffer.alloc(5 + body.length);
      frame.writeUInt32BE(body.length, 1);
      body.copy(frame, 5);
      const abort = new AbortController();
      const res = await fetch(`${stack().server.url}/downloads.v1.DownloadService/WatchJob`, {
        method: "POST",
        headers: { ...TEST_AUTH_HEADER, "content-type": "application/connect+json" },
        body: frame,
        signal: abort.signal,
      });
      try {
        expect(res.status).toBe(200);
        expect(res.headers.get("x-accel-buffering")).toBe("no");
        expect(res.headers.get("cache-control")).toContain("no-transform");
      } finally {
        abort.abort();
      }
    },
  );
});
