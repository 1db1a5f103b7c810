import { type ChildProcess, execFile, spawn } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { freePort, StopWaiting, waitUntil } from "./ports.js";
import { ensureRedisBinary, type LocalRedis, outputOf, startRedis } from "./redis-server.js";

// A Redis primary, its replicas and Sentinels watching them, from Debian's
// redis-server (which runs as a Sentinel with --sentinel, so the redis-sentinel package
// is not needed), on loopback ports, for failover tests. Stopped by pid.

const run = promisify(execFile);

export interface LocalRedisSentinel {
  /** Every Sentinel as REDIS_SENTINELS takes them (host:port, or a URL with the password). */
  sentinels: string[];
  /** The name the Sentinels monitor, as REDIS_SENTINEL_NAME takes it. */
  name: string;
  /** Every data node (the primary first, as started). */
  nodes: LocalRedis[];
  /** The primary the Sentinels currently name (host:port; its TLS port with `tls`). */
  primary(): Promise<string>;
  /** A data node's TLS port (with `tls`). */
  tlsPort(node: LocalRedis): number | undefined;
  stop(): Promise<void>;
}

export interface LocalRedisSentinelOptions {
  replicas?: number;
  sentinels?: number;
  /** Sentinel's down-after-milliseconds: how soon an unreachable primary is failed over. */
  downAfterMs?: number;
  /** The primary and replicas require this password (requirepass, masterauth). */
  password?: string;
  /** The Sentinels require this password; `sentinels` are then redis://:<password>@ URLs. */
  sentinelPassword?: string;
  /**
   * TLS with these PEM files: every data node and Sentinel also listens on a TLS port,
   * replicas and Sentinels reach the primary over TLS (so the Sentinels name TLS ports),
   * and `sentinels` are rediss:// URLs. The plain ports stay for this fixture's redis-cli.
   */
  tls?: { cert: string; key: string; ca: string };
}

