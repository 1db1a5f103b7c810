import { type ChildProcess, execFileSync, spawn } from "node:child_process";
import {
  chownSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  rmSync,
  statSync,
} from "node:fs";
import { tmpdir, userInfo } from "node:os";
import { dirname, join, resolve } from "node:path";
import pg from "pg";
import { freePort, StopWaiting, waitUntil } from "./ports.js";

// Starts Debian's PostgreSQL server (package `postgresql`) as a child process on a
// loopback port, for the tests and `npm start`, as local/redis-server.ts does for Redis.
// Stopped by pid, never by name.
//
// PostgreSQL refuses to run as root, and tests and CI run as root: the cluster then runs
// as Debian's `postgres` user (or `nobody`) through setpriv, which execs in place, so the
// pid we hold is the postmaster's own and a signal to it reaches the server.

export interface LocalPostgres {
  /** postgres://postgres@127.0.0.1:<port>/postgres (trust authentication, loopback only). */
  url: string;
  port: number;
  pid: number;
  /** The data folder: start again on it (same port) to bring the same cluster back. */
  dir: string;
  /** Fast shutdown (SIGINT): open sessions are ended, the data is kept. */
  stop(): Promise<void>;
  /** Stops the server and deletes a data folder this call created. */
  destroy(): Promise<void>;
}

export interface LocalPostgresOptions {
  port?: number;
  /** Data folder; created with initdb when it holds no cluster. Default: a new temp dir. */
  dir?: string;
  /** Skip fsync (tests: faster, and a lost temp cluster costs nothing). */
  fast?: boolean;
  /**
   * Own process group: a terminal's Ctrl-C then reaches only the parent, which stops the
   * server after the processes that still use it.
   */
  detached?: boolean;
  log?: (line: string) => void;
}

/** Debian installs each major under /usr/lib/postgresql/<major>/bin: the newest wins. */
export function findPostgresBin(): string | undefined {
  const root = "/usr/lib/postgresql";
  if (!existsSync(root)) return undefined;
  const majors = readdirSync(root)
    .filter((d) => /^\d+$/.test(d) && existsSync(join(root, d, "bin", "postgres")))
    .sort((a, b) => Number(b) - Number(a));
  return majors[0] !== undefined ? join(root, majors[0], "bin") : undefined;
}

/** The unprivileged account a root process runs the server as. */
function serverUser(): { name: string; uid: number; gid: number } | undefined {
  if (process.getuid?.() !== 0) return undefined;
  for (const name of ["postgres", "nobody"]) {
    try {
      const uid = Number(execFileSync("id", ["-u", name], { encoding: "utf8" }).trim());
      const gid = Number(execFileSync("id", ["-g", name], { encoding: "utf8" }).trim());
      return { name, uid, gid };
    } catch {
      // no such user
    }
  }
  throw new Error("running as root and neither a postgres nor a nobody user exists");
}

function asUser(user: ReturnType<typeof serverUser>, bin: string, args: string[]) {
  return user === undefined
    ? { cmd: bin, args }
    : {
        cmd: "setpriv",
        args: [
          `--reuid=${user.uid}`,
          `--regid=${user.gid}`,
          "--clear-groups",
          "--reset-env",
          bin,
          ...args,
        ],
      };
}

/**
 * The server user must reach the data folder: every folder above it needs search (x)
 * permission for that user. A checkout under /root, or a folder made by mkdtemp, does not
 * give it: say so instead of letting initdb fail with "Permission denied".
 */
function checkReachable(dir: string, user: { name: string; uid: number; gid: number }): void {
  let parent = dirname(dir);
  while (true) {
    const st = statSync(parent);
    const ok =
      st.uid === user.uid
        ? (st.mode & 0o100) !== 0
        : st.gid === user.gid
          ? (st.mode & 0o010) !== 0
          : (st.mode & 0o001) !== 0;
    if (!ok) {
      throw new Error(
        `PostgreSQL runs as the ${user.name} user here (not as root), which cannot enter ${parent}: choose a data folder it can reach`,
      );
    }
    const up = dirname(parent);
    if (up === parent) return;
    parent = up;
  }
}

