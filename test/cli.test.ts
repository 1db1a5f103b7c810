import { type ChildProcess, execFileSync, spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, readFileSync } from "node:fs";
import { mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { PutObjectCommand } from "@aws-sdk/client-s3";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { createDownloadClient } from "../clients/lib/node.js";
import { newJobId } from "../core/jobs.js";
import { createLogger } from "../core/logger.js";
import { JobState } from "../gen/downloads/v1/download_service_pb.js";
import { type RunningWorker, startWorker } from "../worker/worker.js";
import { type ApiStack, startApiStack } from "./helpers/api.js";
import { TEST_TOKEN } from "./helpers/services.js";
import { readZip } from "./helpers/zip.js";

// The download-jobs CLI as a user runs it: a child process against the real API, a
// real worker and real S3, judged by its output, its exit code and the file it saves.

const CLI = join(import.meta.dirname, "..", "bin", "download-jobs.js");
/** Small files finish in about a second; the big ones take ~40 s at this rate, long enough to
 * interrupt even when each CLI process needs seconds to start on a loaded machine. */
const THROTTLE = 500_000;
const SMALL = [
  [81, 150_000, "alpha.bin"],
  [82, 250_000, "beta.bin"],
] as const;
const BIG = 83;

let st: ApiStack;
let worker: RunningWorker;
let dir: string;
const sources = new Map<number, Buffer>();
const children = new Set<ChildProcess>();

beforeAll(async () => {
  st = await startApiStack({ WATCH_HEARTBEAT_MS: "1000" });
  worker = await startWorker(
    { ...st.cfg, THROTTLE_BYTES_PER_SECOND: THROTTLE },
    createLogger("silent", "worker"),
  );
  for (const [id, size, name] of SMALL) sources.set(id, await st.svc.putSource(id, size, name));
  await st.svc.putSource(BIG, 20_000_000, "big.bin");
  dir = await mkdtemp(join(tmpdir(), "dj-cli-"));
});
afterAll(async () => {
  for (const c of children) c.kill("SIGKILL");
  await worker?.close();
  await st?.stop();
  if (dir !== undefined) await rm(dir, { recursive: true, force: true });
});

interface Run {
  child: ChildProcess;
  stdout: () => string;
  stderr: () => string;
  exit: Promise<number | null>;
}

function start(args: string[], env: Record<string, string> = {}): Run {
  const child = spawn(process.execPath, [CLI, ...args], {
    cwd: dir,
    env: {
      ...process.env,
      DOWNLOAD_JOBS_URL: st.server.url,
      DOWNLOAD_JOBS_TOKEN: TEST_TOKEN,
      ...env,
    },
    stdio: ["ignore", "pipe", "pipe"],
  });
  children.add(child);
  let out = "";
  let err = "";
  child.stdout?.on("data", (d: Buffer) => (out += d.toString()));
  child.stderr?.on("data", (d: Buffer) => (err += d.toString()));
  const exit = new Promise<number | null>((resolve) =>
    child.once("close", (code) => {
      children.delete(child);
      resolve(code);
    }),
  );
  return { child, stdout: () => out, stderr: () => err, exit };
}

async function cli(
  ...args: string[]
): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return cliWith({}, ...args);
}

async function cliWith(
  env: Record<string, string>,
  ...args: string[]
): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const run = start(args, env);
  const code = await run.exit;
  return { code, stdout: run.stdout(), stderr: run.stderr() };
}

/** Debian's Node, which a shell may find first on the PATH outside npm scripts. */
const SYSTEM_NODE = "/usr/bin/node";
const PINNED_NODE = (
  JSON.parse(readFileSync(join(import.meta.dirname, "..", "package.json"), "utf8")) as {
    dependencies: Record<string, string>;
  }
).dependencies.node;

function olderSystemNode(): boolean {
  if (!existsSync(SYSTEM_NODE)) return false;
  const version = execFileSync(SYSTEM_NODE, ["--version"], { encoding: "utf8" }).trim();
  return Number(version.slice(1).split(".")[0]) < Number(PINNED_NODE?.split(".")[0]);
}

const jobIdIn = (text: string) => /job ([0-9a-f-]{36})/.exec(text)?.[1] ?? "";
const api = () => createDownloadClient({ baseUrl: st.server.url, token: TEST_TOKEN });

