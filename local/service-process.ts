import { spawn } from "node:child_process";
import { createInterface } from "node:readline";

// Runs one of our entry points (server/main.ts, worker/main.ts) as a child process under
// the same Node, for `npm start`, tests and benchmarks. Stopped by pid: SIGTERM first,
// SIGKILL after a grace period.

/**
 * Node flags an entry point runs with, wherever it is started (npm start, tests,
 * benchmarks; the Dockerfile and docker-compose.yml spell the same flags out).
 *
 * The worker gets a small young generation. Bundling allocates short-lived garbage at
 * tens of MB/s (socket chunks, request objects); with V8's default semi-spaces (up to
 * 16 MiB each on this Node, grown under load) a worker's RSS peaked at 345 MB on a
 * 1,000-file job, against 210 MB with 8 MiB semi-spaces, at the same throughput
 * (BENCHMARKS.md, "Worker memory").
 */
export function nodeFlagsFor(entry: string): string[] {
  return entry === "worker/main.ts" ? ["--max-semi-space-size=8"] : [];
}

/** The arguments that run a TypeScript entry point under this Node. */
export function nodeArgsFor(entry: string): string[] {
  return [...nodeFlagsFor(entry), "--import", "tsx", entry];
}

/**
 * The arguments that run an entry point as `npm run build` compiled it into `outDir`
 * (scripts/build-server.ts): how the image runs the API and the worker.
 */
export function compiledArgsFor(entry: string, outDir = "dist"): string[] {
  return [...nodeFlagsFor(entry), `${outDir}/${entry.replace(/\.ts$/, ".js")}`];
}

export interface ProcessExit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

export interface ServiceProcess {
  readonly name: string;
  readonly pid: number;
  /** Resolves when the process has exited, however that happened. */
  readonly exited: Promise<ProcessExit>;
  running(): boolean;
  /** SIGTERM, then SIGKILL if it is still running after `graceMs`. */
  stop(graceMs: number): Promise<ProcessExit & { forced: boolean }>;
  /** SIGKILL now (fault tests, or a second Ctrl-C). */
  kill(): void;
}

export interface ServiceProcessOptions {
  name: string;
  /** Path of the TypeScript entry point, relative to `cwd`. */
  entry: string;
  /** Run the entry point compiled into this folder (relative to `cwd`) instead of through tsx. */
  compiledIn?: string;
  cwd: string;
  env: NodeJS.ProcessEnv;
  /** Each line of the child's stdout and stderr; without it the lines are dropped. */
  onLine?: (line: string, stream: "stdout" | "stderr") => void;
  /**
   * Own process group, so a terminal's Ctrl-C reaches only the parent, which then stops
   * the children in order (API and workers before the Redis they still need).
   */
  detached?: boolean;
}

export function startServiceProcess(opts: ServiceProcessOptions): ServiceProcess {
  const args =
    opts.compiledIn === undefined
      ? nodeArgsFor(opts.entry)
      : compiledArgsFor(opts.entry, opts.compiledIn);
  const child = spawn(process.execPath, args, {
    cwd: opts.cwd,
    env: opts.env,
    stdio: ["ignore", "pipe", "pipe"],
    detached: opts.detached ?? false,
  });
  const exited = new Promise<ProcessExit>((resolve) => {
    // "close", not "exit": by then the last lines of its output have been read.
    child.once("close", (code, signal) => resolve({ code, signal }));
    // A spawn failure (no such binary) emits only "error".
    child.once("error", () => resolve({ code: 127, signal: null }));
  });
  for (const stream of ["stdout", "stderr"] as const) {
    const rl = createInterface({ input: child[stream], crlfDelay: Infinity });
    rl.on("line", (line) => opts.onLine?.(line, stream));
  }
  const running = () => child.exitCode === null && child.signalCode === null;
  return {
    name: opts.name,
    pid: child.pid ?? -1,
    exited,
    running,
    async stop(graceMs) {
      if (!running()) return { ...(await exited), forced: false };
      child.kill("SIGTERM");
      let forced = false;
      const timer = setTimeout(() => {
        forced = true;
        child.kill("SIGKILL");
      }, graceMs);
      const exit = await exited;
      clearTimeout(timer);
      return { ...exit, forced };
    },
    kill() {
      if (running()) child.kill("SIGKILL");
    },
  };
}
