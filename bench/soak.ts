import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { Agent, request } from "node:http";
import http2 from "node:http2";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { gzipSync } from "node:zlib";
import { PutObjectCommand } from "@aws-sdk/client-s3";
import { loadConfig } from "../core/config.js";
import { Storage, storageOptionsFrom } from "../core/storage.js";
import { startRedis } from "../local/redis-server.js";
import { startS3 } from "../local/s3-server.js";
import { fmt, MB, type Row, serviceEnv, startNodeServer } from "./lib.js";

// Soak: a steady mix of what real clients do, for long enough to see whether memory
// comes back. The API and a real worker (worker/main.ts, bundling real S3 objects) run
// in their own processes. Each second SOAK_RATE jobs are started; half are watched
// (WatchJob over HTTP/1.1 or h2c, one in ten abandoned after its first message), half
// polled (GetStatus POST or GET, HTTP/1.1 or h2c) until they end; one in ten is
// cancelled; every job also brings one malformed request, one in five of them on a
// connection the client drops at once. Every few seconds both processes run a full GC
// and write process.memoryUsage() (bench/gc-on-signal.ts). The figure is the
// least-squares slope of each reading against jobs created, per thousand jobs, after a
// warm-up; then the load stops, and the readings after a rest say whether what grew is
// given back. SOAK_SECONDS (default 180, 60 with --quick) and SOAK_RATE (20).

const UNARY = "/downloads.v1.DownloadService/";
const FILES = 4;

interface Sample {
  jobs: number;
  /**
   * Jobs not yet followed to their end. On a loaded machine this backlog grows, and
   * memory with it, without anything leaking: the readings at rest tell the two apart.
   */
  inflight: number;
  api: Mem;
  worker: Mem;
}
interface Mem {
  rss: number;
  heap: number;
  external: number;
  arrayBuffers: number;
}