async function freePort(): Promise<number> {
  const srv = createServer();
  await new Promise<void>((resolve) => srv.listen(0, "127.0.0.1", resolve));
  const { port } = srv.address() as { port: number };
  await new Promise<void>((resolve) => srv.close(() => resolve()));
  return port;
}

describe("download-jobs CLI", () => {
  test("initiate --watch prints each state in plain lines, exits 0, and download saves the verified ZIP", async () => {
    const run = await cli("initiate", "81", "82", "--watch");
    expect(run.code).toBe(0);
    const jobId = jobIdIn(run.stderr + run.stdout);
    expect(jobId).not.toBe("");
    const states = run.stdout
      .split("\n")
      .map((l) => /^(QUEUED|PROCESSING|COMPLETED)\b/.exec(l)?.[1])
      .filter((s) => s !== undefined);
    expect(states[0]).toBe("QUEUED");
    expect(states.at(-1)).toBe("COMPLETED");
    expect(states).toContain("PROCESSING");
    expect(run.stdout).toContain(`download-jobs download ${jobId}`);
    const sha = /sha256:\s+([0-9a-f]{64})/.exec(run.stdout)?.[1];

    const dl = await cli("download", jobId, "-o", "out.zip");
    expect(dl.code).toBe(0);
    const bytes = await readFile(join(dir, "out.zip"));
    expect(createHash("sha256").update(bytes).digest("hex")).toBe(sha);
    const entries = await readZip(bytes);
    expect([...entries.keys()].sort()).toEqual(["alpha.bin", "beta.bin"]);
    expect(entries.get("alpha.bin")?.equals(sources.get(81) ?? Buffer.alloc(0))).toBe(true);
    expect(entries.get("beta.bin")?.equals(sources.get(82) ?? Buffer.alloc(0))).toBe(true);

    // An existing file is never overwritten without --force.
    await writeFile(join(dir, "taken.zip"), "mine");
    const refused = await cli("download", jobId, "-o", "taken.zip");
    expect(refused.code).toBe(2);
    expect(refused.stderr).toContain("--force");
    expect(await readFile(join(dir, "taken.zip"), "utf8")).toBe("mine");
    const forced = await cli("download", jobId, "-o", "taken.zip", "--force");
    expect(forced.code).toBe(0);
    expect((await readFile(join(dir, "taken.zip"))).equals(bytes)).toBe(true);
  });

  test("download of a job still running waits for it, then saves the ZIP", async () => {
    const { job } = await api().initiate({ fileIds: [82] });
    const jobId = job?.jobId ?? "";
    const dl = await cli("download", jobId, "-o", "waited.zip");
    expect(dl.code).toBe(0);
    expect(dl.stdout).toContain("sha256");
    const done = (await api().getStatus({ jobId })).job;
    const bytes = await readFile(join(dir, "waited.zip"));
    expect(createHash("sha256").update(bytes).digest("hex")).toBe(done?.result?.sha256);
    expect((await readZip(bytes)).get("beta.bin")?.equals(sources.get(82) ?? Buffer.alloc(0))).toBe(
      true,
    );
  });

  test("a ZIP whose bytes do not match the job's SHA-256 is refused and leaves no file", async () => {
    const run = await cli("--json", "initiate", "81", "--watch");
    const jobId = (JSON.parse(run.stdout.trim().split("\n")[0] ?? "{}") as { jobId: string }).jobId;
    // Someone (or a broken disk) changed the object after the job finished.
    await st.svc.storage.client.send(
      new PutObjectCommand({
        Bucket: st.cfg.RESULT_BUCKET,
        Key: st.svc.storage.resultKey(jobId),
        Body: Buffer.from("not the zip"),
      }),
    );
    const dl = await cli("download", jobId, "-o", "corrupt.zip");
    expect(dl.code).toBe(1);
    expect(dl.stderr).toContain("checksum mismatch");
    expect((await readdir(dir)).filter((f) => f.startsWith("corrupt.zip"))).toEqual([]);
  });

  test("--json writes one job per line with increasing versions, ending COMPLETED; status --json too, over gRPC", async () => {
    const run = await cli("--json", "initiate", "81", "--watch");
    expect(run.code).toBe(0);
    const jobs = run.stdout
      .trim()
      .split("\n")
      .map(
        (l) =>
          JSON.parse(l) as {
            jobId: string;
            state: string;
            version: number;
            result?: { sha256: string };
          },
      );
    const versions = jobs.map((j) => j.version);
    expect(versions).toEqual([...versions].sort((a, b) => a - b));
    expect(new Set(versions).size).toBe(versions.length);
    expect(jobs[0]?.state).toBe("JOB_STATE_QUEUED");
    expect(jobs.at(-1)?.state).toBe("JOB_STATE_COMPLETED");
    expect(jobs.at(-1)?.result?.sha256).toMatch(/^[0-9a-f]{64}$/);

    const jobId = jobs[0]?.jobId ?? "";
    for (const protocol of ["grpc", "grpc-web", "connect"]) {
      const status = await cli("--json", "--protocol", protocol, "status", jobId);
      expect(status.code).toBe(0);
      expect(JSON.parse(status.stdout)).toMatchObject({ jobId, state: "JOB_STATE_COMPLETED" });
    }

    const dl = await cli("--json", "download", jobId, "-o", "json.zip");
    expect(dl.code).toBe(0);
    expect(JSON.parse(dl.stdout)).toMatchObject({ jobId, sha256: jobs.at(-1)?.result?.sha256 });
  });

  test("usage errors exit 2 and say what to fix; unknown jobs and refused cancels exit 1", async () => {
    const [badId, dup, malformed, unknownCommand, missingArg, badProtocol, unknown] =
      await Promise.all([
        cli("initiate", "81", "abc"),
        cli("initiate", "81", "81"),
        cli("status", "not-a-job-id"),
        cli("frobnicate"),
        cli("status"),
        cli("--protocol", "carrier-pigeon", "status", newJobId()),
        cli("status", newJobId()),
      ]);
    expect(badId.code).toBe(2);
    expect(badId.stderr).toContain('"abc"');
    expect(dup.code).toBe(2);
    expect(dup.stderr).toMatch(/error: .+/);
    expect(malformed.code).toBe(2);
    expect(unknownCommand.code).toBe(2);
    expect(missingArg.code).toBe(2);
    expect(badProtocol.code).toBe(2);
    expect(unknown.code).toBe(1);
    expect(unknown.stderr).toContain("not found");

    const done = await cli("--json", "initiate", "81", "--watch");
    const jobId = (JSON.parse(done.stdout.trim().split("\n")[0] ?? "{}") as { jobId: string })
      .jobId;
    const cancel = await cli("cancel", jobId);
    expect(cancel.code).toBe(1);
  });

  test("list, retry and delete: labelled jobs listed by state and label, a failed one run again, a finished one deleted", async () => {
    const tag = `t${newJobId().slice(0, 8)}`;
    const ok = await cli(
      "initiate",
      "81",
      "--label",
      `run=${tag}`,
      "--label",
      "kind=ok",
      "--watch",
    );
    expect(ok.code).toBe(0);
    const okId = jobIdIn(ok.stdout);
    // File 84 does not exist yet: the job fails with not_found.
    const bad = await cli("initiate", "82", "84", "--label", `run=${tag}`, "--watch");
    expect(bad.code).toBe(1);
    const badId = jobIdIn(bad.stdout);

    const all = await cli("list", "--label", `run=${tag}`);
    expect(all.code).toBe(0);
    const lines = all.stdout.trim().split("\n");
    expect(lines.map((l) => l.split(/\s+/)[0])).toEqual([badId, okId]);
    expect(lines[0]).toMatch(/FAILED\s+2 files/);
    expect(lines[1]).toContain(`kind=ok,run=${tag}`);
    const failed = await cli("--json", "list", "--state", "failed", "--label", `run=${tag}`);
    expect(
      failed.stdout
        .trim()
        .split("\n")
        .map((l) => (JSON.parse(l) as { jobId: string }).jobId),
    ).toEqual([badId]);

    await st.svc.putSource(84, 10_000, "late.bin");
    const retried = await cli("retry", badId, "--watch");
    expect(retried.code).toBe(0);
    expect(retried.stderr).toContain("queued again");
    expect(retried.stdout).toContain(`job ${badId}: COMPLETED`);

    const deleted = await cli("delete", badId);
    expect(deleted.code).toBe(0);
    expect(deleted.stdout).toContain("deleted");
    expect((await cli("status", badId)).code).toBe(1);
    expect((await cli("list", "--label", `run=${tag}`)).stdout.trim().split("\n")).toHaveLength(1);

    const [badState, badLabel, badServerLabel] = await Promise.all([
      cli("list", "--state", "done"),
      cli("list", "--label", "nolabel"),
      cli("initiate", "81", "--label", "Bad=x"),
    ]);
    expect(badState.code).toBe(2);
    expect(badState.stderr).toContain("--state takes one of");
    expect(badLabel.code).toBe(2);
    expect(badServerLabel.code).toBe(2);
    expect(badServerLabel.stderr).toContain('key "Bad"');
  });

  test("initiate --priority: above the token's maximum exits 1 naming it; not 0-9 is a usage error", async () => {
    // The test owner's token states no max_priority: its maximum is DEFAULT_MAX_PRIORITY, 0.
    const above = await cli("initiate", "81", "--priority", "3");
    expect(above.code).toBe(1);
    expect(above.stderr).toMatch(/priority 3 is above what you may use: your maximum is 0/);
    const bad = await cli("initiate", "81", "--priority", "high");
    expect(bad.code).toBe(2);
    expect(bad.stderr).toMatch(/--priority takes a whole number from 0 to 9/);
    const ok = await cli("--json", "initiate", "81", "--priority", "0");
    expect(ok.code).toBe(0);
    const made = JSON.parse(ok.stdout.trim()) as { state: string; jobId: string };
    expect(made.state).toBe("JOB_STATE_QUEUED");
    // Out of the way of the next tests' jobs.
    await api().cancel({ jobId: made.jobId });
  });

  test("sends the token from --token or DOWNLOAD_JOBS_TOKEN, and says which to set when it is missing", async () => {
    const noToken = { DOWNLOAD_JOBS_TOKEN: "" };
    const [missing, flag, wrong] = await Promise.all([
      cliWith(noToken, "status", newJobId()),
      cliWith(noToken, "--token", TEST_TOKEN, "initiate", "81"),
      cliWith({ DOWNLOAD_JOBS_TOKEN: "not-the-token" }, "status", newJobId()),
    ]);
    expect(missing.code).toBe(1);
    expect(missing.stderr).toContain("--token or set DOWNLOAD_JOBS_TOKEN");
    expect(wrong.code).toBe(1);
    expect(wrong.stderr).toContain("DOWNLOAD_JOBS_TOKEN");
    expect(flag.code).toBe(0);
    expect(flag.stdout).toMatch(/job [0-9a-f-]{36}: QUEUED/);
  });

  test("says clearly when the API cannot be reached, naming the URL", async () => {
    const url = `http://127.0.0.1:${await freePort()}`;
    const run = await cli("--url", url, "watch", newJobId());
    expect(run.code).toBe(1);
    expect(run.stderr).toContain(`cannot reach the download-jobs API at ${url}`);
  });

  test("initiate says what the server did: created, replayed, in flight or reused result", async () => {
    // Dedup and reuse are off for the other tests; this API, on the same Redis, S3 and
    // worker, has them on as a deployment does.
    const dedup = await startApiStack(
      { QUEUE_PREFIX: st.cfg.QUEUE_PREFIX, DEDUP_IN_FLIGHT: "true", REUSE_RESULTS: "true" },
      { services: st.svc },
    );
    try {
      await st.svc.putSource(84, 100_000, "small.bin");
      await st.svc.putSource(85, 100_000, "other.bin");
      await st.svc.putSource(86, 20_000_000, "slow.bin");
      const at = { DOWNLOAD_JOBS_URL: dedup.server.url };

      const created = await cliWith(at, "initiate", "84", "--watch");
      expect(created.code).toBe(0);
      const jobId = jobIdIn(created.stderr);
      expect(created.stderr).toContain(`job ${jobId}: created`);
      const reused = await cliWith(at, "initiate", "84");
      expect(reused.code).toBe(0);
      expect(reused.stderr).toContain(`job ${jobId}: reused result`);
      expect(reused.stdout).toContain("COMPLETED");

      const slow = await cliWith(at, "initiate", "86");
      const slowId = jobIdIn(slow.stderr);
      expect(slow.stderr).toContain(`job ${slowId}: created`);
      const again = await cliWith(at, "initiate", "86");
      expect(again.stderr).toContain(`job ${slowId}: in flight`);
      await api().cancel({ jobId: slowId });

      const key = `cli-${process.pid}-${Date.now()}`;
      const first = await cliWith(at, "initiate", "85", "--request-id", key);
      const keyed = jobIdIn(first.stderr);
      expect(first.stderr).toContain(`job ${keyed}: created`);
      const replay = await cliWith(at, "--json", "initiate", "85", "--request-id", key);
      expect(replay.stderr).toContain(`job ${keyed}: replayed`);
      // The note stays out of the JSON: stdout is still exactly one job.
      expect((JSON.parse(replay.stdout) as { jobId: string }).jobId).toBe(keyed);
    } finally {
      await dedup.stop();
    }
  });

  test.skipIf(!olderSystemNode())(
    "run by an older system Node, it hands over to the pinned Node that npm ci installed",
    async () => {
      const run = await new Promise<{ code: number | null; out: string }>((resolve) => {
        const child = spawn(SYSTEM_NODE, [CLI, "--version"], { stdio: ["ignore", "pipe", "pipe"] });
        let out = "";
        child.stdout.on("data", (d: Buffer) => (out += d.toString()));
        child.once("close", (code) => resolve({ code, out }));
      });
      expect(run.code).toBe(0);
      expect(run.out).toContain(`(Node v${PINNED_NODE})`);
    },
  );

  test("a failed job exits 1 with its error; a cancelled one exits 3", async () => {
    const failed = await cli("initiate", "81", "99999", "--watch");
    expect(failed.code).toBe(1);
    expect(failed.stdout).toContain("FAILED");
    expect(failed.stdout).toMatch(/error: .*99999/);

    const { job } = await api().initiate({ fileIds: [BIG] });
    const jobId = job?.jobId ?? "";
    const watching = start(["watch", jobId]);
    await expect.poll(() => watching.stdout()).toContain("PROCESSING");
    const cancel = await cli("cancel", jobId);
    expect(cancel.code).toBe(0);
    expect(await watching.exit).toBe(3);
    expect(watching.stdout()).toContain("CANCELLED");
  });

  test("Ctrl-C detaches and says how to resume while the job keeps running; --cancel-on-interrupt cancels it", async () => {
    const { job } = await api().initiate({ fileIds: [BIG] });
    const jobId = job?.jobId ?? "";
    const first = start(["watch", jobId]);
    await expect.poll(() => first.stdout()).toContain("PROCESSING");
    first.child.kill("SIGINT");
    expect(await first.exit).toBe(130);
    expect(first.stderr()).toContain(`download-jobs watch ${jobId}`);
    const after = (await api().getStatus({ jobId })).job;
    expect(after?.state).toBe(JobState.PROCESSING);

    const second = start(["watch", jobId, "--cancel-on-interrupt"]);
    await expect.poll(() => second.stdout()).toContain("PROCESSING");
    second.child.kill("SIGINT");
    expect(await second.exit).toBe(3);
    expect((await api().getStatus({ jobId })).job?.state).toBe(JobState.CANCELLED);
  });

  test("on a terminal it draws live progress bars (overall and per file)", async () => {
    // script(1) gives the CLI a pseudo-terminal, as an interactive shell would.
    const { job } = await api().initiate({ fileIds: [81, 82] });
    const jobId = job?.jobId ?? "";
    const child = spawn(
      "script",
      ["-q", "-e", "-c", `'${process.execPath}' '${CLI}' watch ${jobId}`, "/dev/null"],
      {
        cwd: dir,
        env: { ...process.env, DOWNLOAD_JOBS_URL: st.server.url, DOWNLOAD_JOBS_TOKEN: TEST_TOKEN },
        stdio: ["ignore", "pipe", "pipe"],
      },
    );
    children.add(child);
    let out = "";
    child.stdout.on("data", (d: Buffer) => (out += d.toString()));
    const code = await new Promise<number | null>((resolve) => child.once("close", resolve));
    expect(code).toBe(0);
    expect(out).toMatch(/100% \| COMPLETED \| 2\/2 files/);
    expect(out).toContain("alpha.bin");
    expect(out).toContain("beta.bin");
    expect(out).toContain(`job ${jobId}: COMPLETED`);
  });
});
