import { createHash } from "node:crypto";
import { setTimeout as sleep } from "node:timers/promises";
import { type Client, type Code, ConnectError, createClient } from "@connectrpc/connect";
import {
  createConnectTransport,
  createGrpcTransport,
  Http2SessionManager,
} from "@connectrpc/connect-node";
import { watchJob } from "../../clients/lib/watch.js";
import { DownloadService, type Job, JobState } from "../../gen/downloads/v1/download_service_pb.js";
import { RetryInfoSchema } from "../../gen/google/rpc/error_details_pb.js";
import {
  Health,
  HealthCheckResponse_ServingStatus as Serving,
} from "../../gen/grpc/health/v1/health_pb.js";
import { freePort, waitUntil } from "../../local/ports.js";
import { type ApiStack, startApiStack, withTestToken } from "./api.js";
import { STARTUP_MS } from "./deadline.js";
import { type Services, startServices } from "./services.js";
import { spawnWorker, type WorkerProcess } from "./worker-process.js";
import { readZip } from "./zip.js";

// A Redis failover as an operator would try it: replicated Redis (a cluster with a
// replica per master, or a primary, a replica and a Sentinel), one API, two workers,
// Initiate at a steady rate with a watcher on every other job, then `kill -9` of the
// primary that holds the queue's hash slot. Everything observed is recorded for the
// caller to judge: test/failover.test.ts asserts on it, bench/failover.ts measures it.

export type DrillKind = "cluster" | "sentinel";

export interface DrillOptions {
  kind: DrillKind;
  /** Initiate calls per second (at most 20 in flight). */
  rate: number;
  /** Acknowledged jobs (and at least 3 completed) before the primary is killed. */
  warmup: number;
  /** Successful Initiates after readiness came back, before the load stops. */
  after: number;
  /** REDIS_MIN_REPLICAS_ACK for the API (0: off). */
  minReplicasAck?: number;
  /** Replicas (per master); default 1. WAIT for one replica needs two, or none is left. */
  replicas?: number;
}

export interface InitiateCall {
  /** ms since the drill's start, when the call was made. */
  at: number;
  ms: number;
  jobId?: string;
  code?: Code;
  retryAfter?: string | null;
  retryInfo?: boolean;
}

export interface WatcherLog {
  states: JobState[];
  versions: number[];
  /** The last snapshot the watcher got (the terminal one, if it got there). */
  last?: Job;
  error?: string;
  /** What the client library reported on the way (ms since the drill's start), for diagnosis. */
  events: string[];
}

export interface ProbeSample {
  at: number;
  /** HTTP status of /readyz (0: no answer). */
  api: number;
  worker: number;
  /** The API's grpc.health.v1 Check answer, as HTTP would say it: 200 SERVING, else 503. */
  grpc: number;
}

export interface DrillReport {
  calls: InitiateCall[];
  killedAt: number;
  promotedAt: number;
  probes: ProbeSample[];
  watchers: Map<string, WatcherLog>;
  /** The final record of every acknowledged job (GetStatus). */
  finals: Map<string, Job>;
  /** For every COMPLETED job: its ZIP matched the record's SHA-256 and held the sources. */
  zips: Map<string, { status: number; sha256Matches: boolean; sourcesMatch: boolean }>;
  /** Runs the workers started, per job (from their logs). */
  started: Map<string, number>;
  /** When each run that completed a job logged it, per job (ms since the drill's start). */
  completed: Map<string, number[]>;
  /** The ZIP behind the last snapshot each watcher saw, checked like `zips`. */
  watchedZips: Map<string, { status: number; sha256Matches: boolean; sourcesMatch: boolean }>;
}

const SOURCES: Array<[number, number, string]> = [
  [801, 200_000, "a.bin"],
  [802, 120_000, "b.bin"],
  [803, 40_000, "c.txt"],
];
const FILE_SETS = [[801], [802, 803], [801, 802, 803], [803]];

