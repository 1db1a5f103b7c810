import { type ChildProcess, execFile, spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { freePort, onFreshPorts, StopWaiting, waitUntil } from "./ports.js";
import { ensureRedisBinary, outputOf } from "./redis-server.js";

// A Redis Cluster from Debian's redis-server and redis-cli (redis-tools comes with
// redis-server), on loopback ports, for the tests: masters only by default, or with
// replicas for failover tests. Each node keeps its cluster state in a temporary folder
// that stop() removes. Stopped by pid.

const run = promisify(execFile);

export interface LocalRedisCluster {
  /** host:port of every node, as REDIS_CLUSTER_NODES takes them. */
  nodes: string[];
  pids: number[];
  stop(): Promise<void>;
  /** SIGKILL every node, for fault tests. */
  kill(): void;
  /** The master that serves `key`'s hash slot right now (as the live nodes see it). */
  masterOf(key: string): Promise<{ address: string; pid: number }>;
  /** SIGKILL one node (`host:port`), as `kill -9` would. */
  killNode(address: string): void;
}

interface Node {
  port: number;
  child: ChildProcess;
  exited: Promise<void>;
  output: () => string;
}

export interface LocalRedisClusterOptions {
  masters?: number;
  /** Replicas per master (default 0). */
  replicas?: number;
  /**
   * How long a node may be unreachable before it counts as failed and a replica is
   * promoted (cluster-node-timeout); default 5000.
   */
  nodeTimeoutMs?: number;
}

export async function startRedisCluster(
  opts: LocalRedisClusterOptions = {},
): Promise<LocalRedisCluster> {
  const bin = ensureRedisBinary({ install: false });
  const cli = bin.replace(/redis-server$/, "redis-cli");
  const replicas = opts.replicas ?? 0;
  const count = (opts.masters ?? 3) * (1 + replicas);
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

  /** One node on two ports that were free a moment ago, answering PING. */
  const startNode = async (): Promise<Node> => {
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
        String(opts.nodeTimeoutMs ?? 5000),
        // A replica may always take over, however long its link was down.
        "--cluster-replica-validity-factor",
        "0",
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
      { stdio: ["ignore", "pipe", "pipe"] },
    );
    const output = outputOf(child);
    const exited = new Promise<void>((r) => child.once("exit", () => r()));
    const node = { port, child, exited, output };
    try {
      await waitUntil(`cluster node on port ${port}`, async () => {
        if (child.exitCode !== null) throw new StopWaiting(`redis-server exited: ${output()}`);
        // A bounded ping: whatever else may hold the port must not hang the wait.
        const { stdout } = await run(cli, ["-p", String(port), "ping"], { timeout: 2000 });
        return stdout.trim() === "PONG";
      });
    } catch (err) {
      child.kill("SIGKILL");
      throw err;
    }
    return node;
  };

  try {
    for (let i = 0; i < count; i++) nodes.push(await onFreshPorts(startNode));
    await run(cli, [
      "--cluster",
      "create",
      ...nodes.map((n) => `127.0.0.1:${n.port}`),
      "--cluster-replicas",
      String(replicas),
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
    // A replica that has not finished its first sync cannot be promoted.
    if (replicas > 0) {
      for (const n of nodes) {
        await waitUntil(
          `replication settled on port ${n.port}`,
          async () => {
            const info = (await run(cli, ["-p", String(n.port), "info", "replication"])).stdout;
            return info.includes("role:master")
              ? new RegExp(`connected_slaves:${replicas}\\b`).test(info)
              : info.includes("master_link_status:up");
          },
          30_000,
        );
      }
    }
  } catch (err) {
    await stop();
    throw err;
  }
  const live = () => nodes.filter((n) => n.child.exitCode === null && n.child.signalCode === null);
  return {
    nodes: nodes.map((n) => `127.0.0.1:${n.port}`),
    pids: nodes.map((n) => n.child.pid ?? 0),
    stop,
    kill() {
      for (const n of live()) n.child.kill("SIGKILL");
    },
    async masterOf(key) {
      const ask = live()[0];
      if (ask === undefined) throw new Error("no cluster node is running");
      const cliOut = async (...args: string[]) =>
        (await run(cli, ["-p", String(ask.port), ...args])).stdout.trim();
      const slot = Number(await cliOut("cluster", "keyslot", key));
      // CLUSTER NODES: id addr@bus flags master ping pong epoch state slot-ranges...
      for (const line of (await cliOut("cluster", "nodes")).split("\n")) {
        const f = line.split(" ");
        if (!(f[2] ?? "").includes("master") || (f[2] ?? "").includes("fail")) continue;
        const owns = f.slice(8).some((range) => {
          const [lo, hi] = range.split("-").map(Number);
          return lo !== undefined && slot >= lo && slot <= (hi ?? lo);
        });
        if (!owns) continue;
        const address = (f[1] ?? "").split("@")[0] ?? "";
        const port = Number(address.split(":")[1]);
        const node = nodes.find((n) => n.port === port);
        return { address, pid: node?.child.pid ?? 0 };
      }
      throw new Error(`no live master serves slot ${slot}`);
    },
    killNode(address) {
      const port = Number(address.split(":")[1]);
      nodes.find((n) => n.port === port)?.child.kill("SIGKILL");
    },
  };
}
