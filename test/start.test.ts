import { type ChildProcess, execFile, spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { promisify } from "node:util";
import { afterEach, describe, expect, test } from "vitest";
import { loadConfig } from "../core/config.js";
import { Storage, storageOptionsFrom } from "../core/storage.js";
import { canConnect, freePort, StopWaiting, waitUntil } from "../local/ports.js";
import { LOCAL_S3_CREDENTIALS } from "../local/s3-server.js";
import { SAMPLE_FILES } from "../local/samples.js";
import { STARTUP_MS } from "./helpers/deadline.js";

// `npm start` as a user runs it: a real process tree (redis-server, s3rver, API, worker),
// driven through its printed address with plain JSON like curl, stopped with Ctrl-C.

const ROOT = resolve(import.meta.dirname, "..");

// What the caller's environment could set that would change what npm start does.
const STRIPPED = [
  "REDIS_URL",
  "S3_ENDPOINT",
  "S3_PUBLIC_ENDPOINT",
  "S3_ACCESS_KEY_ID",
  "S3_SECRET_ACCESS_KEY",
  "PORT",
  "HOST",
  "DATA_DIR",
  "SEED_SAMPLES",
  "THROTTLE_BYTES_PER_SECOND",
  "QUEUE_PREFIX",
  "AUTH_TOKENS",
  "AUTH_DISABLED",
];

// The development token each `npm start` prints, by the address it serves.
const tokens = new Map<string, string>();

interface Stack {
  proc: ChildProcess;
  base: string;
  port: number;
  s3Endpoint: string;
  redisPid: number;
  apiPid: number;
  workerPid: number;
  output(): string;
  exit: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

const started: Stack[] = [];
const dirs: string[] = [];

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}

function tempDir(): string {
  const dir = mkdtempSync(join(tmpdir(), "dj-start-"));
  dirs.push(dir);
  return dir;
}

async function startStack(env: Record<string, string>): Promise<Stack> {
  const childEnv: NodeJS.ProcessEnv = { ...process.env, LOG_LEVEL: "warn", ...env };
  for (const k of STRIPPED) if (!(k in env)) delete childEnv[k];
  const proc = spawn(process.execPath, ["--import", "tsx", "scripts/start.ts"], {
    cwd: ROOT,
    env: childEnv,
    stdio: ["ignore", "pipe", "pipe"],
  });
  let out = "";
  proc.stdout?.on("data", (d: Buffer) => (out += d.toString()));
  proc.stderr?.on("data", (d: Buffer) => (out += d.toString()));
  const exit = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((r) =>
    proc.once("exit", (code, signal) => r({ code, signal })),
  );
  const pidOf = (re: RegExp) => Number(re.exec(out)?.[1] ?? -1);
  const stack: Stack = {
    proc,
    base: "",
    port: Number(env.PORT),
    s3Endpoint: "",
    redisPid: -1,
    apiPid: -1,
    workerPid: -1,
    output: () => out,
    exit,
  };
  started.push(stack);
  try {
    await waitUntil(
      "npm start",
      async () => {
        if (proc.exitCode !== null) throw new StopWaiting(`npm start exited early:\n${out}`);
        return /download-jobs is ready at /.test(out);
      },
      STARTUP_MS,
    );
  } finally {
    // Record the pids even on failure, so afterEach can stop whatever did start.
    stack.redisPid = pidOf(/redis-server pid (\d+)/);
    stack.apiPid = pidOf(/api pid (\d+)/);
    stack.workerPid = pidOf(/worker pid (\d+)/);
  }
  if (proc.exitCode !== null) throw new Error(`npm start exited early:\n${out}`);
  stack.base = /download-jobs is ready at (http:\/\/\S+)/.exec(out)?.[1] ?? "";
  tokens.set(stack.base, /development token \(.*\): (\S+)/.exec(out)?.[1] ?? "");
  stack.s3Endpoint = /S3\s+(http:\/\/\S+)/.exec(out)?.[1] ?? "";
  return stack;
}

async function rpc(base: string, method: string, body: unknown): Promise<Record<string, any>> {
  const res = await fetch(`${base}/downloads.v1.DownloadService/${method}`, {
    method: "POST",
    headers: {
      "Content-Type": "application/json",
      Authorization: `Bearer ${tokens.get(base) ?? ""}`,
    },
    body: JSON.stringify(body),
  });
  const json = (await res.json()) as Record<string, any>;
  if (!res.ok) throw new Error(`${method} answered ${res.status}: ${JSON.stringify(json)}`);
  return json;
}

async function waitForState(
  base: string,
  jobId: string,
  state: string,
): Promise<Record<string, any>> {
  let job: Record<string, any> = {};
  await waitUntil(
    `job ${jobId} ${state}`,
    async () => {
      job = (await rpc(base, "GetStatus", { jobId })).job;
      return job.state === state;
    },
    60_000,
  );
  return job;
}

/** The printed example line that starts with `start` (after its indent). */
function exampleLine(stack: Stack, start: string): string {
  const line = stack
    .output()
    .split("\n")
    .map((l) => l.trim())
    .find((l) => l.startsWith(start));
  if (line === undefined) throw new Error(`no example starting "${start}" in:\n${stack.output()}`);
  return line;
}

/** Runs a printed shell example exactly as a user pastes it. */
async function paste(line: string): Promise<{ stdout: string; stderr: string }> {
  return promisify(execFile)("sh", ["-c", line], { cwd: ROOT, timeout: 60_000 });
}

/** The printed curl example that starts a job, run as printed: the job it made. */
async function runCurlExample(
  stack: Stack,
): Promise<{ job: Record<string, any>; outcome: string }> {
  const { stdout } = await paste(
    exampleLine(stack, `curl -s -X POST ${stack.base}/downloads.v1.DownloadService/Initiate`),
  );
  return JSON.parse(stdout) as { job: Record<string, any>; outcome: string };
}

/** The three file id lists the printed examples ask for: curl, TypeScript, CLI. */
function exampleFileIds(stack: Stack): number[][] {
  const curl = /"fileIds":(\[[\d,]+\])/.exec(exampleLine(stack, "curl -s -X POST"))?.[1] ?? "[]";
  const ts =
    /fileIds: (\[[\d, ]+\])/.exec(
      exampleLine(stack, "const { job } = await client.initiate"),
    )?.[1] ?? "[]";
  const cli =
    /initiate ([\d ]+) --watch/.exec(exampleLine(stack, "DOWNLOAD_JOBS_TOKEN="))?.[1] ?? "";
  return [JSON.parse(curl) as number[], JSON.parse(ts) as number[], cli.split(" ").map(Number)];
}

async function expectAllStopped(stack: Stack): Promise<void> {
  for (const pid of [stack.redisPid, stack.apiPid, stack.workerPid]) {
    expect(pid).toBeGreaterThan(0);
    expect(alive(pid), `pid ${pid} still running`).toBe(false);
  }
  expect(await canConnect(stack.port)).toBe(false);
  expect(await canConnect(Number(new URL(stack.s3Endpoint).port))).toBe(false);
}

afterEach(async () => {
  // Whatever a failed test left running, stopped by pid.
  for (const s of started.splice(0)) {
    if (s.proc.exitCode === null && s.proc.signalCode === null) s.proc.kill("SIGKILL");
    for (const pid of [s.apiPid, s.workerPid, s.redisPid])
      if (pid > 0 && alive(pid)) process.kill(pid, "SIGKILL");
  }
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

describe("npm start", () => {
  test("brings up Redis, S3 with the samples, the API and a worker; Ctrl-C stops all of it with code 0", async () => {
    const stack = await startStack({
      PORT: String(await freePort()),
      DATA_DIR: tempDir(),
      THROTTLE_BYTES_PER_SECOND: String(1024 * 1024 * 1024),
    });
    expect(stack.base).toBe(`http://127.0.0.1:${stack.port}`);
    // The examples follow the "ready at" line and may arrive in a later pipe chunk.
    await expect.poll(() => stack.output()).toContain("Ctrl-C stops everything");
    expect(stack.output()).toContain(
      `curl -s -X POST ${stack.base}/downloads.v1.DownloadService/Initiate`,
    );
    expect(stack.output()).toContain("npx buf curl --schema proto");
    expect(stack.output()).toContain("createConnectTransport");
    // Auth is on by default: the printed token is what the examples send.
    const token = tokens.get(stack.base) ?? "";
    expect(token).toMatch(/^dj_dev_/);
    expect(stack.output()).toContain(`-H 'Authorization: Bearer ${token}'`);

    const storage = new Storage(
      storageOptionsFrom(
        loadConfig({
          S3_ENDPOINT: stack.s3Endpoint,
          S3_ACCESS_KEY_ID: LOCAL_S3_CREDENTIALS.accessKeyId,
          S3_SECRET_ACCESS_KEY: LOCAL_S3_CREDENTIALS.secretAccessKey,
        }),
      ),
    );
    try {
      for (const f of SAMPLE_FILES) {
        expect(await storage.headSource(f.fileId)).toMatchObject({
          sizeBytes: f.sizeBytes,
          fileName: f.fileName,
        });
      }
    } finally {
      storage.destroy();
    }

    // Each example asks for files of its own, and the first start's are new to Redis: the
    // curl example pasted as printed starts a job that runs.
    const lists = exampleFileIds(stack).map((l) => l.join(","));
    expect(new Set(lists).size).toBe(3);
    for (const l of lists) expect(l).toMatch(/^7000\d,7000\d,7000\d$/);
    const { job, outcome } = await runCurlExample(stack);
    expect(outcome).toBe("INITIATE_OUTCOME_CREATED");
    expect(job.state).toBe("JOB_STATE_QUEUED");
    const done = await waitForState(stack.base, job.jobId, "JOB_STATE_COMPLETED");

    // The CLI example, pasted as printed, starts a job of its own and says so.
    const cli = await paste(exampleLine(stack, "DOWNLOAD_JOBS_TOKEN="));
    expect(cli.stderr).toMatch(/job [0-9a-f-]{36}: created/);
    expect(cli.stdout).toContain("COMPLETED");
    const zip = Buffer.from(await (await fetch(done.result.downloadUrl)).arrayBuffer());
    expect(zip.length).toBe(Number(done.result.sizeBytes));
    expect(createHash("sha256").update(zip).digest("hex")).toBe(done.result.sha256);

    stack.proc.kill("SIGINT");
    expect(await stack.exit).toEqual({ code: 0, signal: null });
    await expectAllStopped(stack);
  });

  test("a restart on the same data folder keeps every job and seeds nothing again", async () => {
    const dataDir = tempDir();
    const env = { DATA_DIR: dataDir, THROTTLE_BYTES_PER_SECOND: String(1024 * 1024 * 1024) };
    const first = await startStack({ ...env, PORT: String(await freePort()) });
    await expect
      .poll(() => first.output(), { timeout: 10_000 })
      .toContain("Ctrl-C stops everything");
    const { job } = await runCurlExample(first);
    const done = await waitForState(first.base, job.jobId, "JOB_STATE_COMPLETED");
    first.proc.kill("SIGTERM");
    expect(await first.exit).toEqual({ code: 0, signal: null });
    await expectAllStopped(first);

    const second = await startStack({ ...env, PORT: String(await freePort()) });
    expect(second.output()).toMatch(/0 uploaded, 10 already there/);
    const again = (await rpc(second.base, "GetStatus", { jobId: job.jobId })).job;
    expect(again).toMatchObject({
      state: "JOB_STATE_COMPLETED",
      fileIds: done.fileIds,
      version: done.version,
    });
    expect(again.result.sha256).toBe(done.result.sha256);
    // The first start's examples would hand back its finished job: this start prints
    // other files, and its curl example starts a new job again.
    await expect
      .poll(() => second.output(), { timeout: 10_000 })
      .toContain("Ctrl-C stops everything");
    const before = exampleFileIds(first).map((l) => l.join(","));
    for (const l of exampleFileIds(second)) expect(before).not.toContain(l.join(","));
    const next = await runCurlExample(second);
    expect(next.outcome).toBe("INITIATE_OUTCOME_CREATED");
    expect(next.job.jobId).not.toBe(job.jobId);
    second.proc.kill("SIGINT");
    expect(await second.exit).toEqual({ code: 0, signal: null });
    await expectAllStopped(second);
  }, 240_000);

  test("when the worker dies it stops everything else and exits non-zero", async () => {
    const stack = await startStack({
      PORT: String(await freePort()),
      DATA_DIR: tempDir(),
      SEED_SAMPLES: "false",
    });
    process.kill(stack.workerPid, "SIGKILL");
    const exit = await stack.exit;
    expect(exit.code).not.toBe(0);
    expect(stack.output()).toMatch(/worker exited unexpectedly/);
    await expectAllStopped(stack);
  });
});