export async function benchSoak(
  opts: { quick?: boolean } = {},
): Promise<{ rows: Row[]; data: unknown }> {
  const seconds = Number(process.env.SOAK_SECONDS ?? (opts.quick ? 60 : 180));
  const rate = Number(process.env.SOAK_RATE ?? 20);
  const sampleEveryMs = 5_000;
  const warmupShare = 0.25;

  const redis = await startRedis();
  const s3 = await startS3({ buckets: ["download-sources", "download-results"] });
  const prefix = "benchsoak";
  const env = {
    ...serviceEnv(redis.url, s3.endpoint, prefix),
    WATCH_HEARTBEAT_MS: "1000",
    PROGRESS_INTERVAL_MS: "100",
  };
  const storage = new Storage(storageOptionsFrom(loadConfig(env)));
  const servers: { stop(): Promise<void> }[] = [];
  const agent = new Agent({ keepAlive: true, maxSockets: 64 });
  let h2: http2.ClientHttp2Session | undefined;
  try {
    for (let id = 1; id <= FILES; id++) {
      await storage.client.send(
        new PutObjectCommand({
          Bucket: storage.opts.sourceBucket,
          Key: storage.sourceKey(id),
          Body: Buffer.alloc(48 * 1024, id),
        }),
      );
    }
    const dir = mkdtempSync(join(tmpdir(), "soak-"));
    const memFile = { api: join(dir, "api.json"), worker: join(dir, "worker.json") };
    // SOAK_HEAP_SNAPSHOTS=1: the API writes a heap snapshot (into the working directory)
    // once warm and once at rest, to compare what grew.
    const snapshots = process.env.SOAK_HEAP_SNAPSHOTS === "1";
    const measured = { args: ["--expose-gc"], imports: ["./bench/gc-on-signal.ts"] };
    const apiArgs = snapshots ? ["--expose-gc", "--heapsnapshot-signal=SIGWINCH"] : measured.args;
    const [api, worker] = await Promise.all([
      startNodeServer(
        "bench/api-server.ts",
        { ...env, PORT: "0", BENCH_MEMORY_FILE: memFile.api },
        { ...measured, args: apiArgs },
      ),
      startNodeServer(
        "worker/main.ts",
        {
          ...env,
          LOG_LEVEL: "info",
          WORKER_CONCURRENCY: "32",
          // About half a second per job, so watchers and pollers see it run.
          THROTTLE_BYTES_PER_SECOND: String(256 * 1024),
          BENCH_MEMORY_FILE: memFile.worker,
        },
        { ...measured, ready: "worker ready" },
      ),
    ]);
    servers.push(api, worker);
    const base = `http://127.0.0.1:${api.port}`;
    h2 = http2.connect(base);
    h2.on("error", () => undefined);
    const session = h2;

    const counts = {
      jobs: 0,
      done: 0,
      watched: 0,
      polled: 0,
      abandoned: 0,
      cancelled: 0,
      errors: 0,
      malformed: 0,
      dropped: 0,
    };

    const h1Call = (
      method: "GET" | "POST",
      path: string,
      headers: Record<string, string>,
      body?: Buffer,
    ) =>
      new Promise<{ status: number; body: Buffer }>((resolve, reject) => {
        const req = request(`${base}${path}`, { method, agent, headers }, (res) => {
          const parts: Buffer[] = [];
          res.on("data", (d: Buffer) => parts.push(d));
          res.on("end", () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(parts) }));
          res.on("error", reject);
        });
        req.on("error", reject);
        req.end(body);
      });
    const h2Call = (
      method: "GET" | "POST",
      path: string,
      headers: Record<string, string>,
      body?: Buffer,
    ) =>
      new Promise<{ status: number; body: Buffer }>((resolve, reject) => {
        const stream = session.request({ ":method": method, ":path": path, ...headers });
        let status = 0;
        const parts: Buffer[] = [];
        stream.on("response", (h) => {
          status = Number(h[":status"]);
        });
        stream.on("data", (d: Buffer) => parts.push(d));
        stream.on("end", () => resolve({ status, body: Buffer.concat(parts) }));
        stream.on("error", reject);
        stream.end(body);
      });
    const call = (useH2: boolean) => (useH2 ? h2Call : h1Call);
    const json = (o: unknown) => Buffer.from(JSON.stringify(o));
    const envelope = (o: unknown) => {
      const data = json(o);
      const head = Buffer.alloc(5);
      head.writeUInt32BE(data.length, 1);
      return Buffer.concat([head, data]);
    };
    const stateOf = (b: Buffer): string | undefined =>
      /"state":"(JOB_STATE_[A-Z]+)"/.exec(b.toString("utf8"))?.[1];
    const terminal = (s: string | undefined) =>
      s === "JOB_STATE_COMPLETED" || s === "JOB_STATE_FAILED" || s === "JOB_STATE_CANCELLED";

    const watch = (jobId: string, useH2: boolean, abandon: boolean) =>
      new Promise<void>((resolve) => {
        const headers = { "content-type": "application/connect+json" };
        const onData = (chunk: Buffer, stop: () => void) => {
          if (abandon) stop();
          else if (terminal(stateOf(chunk))) return;
        };
        if (useH2) {
          const stream = session.request({
            ":method": "POST",
            ":path": `${UNARY}WatchJob`,
            ...headers,
          });
          stream.on("data", (d: Buffer) =>
            onData(d, () => stream.close(http2.constants.NGHTTP2_CANCEL)),
          );
          stream.on("close", () => resolve());
          stream.on("error", () => undefined);
          stream.end(envelope({ jobId }));
          return;
        }
        const req = request(
          `${base}${UNARY}WatchJob`,
          { method: "POST", agent, headers },
          (res) => {
            res.on("data", (d: Buffer) => onData(d, () => req.destroy()));
            res.on("end", () => resolve());
            res.on("close", () => resolve());
            res.on("error", () => undefined);
          },
        );
        req.on("error", () => resolve());
        req.end(envelope({ jobId }));
      });

    const poll = async (jobId: string, useH2: boolean, get: boolean) => {
      for (let i = 0; i < 200; i++) {
        const r = get
          ? await call(useH2)(
              "GET",
              `${UNARY}GetStatus?connect=v1&encoding=json&message=${encodeURIComponent(JSON.stringify({ jobId }))}`,
              {},
            )
          : await call(useH2)(
              "POST",
              `${UNARY}GetStatus`,
              { "content-type": "application/json" },
              json({ jobId }),
            );
        if (r.status !== 200) throw new Error(`GetStatus ${r.status}`);
        if (terminal(stateOf(r.body))) return;
        await sleep(250);
      }
    };

    const malformed = (i: number) => {
      const useH2 = i % 2 === 1;
      const kinds: [string, Record<string, string>, Buffer][] = [
        [`${UNARY}GetStatus`, { "content-type": "application/json" }, Buffer.from("{not json")],
        [
          `${UNARY}GetStatus`,
          { "content-type": "application/json" },
          json({ jobId: "x", nope: 1 }),
        ],
        [
          `${UNARY}GetStatus`,
          { "content-type": "application/json" },
          json({ jobId: "no:such:job" }),
        ],
        [
          `${UNARY}Initiate`,
          { "content-type": "application/proto" },
          Buffer.from([0xff, 0xff, 0xff]),
        ],
        [`${UNARY}GetStatus`, { "content-type": "text/plain" }, Buffer.from("hello")],
        [
          `${UNARY}GetStatus`,
          { "content-type": "application/json", "content-encoding": "gzip" },
          gzipSync(json({ jobId: "x" })).subarray(0, 12),
        ],
        [
          `${UNARY}WatchJob`,
          { "content-type": "application/connect+json" },
          Buffer.from([0, 0, 0, 0, 99, 1]),
        ],
        [`${UNARY}Nope`, { "content-type": "application/json" }, json({})],
      ];
      const [path, headers, body] = kinds[i % kinds.length] as (typeof kinds)[number];
      counts.malformed++;
      // One in five goes over a connection of its own that the client drops right after
      // sending: connections come and go as well as streams.
      if (i % 5 === 0) return dropped(useH2, path, headers, body);
      return call(useH2)("POST", path, headers, body).then(
        () => undefined,
        () => undefined,
      );
    };

    const dropped = (
      useH2: boolean,
      path: string,
      headers: Record<string, string>,
      body: Buffer,
    ): Promise<void> =>
      new Promise((resolve) => {
        if (useH2) {
          const s = http2.connect(base);
          s.on("error", () => undefined);
          const stream = s.request({ ":method": "POST", ":path": path, ...headers });
          stream.on("error", () => undefined);
          stream.end(body, () => {
            s.destroy();
            counts.dropped++;
            resolve();
          });
          return;
        }
        const req = request(`${base}${path}`, { method: "POST", headers, agent: false });
        req.on("error", () => undefined);
        req.end(body, () => {
          req.destroy();
          counts.dropped++;
          resolve();
        });
      });

    const runJob = async (i: number) => {
      const useH2 = i % 4 >= 2;
      const fileIds = Array.from({ length: 1 + (i % 3) }, (_, k) => 1 + ((i + k) % FILES));
      const r = await call(useH2)(
        "POST",
        `${UNARY}Initiate`,
        { "content-type": "application/json" },
        json({ fileIds }),
      );
      if (r.status !== 200) throw new Error(`Initiate ${r.status} ${r.body.toString()}`);
      counts.jobs++;
      const jobId = (JSON.parse(r.body.toString()) as { job: { jobId: string } }).job.jobId;
      const cancel =
        i % 10 === 5
          ? sleep(100 + (i % 7) * 50).then(() =>
              call(!useH2)(
                "POST",
                `${UNARY}Cancel`,
                { "content-type": "application/json" },
                json({ jobId }),
              ).then(() => void counts.cancelled++),
            )
          : Promise.resolve();
      const watched = i % 2 === 0;
      if (watched) counts.watched++;
      else counts.polled++;
      const follow = watched ? watch(jobId, useH2, i % 20 === 0) : poll(jobId, useH2, i % 4 === 1);
      if (i % 20 === 0) counts.abandoned++;
      await Promise.all([cancel, follow, malformed(i)]);
      counts.done++;
    };

    const inflight = new Set<Promise<void>>();
    const sample = async (): Promise<Sample> => {
      rmSync(memFile.api, { force: true });
      rmSync(memFile.worker, { force: true });
      api.child.kill("SIGUSR2");
      worker.child.kill("SIGUSR2");
      const read = async (file: string): Promise<Mem> => {
        for (let k = 0; k < 200; k++) {
          try {
            const m = JSON.parse(readFileSync(file, "utf8")) as NodeJS.MemoryUsage;
            return {
              rss: m.rss,
              heap: m.heapUsed,
              external: m.external,
              arrayBuffers: m.arrayBuffers,
            };
          } catch {
            await sleep(50);
          }
        }
        throw new Error(`no memory reading in ${file}`);
      };
      const [a, w] = await Promise.all([read(memFile.api), read(memFile.worker)]);
      return { jobs: counts.jobs, inflight: inflight.size, api: a, worker: w };
    };

    const samples: Sample[] = [await sample()];
    const started = performance.now();
    let next = started;
    let i = 0;
    let lastSample = started;
    while (performance.now() - started < seconds * 1000) {
      next += 1000 / rate;
      const p = runJob(i++).catch((err: unknown) => {
        counts.errors++;
        if (counts.errors <= 5) process.stderr.write(`  soak: ${String(err)}\n`);
      });
      inflight.add(p);
      void p.finally(() => inflight.delete(p));
      const wait = next - performance.now();
      if (wait > 0) await sleep(wait);
      if (performance.now() - lastSample >= sampleEveryMs) {
        lastSample = performance.now();
        samples.push(await sample());
        if (snapshots && samples.length === Math.ceil((seconds * 1000) / sampleEveryMs / 4))
          api.child.kill("SIGWINCH");
      }
    }
    const loadSeconds = (performance.now() - started) / 1000;
    await Promise.race([Promise.all(inflight), sleep(30_000)]);
    session.close();
    agent.destroy();
    // At rest: no client connection, every job over; what is still held is held for good.
    await sleep(5_000);
    const rest = await sample();
    if (snapshots) {
      api.child.kill("SIGWINCH");
      await sleep(10_000);
    }

    const from = Math.floor(samples.length * warmupShare);
    const steady = samples.slice(from);
    const rows: Row[] = [];
    const scenario = `soak ${counts.jobs} jobs`;
    const data: Record<string, unknown> = { seconds: loadSeconds, rate, counts, samples, rest };
    // The leak this scenario was written for grew ~9-14.5 KB per job outside the heap; a
    // quarter of a KB per job is well inside what warm-up (code, caches filling) leaves.
    // Met unless the slope is above it by more than its own 95% interval: a worker's
    // external memory swings by tens of MB with the jobs in flight at each reading.
    const flatKB = 256;
    for (const proc of ["api", "worker"] as const) {
      for (const kind of ["rss", "heap", "external", "arrayBuffers"] as const) {
        const fit = slope(steady.map((s) => [s.jobs, s[proc][kind]]));
        const perK = fit.slope * 1000;
        const ci = fit.stderr * 2 * 1000;
        data[`${proc}.${kind}.bytesPerThousandJobs`] = { slope: perK, ci95: ci };
        const growth = (rest[proc][kind] - (steady[0] as Sample)[proc][kind]) / MB;
        rows.push({
          scenario,
          metric: `${proc} ${kind}: slope KB per 1000 jobs ± 95% (warm -> rest MB)`,
          value: `${fmt(perK / 1024, 0)} ± ${fmt(ci / 1024, 0)} (${growth >= 0 ? "+" : ""}${fmt(growth)})`,
          ...(kind === "external" || kind === "heap"
            ? { target: `<= ${flatKB}`, ok: (perK - ci) / 1024 <= flatKB }
            : {}),
        });
      }
    }
    rows.push({
      scenario,
      metric: "jobs/s, failed client calls",
      value: `${fmt(counts.jobs / loadSeconds)}, ${counts.errors}`,
    });
    return { rows, data };
  } finally {
    h2?.destroy();
    agent.destroy();
    for (const s of servers) await s.stop();
    storage.destroy();
    await s3.stop();
    await redis.stop();
  }
}

/** Least-squares slope of y against x, and its standard error. */
export function slope(points: readonly (readonly [number, number])[]): {
  slope: number;
  stderr: number;
} {
  const n = points.length;
  if (n < 3) return { slope: Number.NaN, stderr: Number.NaN };
  const mx = points.reduce((s, p) => s + p[0], 0) / n;
  const my = points.reduce((s, p) => s + p[1], 0) / n;
  let sxy = 0;
  let sxx = 0;
  for (const [x, y] of points) {
    sxy += (x - mx) * (y - my);
    sxx += (x - mx) ** 2;
  }
  if (sxx === 0) return { slope: Number.NaN, stderr: Number.NaN };
  const b = sxy / sxx;
  const a0 = my - b * mx;
  const sse = points.reduce((s, [x, y]) => s + (y - (a0 + b * x)) ** 2, 0);
  return { slope: b, stderr: Math.sqrt(sse / (n - 2) / sxx) };
}
