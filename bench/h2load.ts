import { execFile, execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { percentile } from "./lib.js";

// The polling load generator for every configuration alike: nghttp2's h2load, a C
// program that costs the servers (on the same cores) far less CPU than a Node client,
// speaking HTTP/1.1 (`--h1`) or h2c to every server the same way. h2load prints no
// percentiles, so latency comes from its per-request log (`--log-file`): one line per
// request, "start µs <TAB> status <TAB> elapsed µs".

export interface LoadResult {
  /** Answered requests: 2xx, and 304 Not Modified (a conditional GET's answer). */
  requests: number;
  /** Of those, 304 answers. */
  notModified: number;
  rps: number;
  p50: number;
  p99: number;
  errors: number;
}

export interface H2loadOptions {
  url: string;
  /** TCP connections. */
  connections: number;
  /** Requests in flight per connection (h2c only; HTTP/1.1 is one, h2load pipelines otherwise). */
  streams?: number;
  seconds: number;
  h1?: boolean;
  headers?: Record<string, string>;
  /** A request body makes the request a POST. */
  body?: Uint8Array;
}

let binary: string | undefined;

/**
 * The h2load binary. Missing, it is installed from Debian's nghttp2-client when we are
 * root (as local/redis-server.ts does for redis-server); otherwise the error says how.
 */
export function ensureH2load(log: (line: string) => void = () => undefined): string {
  if (binary !== undefined) return binary;
  const find = () => {
    try {
      execFileSync("h2load", ["--version"], { stdio: "ignore" });
      return "h2load";
    } catch {
      return undefined;
    }
  };
  let found = find();
  if (found === undefined) {
    if (process.getuid?.() !== 0) {
      throw new Error(
        "h2load is not installed. Install it with: sudo apt-get install -y nghttp2-client",
      );
    }
    log("h2load is missing: installing Debian's nghttp2-client (apt-get)");
    const env = { ...process.env, DEBIAN_FRONTEND: "noninteractive" };
    execFileSync("apt-get", ["update", "-qq"], { stdio: "inherit" });
    execFileSync("apt-get", ["install", "-y", "-qq", "--no-install-recommends", "nghttp2-client"], {
      stdio: "inherit",
      env,
    });
    found = find();
    if (found === undefined)
      throw new Error("apt-get installed nghttp2-client but h2load cannot be run");
  }
  binary = found;
  return found;
}

export async function h2load(opts: H2loadOptions): Promise<LoadResult> {
  const bin = ensureH2load();
  const dir = mkdtempSync(join(tmpdir(), "h2load-"));
  try {
    const logFile = join(dir, "requests.tsv");
    const args = [
      "-c",
      String(opts.connections),
      "-m",
      String(opts.h1 === true ? 1 : (opts.streams ?? 1)),
      "-t",
      "1",
      "-D",
      String(opts.seconds),
      `--log-file=${logFile}`,
    ];
    if (opts.h1 === true) args.push("--h1");
    for (const [name, value] of Object.entries(opts.headers ?? {}))
      args.push("-H", `${name}: ${value}`);
    if (opts.body !== undefined) {
      const bodyFile = join(dir, "body");
      writeFileSync(bodyFile, opts.body);
      args.push("-d", bodyFile);
    }
    args.push(opts.url);
    const text = await new Promise<string>((resolve, reject) => {
      execFile(bin, args, { maxBuffer: 16 * 1024 * 1024 }, (err, stdout, stderr) => {
        if (err !== null) reject(new Error(`h2load failed: ${err.message}\n${stdout}${stderr}`));
        else resolve(stdout);
      });
    });
    return parse(text, readFileSync(logFile, "utf8"));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

function parse(text: string, log: string): LoadResult {
  const rps = Number(/finished in [\d.]+\w+, ([\d.]+) req\/s/.exec(text)?.[1]);
  const counts =
    /requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout/.exec(
      text,
    );
  const codes = /status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx/.exec(text);
  if (!Number.isFinite(rps) || counts === null || codes === null)
    throw new Error(`unexpected h2load output:\n${text}`);
  const latencies: number[] = [];
  let failed = 0;
  let notModified = 0;
  for (const line of log.split("\n")) {
    if (line === "") continue;
    const [, status, elapsed] = line.split("\t");
    if (status === "304") notModified++;
    if (status?.startsWith("2") || status === "304") latencies.push(Number(elapsed) / 1000);
    else failed++;
  }
  return {
    requests: latencies.length,
    notModified,
    rps,
    p50: percentile(latencies, 50),
    p99: percentile(latencies, 99),
    // Requests that got no answer or a non-2xx one. Calls that were still in flight when
    // the duration ended are not counted as done by h2load and are not errors.
    errors: Math.max(
      failed,
      Number(counts[4]) +
        Number(counts[5]) +
        Number(counts[6]) +
        Number(codes[3]) +
        Number(codes[4]),
    ),
  };
}
