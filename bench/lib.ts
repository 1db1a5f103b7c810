import { type ChildProcess, spawn } from "node:child_process";
import { once } from "node:events";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { cpus, totalmem } from "node:os";
import { join } from "node:path";
import { nodeFlagsFor } from "../local/service-process.js";

// Shared bits of the benchmark scenarios: process memory readings, percentiles, the
// printed table and the JSON written under bench/results/.

/** Resident and peak resident memory of a process, from /proc (bytes). */
export function procMemory(pid: number): { rss: number; peak: number } {
  const status = readFileSync(`/proc/${pid}/status`, "utf8");
  const kb = (field: string) =>
    Number(new RegExp(`^${field}:\\s+(\\d+) kB`, "m").exec(status)?.[1] ?? 0) * 1024;
  return { rss: kb("VmRSS"), peak: kb("VmHWM") };
}

export function percentile(values: readonly number[], p: number): number {
  if (values.length === 0) return Number.NaN;
  const sorted = [...values].sort((a, b) => a - b);
  const idx = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[idx] as number;
}

export const MB = 1024 * 1024;

export function fmt(n: number, digits = 1): string {
  return Number.isFinite(n) ? n.toFixed(digits) : "n/a";
}

export interface Row {
  scenario: string;
  metric: string;
  value: string;
  target?: string;
  ok?: boolean;
}

export function printTable(rows: readonly Row[]): void {
  const head = ["scenario", "metric", "value", "target", "met"];
  const cells = rows.map((r) => [
    r.scenario,
    r.metric,
    r.value,
    r.target ?? "",
    r.ok === undefined ? "" : r.ok ? "yes" : "NO",
  ]);
  const widths = head.map((h, i) => Math.max(h.length, ...cells.map((c) => (c[i] ?? "").length)));
  const line = (c: string[]) => `| ${c.map((s, i) => s.padEnd(widths[i] ?? 0)).join(" | ")} |`;
  process.stdout.write(`${line(head)}\n|${widths.map((w) => "-".repeat(w + 2)).join("|")}|\n`);
  for (const c of cells) process.stdout.write(`${line(c)}\n`);
}

export function writeResults(name: string, data: unknown): string {
  const dir = join(process.cwd(), "bench", "results");
  mkdirSync(dir, { recursive: true });
  const file = join(dir, `${name}-${new Date().toISOString().replace(/[:.]/g, "-")}.json`);
  const machine = {
    cpus: cpus().length,
    cpuModel: cpus()[0]?.model,
    memBytes: totalmem(),
    node: process.version,
  };
  writeFileSync(
    file,
    `${JSON.stringify({ name, at: new Date().toISOString(), machine, data }, null, 2)}\n`,
  );
  return file;
}

/**
 * A TypeScript entry in its own Node process; resolves once it prints "listening <port>"
 * (or, with `ready`, a line containing that text; the port is then 0).
 */
export async function startNodeServer(
  script: string,
  env: Record<string, string>,
  opts: {
    args?: string[];
    /** Modules loaded after tsx and before the script (TypeScript allowed). */
    imports?: string[];
    timeoutMs?: number;
    ready?: string;
  } = {},
): Promise<{ child: ChildProcess; port: number; stop(): Promise<void> }> {
  // BENCH_CPU_PROF_DIR=<dir> writes a V8 CPU profile of every server process there.
  const prof = process.env.BENCH_CPU_PROF_DIR;
  const profArgs =
    prof !== undefined && prof !== "" ? ["--cpu-prof", `--cpu-prof-dir=${prof}`] : [];
  const child = spawn(
    process.execPath,
    [
      ...profArgs,
      ...nodeFlagsFor(script),
      ...(opts.args ?? []),
      "--import",
      "tsx",
      ...(opts.imports ?? []).flatMap((m) => ["--import", m]),
      script,
    ],
    {
      env: { ...process.env, ...env },
      stdio: ["ignore", "pipe", "inherit"],
    },
  );
  const port = await new Promise<number>((resolve, reject) => {
    let out = "";
    const timer = setTimeout(
      () => reject(new Error(`${script} did not start`)),
      opts.timeoutMs ?? 30_000,
    );
    const onData = (d: Buffer) => {
      out += d.toString();
      const m = /listening (\d+)/.exec(out);
      if (m !== null || (opts.ready !== undefined && out.includes(opts.ready))) {
        clearTimeout(timer);
        child.stdout?.off("data", onData);
        resolve(m !== null ? Number(m[1]) : 0);
      }
    };
    child.stdout?.on("data", onData);
    child.once("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`${script} exited with ${code}`));
    });
  });
  child.stdout?.resume();
  return { child, port, stop: () => stopChild(child) };
}

export async function stopChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = once(child, "exit");
  child.kill("SIGTERM");
  const timer = setTimeout(() => child.kill("SIGKILL"), 10_000);
  await exited;
  clearTimeout(timer);
}

/** Environment every benchmark process of the service gets. */
export function serviceEnv(
  redisUrl: string,
  s3Endpoint: string,
  prefix: string,
): Record<string, string> {
  return {
    REDIS_URL: redisUrl,
    S3_ENDPOINT: s3Endpoint,
    S3_ACCESS_KEY_ID: "S3RVER",
    S3_SECRET_ACCESS_KEY: "S3RVER",
    QUEUE_PREFIX: prefix,
    // One log line per RPC at info would be the loudest thing measured; the
    // alternatives log nothing.
    LOG_LEVEL: "warn",
    // Benchmarks call without tokens, and start far more jobs than an owner's quota.
    AUTH_DISABLED: "true",
    MAX_ACTIVE_JOBS_PER_OWNER: "1000000",
    INITIATE_RATE_PER_MINUTE: "100000000",
    MAX_QUEUE_DEPTH: "10000000",
    // Each benchmark job must be a job of its own, not a reused or joined one.
    DEDUP_IN_FLIGHT: "false",
    REUSE_RESULTS: "false",
  };
}

/** CPU time (user + system) a process has used so far, in ms, from /proc (10 ms ticks). */
export function procCpuMs(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
  // Fields after the command name (which may contain spaces) start after the last ')'.
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(fields[11]) + Number(fields[12])) * 10;
}
