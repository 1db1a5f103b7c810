import { createClient } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { afterAll, beforeAll, expect, test } from "vitest";
import type { JobRecord } from "../core/jobs.js";
import { DownloadService } from "../gen/downloads/v1/download_service_pb.js";
import { type ApiStack, startApiStack, withTestToken } from "./helpers/api.js";
import { spawnWorker, type WorkerProcess } from "./helpers/worker-process.js";
import { readZip } from "./helpers/zip.js";

// Fault: the worker running a job is SIGKILLed mid-job, and so is the one that takes it
// over. The third finishes it; the ZIP holds exactly the source bytes.

const MB = 1024 * 1024;

let st: ApiStack;
const sources = new Map<string, Buffer>();
const workers: WorkerProcess[] = [];

beforeAll(async () => {
  st = await startApiStack();
  sources.set("a.bin", await st.svc.putSource(401, 3 * MB, "a.bin"));
  sources.set("b.bin", await st.svc.putSource(402, 3 * MB, "b.bin"));
});
afterAll(async () => {
  for (const w of workers) await w.kill("SIGKILL");
  await st?.stop();
});

function worker(): WorkerProcess {
  const w = spawnWorker({
    ...st.svc.env,
    QUEUE_PREFIX: st.cfg.QUEUE_PREFIX,
    // Slow enough to be caught mid-job; a short lock so a dead worker's job moves on soon.
    THROTTLE_BYTES_PER_SECOND: String(2 * MB),
    PROGRESS_INTERVAL_MS: "100",
    JOB_LOCK_MS: "2000",
    JOB_STALLED_INTERVAL_MS: "1000",
    JOB_MAX_STALLED: "3",
  });
  workers.push(w);
  return w;
}

async function until(
  jobId: string,
  pred: (r: JobRecord) => boolean,
  what: string,
): Promise<JobRecord> {
  let rec: JobRecord | undefined;
  await expect
    .poll(async () => pred((rec = await st.store.get(jobId))), {
      timeout: 60_000,
      interval: 50,
      message: what,
    })
    .toBe(true);
  return rec as JobRecord;
}

test("a job whose worker is SIGKILLed mid-job twice in a row still completes with the right bytes", async () => {
  const client = createClient(
    DownloadService,
    createConnectTransport({
      baseUrl: st.server.url,
      httpVersion: "1.1",
      interceptors: [withTestToken],
    }),
  );
  const jobId = (await client.initiate({ fileIds: [401, 402] })).job?.jobId ?? "";
  const kills: string[] = [];
  for (const attempt of [1, 2]) {
    const w = worker();
    const rec = await until(
      jobId,
      (r) =>
        r.state === "PROCESSING" && r.attempts === attempt && r.progress.bytesDone > 512 * 1024,
      `attempt ${attempt} under way`,
    );
    await w.kill("SIGKILL");
    kills.push(
      `attempt ${attempt} at ${Math.round((rec.progress.bytesDone * 100) / rec.progress.bytesTotal)}%`,
    );
  }
  const started = Date.now();
  worker();
  const done = await until(
    jobId,
    (r) => r.state !== "PROCESSING" && r.state !== "QUEUED",
    "the job ends",
  );
  expect(done.state).toBe("COMPLETED");
  expect(done.attempts).toBe(3);

  const { job } = await client.getStatus({ jobId });
  const zip = Buffer.from(await (await fetch(job?.result?.downloadUrl ?? "")).arrayBuffer());
  const entries = await readZip(zip);
  const lost = [...sources]
    .filter(([name, bytes]) => !entries.get(name)?.equals(bytes))
    .map(([name]) => name);
  expect(lost).toEqual([]);
  expect(entries.size).toBe(2);
  console.log(
    `fault worker-kill: SIGKILLed the worker twice mid-job (${kills.join(", ")}); ` +
      `the third worker finished in ${Date.now() - started} ms after ${done.attempts} attempts; ` +
      `${zip.length} ZIP bytes, both files byte-identical; lost: ${lost.length}`,
  );
});