async function canQuery(url: string): Promise<boolean> {
  const client = new pg.Client({ connectionString: url, connectionTimeoutMillis: 2000 });
  // A server that is starting or stopping may drop the probe's connection between calls:
  // pg then emits "error", which without a listener is an uncaught exception (a loaded
  // CI run's history-outage test died of one). The calls above still reject.
  client.on("error", () => undefined);
  try {
    await client.connect();
    await client.query("SELECT 1");
    return true;
  } finally {
    await client.end().catch(() => undefined);
  }
}

export async function startPostgres(opts: LocalPostgresOptions = {}): Promise<LocalPostgres> {
  const bin = findPostgresBin();
  if (bin === undefined) {
    throw new Error(
      "PostgreSQL is not installed. Install it with: sudo apt-get install -y postgresql (or set HISTORY_DATABASE_URL)",
    );
  }
  const user = serverUser();
  const ownDir = opts.dir === undefined;
  const dir =
    opts.dir !== undefined ? resolve(opts.dir) : mkdtempSync(join(tmpdir(), "dj-postgres-"));
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  if (user !== undefined) checkReachable(dir, user);
  if (user !== undefined) chownSync(dir, user.uid, user.gid);
  if (!existsSync(join(dir, "PG_VERSION"))) {
    const init = asUser(user, join(bin, "initdb"), [
      "-D",
      dir,
      "-U",
      "postgres",
      "--auth=trust",
      "-E",
      "UTF8",
      "--locale=C",
      ...(opts.fast === false ? [] : ["--no-sync"]),
    ]);
    execFileSync(init.cmd, init.args, { stdio: ["ignore", "ignore", "pipe"] });
  }
  const port = opts.port ?? (await freePort());
  const settings = [
    ["listen_addresses", "127.0.0.1"],
    ["port", String(port)],
    // The socket sits in the data folder: /var/run/postgresql may not exist or be ours.
    ["unix_socket_directories", dir],
    ["max_connections", "50"],
    ["shared_buffers", "32MB"],
    ...(opts.fast === false
      ? []
      : [
          ["fsync", "off"],
          ["synchronous_commit", "off"],
        ]),
  ];
  const run = asUser(user, join(bin, "postgres"), [
    "-D",
    dir,
    ...settings.flatMap(([k, v]) => ["-c", `${k}=${v}`]),
  ]);
  const child: ChildProcess = spawn(run.cmd, run.args, {
    stdio: ["ignore", "ignore", "pipe"],
    detached: opts.detached ?? false,
  });
  let stderr = "";
  child.stderr?.on("data", (d: Buffer) => {
    stderr = (stderr + d.toString()).slice(-4000);
  });
  const exited = new Promise<void>((r) => child.once("exit", () => r()));
  const url = `postgres://postgres@127.0.0.1:${port}/postgres`;
  try {
    await waitUntil(
      `postgres on port ${port}`,
      async () => {
        if (child.exitCode !== null) throw new StopWaiting(`postgres exited: ${stderr.trim()}`);
        return canQuery(url);
      },
      120_000,
    );
  } catch (err) {
    child.kill("SIGKILL");
    throw new Error(`${(err as Error).message}\n${stderr.trim()}`);
  }
  opts.log?.(
    `postgres ${url} (pid ${child.pid}, data in ${dir}, as ${user?.name ?? userInfo().username})`,
  );
  const stop = async () => {
    if (child.exitCode !== null || child.signalCode !== null) return;
    child.kill("SIGINT");
    const timer = setTimeout(() => child.kill("SIGKILL"), 20_000);
    await exited;
    clearTimeout(timer);
  };
  return {
    url,
    port,
    pid: child.pid ?? 0,
    dir,
    stop,
    async destroy() {
      await stop();
      if (ownDir) rmSync(dir, { recursive: true, force: true });
    },
  };
}
