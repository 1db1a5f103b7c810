import { rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Code } from "@connectrpc/connect";
import { Cluster, Redis, type RedisOptions } from "ioredis";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { BACKEND_RETRY_AFTER_MS, isRedisUnavailable } from "../core/redis-errors.js";
import { RetryInfoSchema } from "../gen/google/rpc/error_details_pb.js";
import { freePort } from "../local/ports.js";
import { type LocalRedis, startRedis } from "../local/redis-server.js";
import { toConnectError } from "../server/rpc/errors.js";

// The errors a failing-over Redis really produces, provoked on real redis-server
// processes and taken from a real ioredis client, then through the one mapping: each
// must be UNAVAILABLE with a retry delay, never INTERNAL.

let primary: LocalRedis;
let replica: LocalRedis;
let slotless: LocalRedis;
const clients: Array<Redis | Cluster> = [];
const slotlessConf = join(tmpdir(), `dj-slotless-${process.pid}-${Date.now()}.conf`);

function client(url: string, opts: RedisOptions = {}): Redis {
  const c = new Redis(url, { lazyConnect: false, ...opts });
  c.on("error", () => undefined);
  clients.push(c);
  return c;
}

async function errorOf(p: Promise<unknown>): Promise<Error> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  if (!(err instanceof Error)) throw new Error(`expected the command to fail, got ${String(err)}`);
  return err;
}

beforeAll(async () => {
  primary = await startRedis();
  replica = await startRedis({ extraArgs: ["--replicaof", "127.0.0.1", String(primary.port)] });
  // A cluster node that serves no hash slot: every keyed command is refused.
  slotless = await startRedis({
    extraArgs: [
      "--cluster-enabled",
      "yes",
      "--cluster-announce-ip",
      "127.0.0.1",
      "--cluster-config-file",
      slotlessConf,
    ],
  });
});

afterAll(async () => {
  for (const c of clients) c.disconnect();
  await Promise.all([primary?.stop(), replica?.stop(), slotless?.stop()]);
  rmSync(slotlessConf, { force: true });
});

function expectUnavailable(err: Error): void {
  expect(isRedisUnavailable(err), `${err.name}: ${err.message}`).toBe(true);
  const mapped = toConnectError(err);
  expect(mapped?.code, `${err.name}: ${err.message}`).toBe(Code.Unavailable);
  // Plain HTTP callers read Retry-After; gRPC and Connect clients the RetryInfo detail.
  expect(mapped?.metadata.get("retry-after")).toBe(String(BACKEND_RETRY_AFTER_MS / 1000));
  const [info] = mapped?.findDetails(RetryInfoSchema) ?? [];
  expect(Number(info?.retryDelay?.seconds ?? 0) * 1000 + (info?.retryDelay?.nanos ?? 0) / 1e6).toBe(
    BACKEND_RETRY_AFTER_MS,
  );
}

describe("Redis errors seen during a failover are UNAVAILABLE with a retry delay", () => {
  test("a write to a demoted primary (READONLY)", async () => {
    const err = await errorOf(client(replica.url).set("k", "v"));
    expect(err.message).toMatch(/^READONLY/);
    expectUnavailable(err);
  });

  test("a cluster node without the slot (CLUSTERDOWN)", async () => {
    const err = await errorOf(client(slotless.url).set("k", "v"));
    expect(err.message).toMatch(/^CLUSTERDOWN/);
    expectUnavailable(err);
  });

  test("the cluster client's redirection storm (Too many Cluster redirections)", async () => {
    // One node owning one slot: the client's slot map sends other keys to it, and it
    // answers CLUSTERDOWN until the client gives up.
    const admin = client(slotless.url);
    // Idempotent: on a loaded machine ioredis may resend a command whose connection it
    // replaced, and the node then answers that the slot is already its own.
    await admin.cluster("ADDSLOTS", 0).catch((e: Error) => {
      if (!/already busy/.test(e.message)) throw e;
    });
    const cluster = new Cluster([{ host: "127.0.0.1", port: slotless.port }], {
      maxRedirections: 3,
      retryDelayOnClusterDown: 10,
      // Its other slots are not covered, so the cluster never reports cluster_state:ok.
      enableReadyCheck: false,
    });
    cluster.on("error", () => undefined);
    clients.push(cluster);
    const err = await errorOf(cluster.set("k", "v"));
    expect(err.message).toMatch(/^Too many Cluster redirections/);
    expectUnavailable(err);
  });

  test("a connection that ioredis has closed", async () => {
    const c = client(primary.url);
    await c.ping();
    c.disconnect();
    const err = await errorOf(c.get("k"));
    expect(err.message).toBe("Connection is closed.");
    expectUnavailable(err);
  });

  test("a server that is gone (ioredis gives up after its retries)", async () => {
    const err = await errorOf(
      client(`redis://127.0.0.1:${await freePort()}`, {
        maxRetriesPerRequest: 0,
        retryStrategy: () => 50,
      }).get("k"),
    );
    expectUnavailable(err);
  });

  test("a command timeout", async () => {
    const admin = client(primary.url);
    const slow = client(primary.url, { commandTimeout: 100 });
    await slow.ping();
    // The server stops answering clients, as one does while it is stuck: long enough that
    // the GET is sure to be sent while the pause lasts, even on a loaded machine.
    // WRITE mode leaves the admin's UNPAUSE free to end it as soon as the SET has timed out.
    await admin.client("PAUSE", 30_000, "WRITE");
    const err = await errorOf(slow.set("k", "v")).finally(() => admin.client("UNPAUSE"));
    expect(err.message).toBe("Command timed out");
    expectUnavailable(err);
  });

  test("a reply wrapped by another library keeps its meaning", async () => {
    const cause = await errorOf(client(replica.url).set("k", "v"));
    expectUnavailable(new Error("could not add the job", { cause }));
  });

  test("other Redis errors stay unexpected", async () => {
    const err = await errorOf(client(primary.url).call("NOSUCHCOMMAND"));
    expect(isRedisUnavailable(err)).toBe(false);
    expect(toConnectError(err)).toBeUndefined();
  });
});
