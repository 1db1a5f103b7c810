import { type ChildProcess, execFileSync, spawn } from "node:child_process";
import { mkdirSync } from "node:fs";
import { connect } from "node:net";
import { resolve } from "node:path";
import { freePort, onFreshPorts, StopWaiting, waitUntil } from "./ports.js";

// Starts Debian's redis-server as a child process on a loopback port, for the embedded
// default and the tests. Stopped by pid, never by name.

export interface LocalRedis {
  url: string;
  port: number;
  pid: number;
  stop(): Promise<void>;
  /** SIGKILL, for fault tests. */
  kill(): void;
}

export interface LocalRedisOptions {
  port?: number;
  /** Data folder; with `appendonly` a restart on the same folder keeps every job. */
  dir?: string;
  appendonly?: boolean;
  /** Install Debian's redis-server when missing and running as root. */
  install?: boolean;
  /**
   * Own process group: a terminal's Ctrl-C then reaches only the parent, which stops
   * Redis last, after the processes that still need it.
   */
  detached?: boolean;
  log?: (line: string) => void;
  /** More redis-server arguments (replication, cluster mode), after the defaults. */
  extraArgs?: readonly string[];
}

function findBinary(): string | undefined {
  for (const p of ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]) {
    try {
      execFileSync(p, ["--version"], { stdio: "ignore" });
      return p;
    } catch {
      // not at this path
    }
  }
  try {
    execFileSync("redis-server", ["--version"], { stdio: "ignore" });
    return "redis-server";
  } catch {
    return undefined;
  }
}

export function ensureRedisBinary(opts: {
  install: boolean;
  log?: (line: string) => void;
}): string {
  const found = findBinary();
  if (found !== undefined) return found;
  const isRoot = process.getuid?.() === 0;
  if (!opts.install || !isRoot) {
    throw new Error(
      "redis-server is not installed. Install it with: sudo apt-get install -y redis-server (or set REDIS_URL)",
    );
  }
  opts.log?.("redis-server is missing: installing Debian's redis-server (apt-get)");
  execFileSync("apt-get", ["update", "-qq"], { stdio: "inherit" });
  execFileSync("apt-get", ["install", "-y", "-qq", "redis-server"], {
    stdio: "inherit",
    env: { ...process.env, DEBIAN_FRONTEND: "noninteractive" },
  });
  const again = findBinary();
  if (again === undefined) throw new Error("apt-get installed redis-server but it cannot be run");
  return again;
}

function ping(port: number): Promise<boolean> {
  return new Promise((resolveP) => {
    const sock = connect({ port, host: "127.0.0.1" });
    let buf = "";
    sock.setTimeout(1000, () => {
      sock.destroy();
      resolveP(false);
    });
    sock.once("connect", () => sock.write("PING\r\n"));
    sock.on("data", (d) => {
      buf += d.toString();
      if (buf.includes("\r\n")) {
        sock.destroy();
        // A server that requires a password answers NOAUTH: it is up all the same.
        resolveP(buf.startsWith("+PONG") || buf.startsWith("-NOAUTH"));
      }
    });
    sock.once("error", () => resolveP(false));
  });
}

/**
 * The last few KB a redis-server printed (it logs to stdout when it has no log file, and
 * says there why it stopped: a port already in use, a bad option).
 */
export function outputOf(child: ChildProcess): () => string {
  let out = "";
  const keep = (d: Buffer) => {
    out = (out + d.toString()).slice(-4000);
  };
  child.stdout?.on("data", keep);
  child.stderr?.on("data", keep);
  return () => out.trim();
}

export async function startRedis(opts: LocalRedisOptions = {}): Promise<LocalRedis> {
  const bin = ensureRedisBinary({
    install: opts.install ?? false,
    ...(opts.log ? { log: opts.log } : {}),
  });
  const { port } = opts;
  // A port asked for is that port or nothing; a free one is replaced if it was taken.
  if (port !== undefined) return startRedisOn(bin, port, opts);
  return onFreshPorts(async () => startRedisOn(bin, await freePort(), opts));
}

async function startRedisOn(
  bin: string,
  port: number,
  opts: LocalRedisOptions,
): Promise<LocalRedis> {
  const args = [
    "--port",
    String(port),
    "--bind",
    "127.0.0.1",
    "--save",
    "",
    "--appendonly",
    opts.appendonly ? "yes" : "no",
    // BullMQ loses jobs if Redis evicts keys under memory pressure.
    "--maxmemory-policy",
    "noeviction",
    "--daemonize",
    "no",
    "--protected-mode",
    "yes",
    "--loglevel",
    "warning",
  ];
  if (opts.dir !== undefined) {
    const dir = resolve(opts.dir);
    mkdirSync(dir, { recursive: true });
    args.push("--dir", dir);
  } else {
    // No folder: nothing may be written to the current directory.
    args.push("--dir", "/tmp", "--appendonly", "no");
  }
  args.push(...(opts.extraArgs ?? []));
  const child: ChildProcess = spawn(bin, args, {
    stdio: ["ignore", "pipe", "pipe"],
    detached: opts.detached ?? false,
  });
  const output = outputOf(child);
  const exited = new Promise<void>((r) => child.once("exit", () => r()));
  try {
    await waitUntil(`redis-server on port ${port}`, async () => {
      if (child.exitCode !== null) throw new StopWaiting(`redis-server exited: ${output()}`);
      return ping(port);
    });
  } catch (err) {
    child.kill("SIGKILL");
    throw err;
  }
  const pid = child.pid ?? 0;
  return {
    url: `redis://127.0.0.1:${port}`,
    port,
    pid,
    async stop() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      child.kill("SIGTERM");
      const timer = setTimeout(() => child.kill("SIGKILL"), 5000);
      await exited;
      clearTimeout(timer);
    },
    kill() {
      child.kill("SIGKILL");
    },
  };
}