export async function startRedisSentinel(
  opts: LocalRedisSentinelOptions = {},
): Promise<LocalRedisSentinel> {
  const bin = ensureRedisBinary({ install: false });
  const redisCli = bin.replace(/redis-server$/, "redis-cli");
  // redis-cli with the password of what it asks: a Sentinel's or a data node's.
  const cli = (port: number, password: string | undefined, ...args: string[]) =>
    run(redisCli, [
      "-p",
      String(port),
      ...(password === undefined ? [] : ["--no-auth-warning", "-a", password]),
      ...args,
    ]);
  const dataAuth =
    opts.password === undefined
      ? []
      : ["--requirepass", opts.password, "--masterauth", opts.password];
  // The TLS settings of a data node (on its own TLS port) or of a Sentinel's file.
  const tlsFiles = (t: NonNullable<LocalRedisSentinelOptions["tls"]>): [string, string][] => [
    ["tls-cert-file", t.cert],
    ["tls-key-file", t.key],
    ["tls-ca-cert-file", t.ca],
    ["tls-auth-clients", "no"],
    ["tls-replication", "yes"],
  ];
  const tlsArgs = async () => {
    if (opts.tls === undefined) return { port: undefined, args: [] };
    const port = await freePort();
    const args = [
      "--tls-port",
      String(port),
      ...tlsFiles(opts.tls).flatMap(([k, v]) => [`--${k}`, v]),
    ];
    return { port, args };
  };
  /** Each data node's TLS port, by its plain port. */
  const tlsPorts = new Map<number, number>();
  const name = "dj-primary";
  const dir = mkdtempSync(join(tmpdir(), "dj-redis-sentinel-"));
  const nodes: LocalRedis[] = [];
  const sentinels: Array<{
    port: number;
    tlsPort: number | undefined;
    child: ChildProcess;
    exited: Promise<void>;
  }> = [];

  const stop = async () => {
    await Promise.all([
      ...sentinels.map(async (s) => {
        if (s.child.exitCode === null && s.child.signalCode === null) {
          s.child.kill("SIGTERM");
          const timer = setTimeout(() => s.child.kill("SIGKILL"), 5000);
          await s.exited;
          clearTimeout(timer);
        }
      }),
      ...nodes.map((n) => n.stop()),
    ]);
    rmSync(dir, { recursive: true, force: true });
  };

  try {
    const primaryTls = await tlsArgs();
    const primary = await startRedis({ extraArgs: [...dataAuth, ...primaryTls.args] });
    nodes.push(primary);
    // Replicas and Sentinels reach the primary on its TLS port when there is one.
    const primaryPort = primaryTls.port ?? primary.port;
    if (primaryTls.port !== undefined) tlsPorts.set(primary.port, primaryTls.port);
    for (let i = 0; i < (opts.replicas ?? 1); i++) {
      const t = await tlsArgs();
      const replica = await startRedis({
        extraArgs: ["--replicaof", "127.0.0.1", String(primaryPort), ...dataAuth, ...t.args],
      });
      if (t.port !== undefined) tlsPorts.set(replica.port, t.port);
      nodes.push(replica);
    }
    const count = opts.sentinels ?? 1;
    // A majority of the Sentinels must agree that the primary is down.
    const quorum = Math.floor(count / 2) + 1;
    for (let i = 0; i < count; i++) {
      const port = await freePort();
      const tlsPort = opts.tls === undefined ? undefined : await freePort();
      const conf = join(dir, `sentinel-${port}.conf`);
      // Sentinel rewrites its configuration file as it learns, so each has its own.
      writeFileSync(
        conf,
        [
          `port ${port}`,
          "bind 127.0.0.1",
          `dir ${dir}`,
          `sentinel monitor ${name} 127.0.0.1 ${primaryPort} ${quorum}`,
          `sentinel down-after-milliseconds ${name} ${opts.downAfterMs ?? 1000}`,
          `sentinel failover-timeout ${name} 10000`,
          `sentinel parallel-syncs ${name} 1`,
          ...(opts.password !== undefined ? [`sentinel auth-pass ${name} ${opts.password}`] : []),
          ...(opts.sentinelPassword !== undefined ? [`requirepass ${opts.sentinelPassword}`] : []),
          ...(opts.tls === undefined
            ? []
            : [`tls-port ${tlsPort}`, ...tlsFiles(opts.tls).map(([k, v]) => `${k} ${v}`)]),
          "",
        ].join("\n"),
      );
      const child = spawn(bin, [conf, "--sentinel", "--loglevel", "warning"], {
        stdio: ["ignore", "pipe", "pipe"],
      });
      const output = outputOf(child);
      const exited = new Promise<void>((r) => child.once("exit", () => r()));
      sentinels.push({ port, tlsPort, child, exited });
      await waitUntil(`sentinel on port ${port}`, async () => {
        if (child.exitCode !== null) throw new StopWaiting(`sentinel exited: ${output()}`);
        const { stdout } = await cli(port, opts.sentinelPassword, "ping").catch(() => ({
          stdout: "",
        }));
        return stdout.trim() === "PONG";
      });
    }
    // Every Sentinel knows the replicas (and, with several, each other) before a test
    // may count on a failover.
    for (const s of sentinels) {
      await waitUntil(
        `sentinel on port ${s.port} sees the replicas`,
        async () => {
          const { stdout } = await cli(s.port, opts.sentinelPassword, "sentinel", "replicas", name);
          return (stdout.match(/^flags$/gm) ?? []).length >= nodes.length - 1;
        },
        30_000,
      );
    }
    for (const n of nodes.slice(1)) {
      await waitUntil(
        `replica on port ${n.port} in sync`,
        async () =>
          (await cli(n.port, opts.password, "info", "replication")).stdout.includes(
            "master_link_status:up",
          ),
        30_000,
      );
    }
  } catch (err) {
    await stop();
    throw err;
  }

  return {
    sentinels: sentinels.map((s) => {
      const auth =
        opts.sentinelPassword === undefined ? "" : `:${encodeURIComponent(opts.sentinelPassword)}@`;
      if (s.tlsPort !== undefined) return `rediss://${auth}127.0.0.1:${s.tlsPort}`;
      return auth === "" ? `127.0.0.1:${s.port}` : `redis://${auth}127.0.0.1:${s.port}`;
    }),
    tlsPort: (node) => tlsPorts.get(node.port),
    name,
    nodes,
    async primary() {
      for (const s of sentinels) {
        if (s.child.exitCode !== null) continue;
        const { stdout } = await cli(
          s.port,
          opts.sentinelPassword,
          "sentinel",
          "get-master-addr-by-name",
          name,
        );
        const [host, port] = stdout.trim().split("\n");
        return `${host}:${port}`;
      }
      throw new Error("no sentinel is running");
    },
    stop,
  };
}
