import { readdirSync, rmSync } from "node:fs";
import { join, resolve } from "node:path";
import { createClient } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { DownloadService, JobState } from "../gen/downloads/v1/download_service_pb.js";
import { waitUntil } from "../local/ports.js";
import { buildServer, RUNTIME_ASSETS } from "../scripts/build-server.js";
import { withTestToken } from "./helpers/api.js";
import { STARTUP_MS } from "./helpers/deadline.js";
import { type EntryProcess, startEntry, untilLogged } from "./helpers/entry-process.js";
import { type Services, startServices, uniquePrefix } from "./helpers/services.js";
import { readZip } from "./helpers/zip.js";

// The image runs the API and the worker as `npm run build` compiles them (JavaScript in
// dist/, beside the Lua scripts and migrations they read), not through tsx as every
// other test does. Here that build, made into a folder of its own, runs a job end to
// end: a file the compiled code cannot find, or an import tsc rewrote wrongly, fails here.

const ROOT = resolve(import.meta.dirname, "..");
const OUT = `.test-dist-${process.pid}`;

let svc: Services;
const procs: EntryProcess[] = [];
let apiUrl = "";
const sources = new Map<number, Buffer>();

function start(name: string, entry: string, env: Record<string, string>): EntryProcess {
  const p = startEntry(name, entry, env, OUT);
  procs.push(p);
  return p;
}

beforeAll(async () => {
  buildServer(OUT);
  svc = await startServices();
  sources.set(701, await svc.putSource(701, 300 * 1024, "report.csv"));
  sources.set(702, await svc.putSource(702, 64 * 1024, "photo.jpg"));
  const env = {
    ...svc.env,
    QUEUE_PREFIX: uniquePrefix("compiled"),
    HOST: "127.0.0.1",
    PORT: "0",
    LOG_LEVEL: "info",
    LOG_FORMAT: "json",
  };
  const api = start("api (compiled)", "server/main.ts", env);
  const worker = start("worker (compiled)", "worker/main.ts", env);
  await Promise.all([
    untilLogged("api", api, "api listening (HTTP/1.1 and h2c)"),
    untilLogged("worker", worker, "worker ready"),
  ]);
  apiUrl = String(api.lines.find((l) => l.url !== undefined)?.url);
}, STARTUP_MS + 60_000);

afterAll(async () => {
  await Promise.all(procs.map((p) => p.proc.stop(10_000)));
  await svc?.stop();
  rmSync(join(ROOT, OUT), { recursive: true, force: true });
});

describe("the compiled build (npm run build), as the image runs it", () => {
  test("holds the files the code reads at run time", () => {
    for (const dir of RUNTIME_ASSETS) {
      const shipped = readdirSync(join(ROOT, OUT, dir)).sort();
      expect(shipped, dir).toEqual(readdirSync(join(ROOT, dir)).sort());
    }
  });

  test("its API and worker run a job to a ZIP of the exact sources", async () => {
    const client = createClient(
      DownloadService,
      createConnectTransport({
        baseUrl: apiUrl,
        httpVersion: "1.1",
        interceptors: [withTestToken],
      }),
    );
    const { job } = await client.initiate({ fileIds: [701, 702] });
    const jobId = job?.jobId ?? "";
    let last = job;
    for await (const msg of client.watchJob({ jobId })) {
      if (msg.event.case === "job") last = msg.event.value;
    }
    expect(last?.state).toBe(JobState.COMPLETED);
    // The compiled worker ran it (it logs once its completing write returns, so the line
    // may follow the watcher's COMPLETED by a moment).
    const worker = procs[1] as EntryProcess;
    await waitUntil(`the compiled worker's log of ${jobId} completed`, async () =>
      worker.lines.some((l) => l.msg === "job completed" && l.jobId === jobId),
    );

    const url = last?.result?.downloadUrl ?? "";
    const res = await fetch(url);
    expect(res.status).toBe(200);
    const entries = await readZip(Buffer.from(await res.arrayBuffer()));
    expect(entries.size).toBe(2);
    for (const [i, id] of [701, 702].entries()) {
      const name = last?.files[i]?.entryName ?? "";
      expect(entries.get(name)?.equals(sources.get(id) as Buffer), name).toBe(true);
    }
  });
});
