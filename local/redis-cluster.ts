import { type ChildProcess, execFile, spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { freePort, waitUntil } from "./ports.js";
import { ensureRedisBinary } from "./redis-server.js";

// A Redis Cluster of masters only, from Debian's redis-server and redis-cli (redis-tools
// comes with redis-server), on loopback ports, for the tests. Each node keeps its
// cluster state in a temporary folder that stop() removes. Stopped by pid.

const run = promisify(execFile);

export interface LocalRedisCluster {
  /** host:port of every node, as REDIS_CLUSTER_NODES takes them. */
  nodes: string[];
  pids: number[];
  stop(): Promise<void>;
  /** SIGKILL every node, for fault tests. */
  kill(): void;
}

interface Node {
  port: number;
  child: ChildProcess;
  exited: Promise<void>;
  stderr: () => string;
}

export async function startRedisCluster(
  opts: { masters?: number } = {},
): Promise<LocalRedisCluster> {
  const bin = ensureRedisBinary({ install: false });
  const cli = bin.replace(/redis-server$/, "redis-cli");
  const count = opts.masters ?? 3;
  const dir = mkdtempSync(join(tmpdir(), "dj-redis-cluster-"));
  const nodes: Node[] = [];

  const stop = async () => {
    await Promise.all(
      nodes.map(async (n) => {
        if (n.child.exitCode === null && n.child.signalCode === null) {
          n.child.kill("SIGTERM");
          const timer = setTimeout(() => n.child.kill("SIGKILL"), 5000);
          await n.exited;
          clearTimeout(timer);
        }
      }),
    );
    rmSync(dir, { recursive: true, force: true });
  };

  try {
    for (let i = 0; i < count; i++) {
      const port = await freePort();
      // The cluster bus needs a second port; by default port + 10000, which may be taken.
      const busPort = await freePort();
      const child = spawn(
        bin,
        [
          "--port",
          String(port),
          "--cluster-port",
          String(busPort),
          "--bind",
          "127.0.0.1",
          "--cluster-enabled",
          "yes",
          "--cluster-config-file",
          join(dir, `nodes-${port}.conf`),
          "--cluster-node-timeout",
          "5000",
          "--dir",
          dir,
          "--save",
          "",
          "--appendonly",
          "no",
          // BullMQ loses jobs if Redis evicts keys under memory pressure.
          "--maxmemory-policy",
          "noeviction",
          "--daemonize",
          "no",
          "--loglevel",
          "warning",
        ],
        { stdio: ["ignore", "ignore", "pipe"] },
      );
      let stderr = "";
      child.stderr?.on("data", (d: Buffer) => (stderr += d.toString()));
      const exited = new Promise<void>((r) => child.once("exit", () => r()));
      nodes.push({ port, child, exited, stderr: () => stderr });
    }
    for (const n of nodes) {
      await waitUntil(`cluster node on port ${n.port}`, async () => {
        if (n.child.exitCode !== null) throw new Error(`redis-server exited: ${n.stderr().trim()}`);
        const { stdout } = await run(cli, ["-p", String(n.port), "ping"]);
        return stdout.trim() === "PONG";
      });
    }
    await run(cli, [
      "--cluster",
      "create",
      ...nodes.map((n) => `127.0.0.1:${n.port}`),
      "--cluster-replicas",
      "0",
      "--cluster-yes",
    ]);
    // Every node must agree before a client's first slot map is trustworthy.
    for (const n of nodes) {
      await waitUntil(
        `cluster_state:ok on port ${n.port}`,
        async () =>
          (await run(cli, ["-p", String(n.port), "cluster", "info"])).stdout.includes(
            "cluster_state:ok",
          ),
        30_000,
      );
    }
  } catch (err) {
    await stop();
    throw err;
  }
  return {
    nodes: nodes.map((n) => `127.0.0.1:${n.port}`),
    pids: nodes.map((n) => n.child.pid ?? 0),
    stop,
    kill() {
      for (const n of nodes)
        if (n.child.exitCode === null && n.child.signalCode === null) n.child.kill("SIGKILL");
    },
  };
}