/** Runs the drill; stops everything it started, also when it fails. */
export async function runFailoverDrill(opts: DrillOptions): Promise<DrillReport> {
  const svc = await startServices(
    opts.kind === "cluster"
      ? { cluster: { replicas: opts.replicas ?? 1, nodeTimeoutMs: 2000 } }
      : // Long enough that a primary merely slow on a busy machine is not failed over
        // as well (a second failover loses what the first promotion had not copied).
        { sentinel: { replicas: opts.replicas ?? 1, sentinels: 1, downAfterMs: 2500 } },
  );
  let st: ApiStack | undefined;
  const workers: WorkerProcess[] = [];
  const sessions: Http2SessionManager[] = [];
  try {
    const sources = new Map<number, { name: string; bytes: Buffer }>();
    for (const [id, size, name] of SOURCES)
      sources.set(id, { name, bytes: await svc.putSource(id, size, name) });
    st = await startApiStack(
      {
        WATCH_HEARTBEAT_MS: "1000",
        READY_TIMEOUT_MS: "1000",
        ...(opts.minReplicasAck ? { REDIS_MIN_REPLICAS_ACK: String(opts.minReplicasAck) } : {}),
      },
      { services: svc },
    );
    const workerPort = await freePort();
    for (let i = 0; i < 2; i++) {
      workers.push(
        spawnWorker({
          ...svc.env,
          QUEUE_PREFIX: st.cfg.QUEUE_PREFIX,
          LOG_LEVEL: "info",
          LOG_FORMAT: "json",
          WORKER_CONCURRENCY: "4",
          THROTTLE_BYTES_PER_SECOND: String(1024 * 1024),
          PROGRESS_INTERVAL_MS: "100",
          JOB_LOCK_MS: "4000",
          JOB_STALLED_INTERVAL_MS: "2000",
          READY_TIMEOUT_MS: "1000",
          ...(i === 0 ? { WORKER_HEALTH_PORT: String(workerPort) } : {}),
        }),
      );
    }
    for (const w of workers)
      await waitUntil("worker ready", async () => w.output().includes("worker ready"), STARTUP_MS);

    const session = new Http2SessionManager(st.server.url);
    sessions.push(session);
    const clients: Array<Client<typeof DownloadService>> = [
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
        createGrpcTransport({
          baseUrl: st.server.url,
          sessionManager: session,
          interceptors: [withTestToken],
        }),
      ),
    ];
    const client = clients[0] as Client<typeof DownloadService>;
    const t0 = performance.now();
    const epoch0 = Date.now();
    const now = () => performance.now() - t0;

    // Readiness of the API and of one worker, as a load balancer would poll it.
    const probes: ProbeSample[] = [];
    let probing = true;
    const status = (url: string) =>
      fetch(url, { signal: AbortSignal.timeout(3000) }).then(
        async (r) => {
          await r.arrayBuffer();
          return r.status;
        },
        () => 0,
      );
    const health = createClient(
      Health,
      createGrpcTransport({ baseUrl: st.server.url, sessionManager: session }),
    );
    const grpcStatus = () =>
      health.check({ service: "" }, { timeoutMs: 3000 }).then(
        (r) => (r.status === Serving.SERVING ? 200 : 503),
        () => 0,
      );
    const prober = (async () => {
      while (probing) {
        const at = now();
        const [api, worker, grpc] = await Promise.all([
          status(`${(st as ApiStack).server.url}/readyz`),
          status(`http://127.0.0.1:${workerPort}/readyz`),
          grpcStatus(),
        ]);
        probes.push({ at, api, worker, grpc });
        await sleep(200);
      }
    })();

    // Watchers through the client library, which resumes after UNAVAILABLE.
    const watchers = new Map<string, WatcherLog>();
    const watchAbort = new AbortController();
    const watching: Promise<void>[] = [];
    const watch = (jobId: string) => {
      const log: WatcherLog = { states: [], versions: [], events: [] };
      watchers.set(jobId, log);
      watching.push(
        (async () => {
          try {
            for await (const job of watchJob(client, jobId, {
              signal: watchAbort.signal,
              baseBackoffMs: 100,
              maxBackoffMs: 1000,
              onEvent: (e) => {
                // Heartbeats only when they say something new; the rest as it comes.
                if (e.type === "heartbeat" && log.events.at(-1)?.endsWith(`hb v${e.version}`))
                  return;
                const what =
                  e.type === "heartbeat"
                    ? `hb v${e.version}`
                    : e.type === "reconnecting"
                      ? `reconnecting ${e.error?.message ?? "(clean end)"}`
                      : e.type;
                log.events.push(`${Math.round(now())} ${what}`);
              },
            })) {
              log.events.push(`${Math.round(now())} job v${job.version} ${JobState[job.state]}`);
              log.states.push(job.state);
              log.versions.push(job.version);
              log.last = job;
            }
          } catch (err) {
            log.error = ConnectError.from(err).message;
          }
        })(),
      );
    };

    // Initiate at a bounded rate.
    const calls: InitiateCall[] = [];
    let loading = true;
    let n = 0;
    const inflight = new Set<Promise<void>>();
    const initiate = async (i: number) => {
      const call: InitiateCall = { at: now(), ms: 0 };
      calls.push(call);
      const started = performance.now();
      try {
        const { job } = await (clients[i % 2] as Client<typeof DownloadService>).initiate({
          fileIds: FILE_SETS[i % FILE_SETS.length] as number[],
        });
        call.ms = performance.now() - started;
        call.jobId = job?.jobId ?? "";
        if (i % 2 === 0) watch(call.jobId);
      } catch (err) {
        call.ms = performance.now() - started;
        const ce = ConnectError.from(err);
        call.code = ce.code;
        call.retryAfter = ce.metadata.get("retry-after");
        call.retryInfo = ce.findDetails(RetryInfoSchema).length > 0;
      }
    };
    const loader = (async () => {
      while (loading) {
        if (inflight.size < 20) {
          const p = initiate(n++);
          inflight.add(p);
          p.finally(() => inflight.delete(p));
        }
        await sleep(1000 / opts.rate);
      }
      await Promise.all(inflight);
    })();

    const acked = () => calls.filter((c) => c.jobId !== undefined);
    const completedCount = () =>
      workers.reduce((k, w) => k + (w.output().match(/"msg":"job completed"/g) ?? []).length, 0);
    await waitUntil(
      "warm-up",
      async () => acked().length >= opts.warmup && completedCount() >= 3,
      60_000,
    );

    // kill -9 of the primary that holds the queue's hash slot.
    let killed: string;
    if (svc.cluster !== undefined) {
      const master = await svc.cluster.masterOf(st.cfg.QUEUE_PREFIX);
      killed = master.address;
      svc.cluster.killNode(killed);
    } else if (svc.sentinel !== undefined) {
      killed = await svc.sentinel.primary();
      const port = Number(killed.split(":")[1]);
      svc.sentinel.nodes.find((node) => node.port === port)?.kill();
    } else {
      throw new Error("the drill needs replicated Redis");
    }
    const killedAt = now();
    const primaryNow = async () => {
      if (svc.cluster !== undefined)
        return (await svc.cluster.masterOf((st as ApiStack).cfg.QUEUE_PREFIX)).address;
      return (svc.sentinel as NonNullable<Services["sentinel"]>).primary();
    };
    await waitUntil(
      "a replica promoted",
      async () => (await primaryNow().catch(() => killed)) !== killed,
      60_000,
    );
    const promotedAt = now();
    const recovered = (key: "api" | "worker" | "grpc") => {
      const after = probes.filter((p) => p.at >= killedAt);
      const down = after.findIndex((p) => p[key] !== 200);
      return down !== -1 && after.slice(down).some((p) => p[key] === 200);
    };
    await waitUntil(
      "readiness back after the failover",
      async () => recovered("api") && recovered("worker") && recovered("grpc"),
      60_000,
    ).catch(() => undefined);
    const backAt = now();
    await waitUntil(
      "Initiate working again",
      async () => calls.filter((c) => c.jobId !== undefined && c.at > backAt).length >= opts.after,
      60_000,
    );
    loading = false;
    await loader;
    probing = false;
    await prober;

    // Every acknowledged job to its end.
    const finals = new Map<string, Job>();
    const ids = acked().map((c) => c.jobId as string);
    await waitUntil(
      "every acknowledged job finished",
      async () => {
        for (const id of ids) {
          if (finals.has(id)) continue;
          const job = (await client.getStatus({ jobId: id }).catch(() => ({ job: undefined }))).job;
          if (job !== undefined && job.state >= JobState.COMPLETED) finals.set(id, job);
        }
        return finals.size === ids.length;
      },
      90_000,
    ).catch(() => undefined);
    // Watchers end with the terminal state; give them as long, then stop the rest.
    await Promise.race([Promise.all(watching), sleep(60_000)]);
    watchAbort.abort();
    await Promise.all(watching);

    type ZipCheck = { status: number; sha256Matches: boolean; sourcesMatch: boolean };
    const checkZip = async (job: Job): Promise<ZipCheck> => {
      const res = await fetch(job.result?.downloadUrl ?? "");
      const bytes = Buffer.from(await res.arrayBuffer());
      let sourcesMatch = false;
      if (res.status === 200) {
        const entries = await readZip(bytes).catch(() => new Map<string, Buffer>());
        const want = (job.fileIds ?? []).map((f) => sources.get(f));
        sourcesMatch =
          entries.size === want.length &&
          want.every((s) => s !== undefined && entries.get(s.name)?.equals(s.bytes) === true);
      }
      return {
        status: res.status,
        sha256Matches: createHash("sha256").update(bytes).digest("hex") === job.result?.sha256,
        sourcesMatch,
      };
    };
    const zips = new Map<string, ZipCheck>();
    for (const [id, job] of finals)
      if (job.state === JobState.COMPLETED) zips.set(id, await checkZip(job));
    const watchedZips = new Map<string, ZipCheck>();
    for (const [id, w] of watchers)
      if (w.last?.state === JobState.COMPLETED) watchedZips.set(id, await checkZip(w.last));

    const started = new Map<string, number>();
    const completed = new Map<string, number[]>();
    for (const w of workers) {
      for (const line of w.output().split("\n")) {
        const m = /"time":(\d+).*"jobId":"([^"]+)".*"msg":"job (started|completed)"/.exec(line);
        if (m === null) continue;
        const id = m[2] as string;
        if (m[3] === "started") started.set(id, (started.get(id) ?? 0) + 1);
        else completed.set(id, [...(completed.get(id) ?? []), Number(m[1]) - epoch0]);
      }
    }
    // A watcher that did not end with its job: what it saw next to what the job became,
    // and what the workers said about the job, so a failed run can be diagnosed.
    for (const [id, w] of watchers) {
      const final = finals.get(id);
      if (w.error === undefined && w.last?.version === final?.version) continue;
      const workerLines = workers.flatMap((wp) =>
        wp
          .output()
          .split("\n")
          .filter((line) => line.includes(id))
          .map((line) => line.slice(0, 300)),
      );
      console.log(
        `failover drill: watcher of ${id} ended with ${w.error ?? "its stream"}; ` +
          `saw ${w.last === undefined ? "nothing" : `v${w.last.version} ${JobState[w.last.state]}`}, ` +
          `final record ${final === undefined ? "unknown" : `v${final.version} ${JobState[final.state]} attempts ${final.attempts}`}; ` +
          `killed at ${Math.round(killedAt)}, promoted at ${Math.round(promotedAt)}; ` +
          `runs completed at ${JSON.stringify(completed.get(id) ?? [])}\n  watcher: ${w.events.join(" | ")}\n  ` +
          workerLines.join("\n  "),
      );
    }
    return {
      calls,
      killedAt,
      promotedAt,
      probes,
      watchers,
      finals,
      zips,
      started,
      completed,
      watchedZips,
    };
  } finally {
    for (const s of sessions) s.abort();
    await Promise.all(workers.map((w) => w.kill("SIGKILL")));
    await st?.stop();
    await svc.stop();
  }
}

/** The order a job's states may follow; a watcher's sequence never goes back in it. */
export const STATE_RANK: Partial<Record<JobState, number>> = {
  [JobState.QUEUED]: 0,
  [JobState.PROCESSING]: 1,
  [JobState.COMPLETED]: 2,
  [JobState.FAILED]: 2,
  [JobState.CANCELLED]: 2,
};

/** The longest stretch without a successful Initiate that overlaps the failover, in ms. */
export function longestOutageMs(report: DrillReport): number {
  const oks = report.calls
    .filter((c) => c.jobId !== undefined)
    .map((c) => c.at + c.ms)
    .sort((a, b) => a - b);
  let worst = 0;
  for (let i = 1; i < oks.length; i++) {
    const [a, b] = [oks[i - 1] as number, oks[i] as number];
    if (b >= report.killedAt && a <= report.promotedAt + 30_000) worst = Math.max(worst, b - a);
  }
  return worst;
}
