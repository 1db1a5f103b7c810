import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createConnectTransport, createGrpcTransport } from "@connectrpc/connect-node";
import { afterAll, beforeAll, expect, test } from "vitest";
import { isTerminal, type JobStateName } from "../core/jobs.js";
import { DownloadService } from "../gen/downloads/v1/download_service_pb.js";
import { type LocalRedis, startRedis } from "../local/redis-server.js";
import { type ApiStack, startApiStack, withTestToken } from "./helpers/api.js";
import { type Services, startServices } from "./helpers/services.js";
import { spawnWorker, type WorkerProcess } from "./helpers/worker-process.js";

// Fault: Redis is stopped and started again (with its append-only file, on the same
// port) while clients keep calling Initiate. Every Initiate that answered OK must reach
// a terminal state; while Redis is down the API answers UNAVAILABLE, and afterwards it
// serves again without anyone restarting it.

// Hundreds of refused calls are the point here, not news worth a log line each.
process.env.TEST_LOG_LEVEL ??= "fatal";

const FILE_IDS = [501, 502, 503, 504];

let dir: string;
let svc: Services;
let st: ApiStack;
let worker: WorkerProcess;
let restarted: LocalRedis | undefined;

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), "dj-aof-"));
  svc = await startServices({ appendonlyDir: dir });
  for (const id of FILE_IDS) await svc.putSource(id, 20_000 + id);
  st = await startApiStack({}, { services: svc });
  worker = spawnWorker({
    ...svc.env,
    QUEUE_PREFIX: st.cfg.QUEUE_PREFIX,
    JOB_ATTEMPTS: "6",
    JOB_BACKOFF_MS: "300",
  });
});
afterAll(async () => {
  await worker?.kill("SIGTERM");
  await st?.stop();
  await restarted?.stop();
  await svc?.stop();
  rmSync(dir, { recursive: true, force: true });
});

test("Redis stopped and restarted under a stream of Initiate calls: every accepted job ends, nothing is lost", async () => {
  const clients = [
    createClient(
      DownloadService,
      createConnectTransport({
        baseUrl: st.server.url,
        httpVersion: "1.1",
        interceptors: [withTestToken],
      }),
    ),
    createClient(
      DownloadService,
      createGrpcTransport({ baseUrl: st.server.url, interceptors: [withTestToken] }),
    ),
  ];
  const accepted: string[] = [];
  const refused = new Map<string, number>();
  let phase: "before" | "down" | "after" = "before";
  const acceptedIn = { before: 0, down: 0, after: 0 };
  let stop = false;

  const lane = async (lane: number) => {
    for (let i = 0; !stop; i++) {
      const client = clients[(lane + i) % clients.length] ?? clients[0];
      const fileIds = [
        FILE_IDS[i % FILE_IDS.length] as number,
        FILE_IDS[(i + lane + 1) % FILE_IDS.length] as number,
      ];
      try {
        const res = await client?.initiate(
          { fileIds: [...new Set(fileIds)] },
          { timeoutMs: 15_000 },
        );
        accepted.push(res?.job?.jobId ?? "");
        acceptedIn[phase] += 1;
      } catch (err) {
        const code = Code[ConnectError.from(err).code];
        refused.set(code, (refused.get(code) ?? 0) + 1);
      }
      await new Promise((r) => setTimeout(r, 40));
    }
  };
  const lanes = [0, 1, 2, 3].map(lane);

  await expect.poll(() => acceptedIn.before).toBeGreaterThanOrEqual(20);
  const port = svc.redis.port;
  await svc.redis.stop();
  phase = "down";
  const downAt = Date.now();
  await expect.poll(() => refused.get("Unavailable") ?? 0).toBeGreaterThanOrEqual(10);
  restarted = await startRedis({ port, dir, appendonly: true });
  const downMs = Date.now() - downAt;
  phase = "after";
  // It recovers by itself: no restart of the API or the worker.
  await expect.poll(() => acceptedIn.after, { timeout: 30_000 }).toBeGreaterThanOrEqual(20);
  stop = true;
  await Promise.all(lanes);

  // Every job that was accepted ends; none is missing from Redis after the restart.
  const states = new Map<string, JobStateName | "missing">();
  await expect
    .poll(
      async () => {
        for (const id of accepted) {
          if (states.has(id) && states.get(id) !== "QUEUED" && states.get(id) !== "PROCESSING")
            continue;
          states.set(
            id,
            await st.store.get(id).then(
              (r) => r.state,
              () => "missing" as const,
            ),
          );
        }
        return [...states.values()].every((s) => s === "missing" || isTerminal(s));
      },
      { timeout: 90_000, interval: 250 },
    )
    .toBe(true);
  const byState = new Map<string, number>();
  for (const s of states.values()) byState.set(s, (byState.get(s) ?? 0) + 1);
  const lost = accepted.filter((id) => states.get(id) !== "COMPLETED");
  console.log(
    `fault redis-restart: Redis down ${downMs} ms under 4 lanes of Initiate (Connect and gRPC); ` +
      `accepted ${accepted.length} (before ${acceptedIn.before}, while down ${acceptedIn.down}, after ${acceptedIn.after}), ` +
      `refused ${JSON.stringify(Object.fromEntries(refused))}; end states ${JSON.stringify(Object.fromEntries(byState))}; lost: ${lost.length}`,
  );
  expect(new Set(accepted).size).toBe(accepted.length);
  expect(lost).toEqual([]);
  // While Redis was down the only answer was UNAVAILABLE.
  expect([...refused.keys()]).toEqual(["Unavailable"]);
  expect(worker.child.exitCode).toBeNull();
});
