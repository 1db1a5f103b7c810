import { mkdtempSync, rmSync } from "node:fs";
import { loadavg, tmpdir } from "node:os";
import { join } from "node:path";
import { fitRunModel } from "../core/forecast.js";
import { RedisKeys } from "../core/keys.js";
import { createRedis } from "../core/redis.js";
import { S3_PROFILES } from "../local/realistic-s3.js";
import { startRedis } from "../local/redis-server.js";
import { LOCAL_S3_CREDENTIALS } from "../local/s3-server.js";
import { fmt, MB, percentile, type Row, serviceEnv, startNodeServer } from "./lib.js";

// How good the queue forecast is (core/forecast.ts). A real API and a real worker
// (2 slots) bundle files read through the realistic-S3 fixture, paced per connection and
// in all, so jobs share bandwidth as they would at S3. A warm-up of jobs gives the
// workers their first measurements; then jobs of 1 to 6 files of mixed sizes (0.25 to
// 16 MiB) arrive at random (exponential gaps), faster than the slots drain them, so a
// queue builds up. Every job's predicted end is read at Initiate and then every second
// until it ends; the error of each prediction is |predicted end - actual end| divided by
// the job's time (creation to end), and the medians are reported: at Initiate (the
// first thing a user is told), and over all reads while queued and while running.

interface JobJson {
  jobId: string;
  state: string;
  createTime: string;
  startTime?: string;
  endTime?: string;
  estimate?: {
    position?: number;
    predictedEndTime?: string;
    predictedStartTime?: string;
    runningJobs?: number;
    bytesPerSecond?: string;
    samples?: number;
  };
}

interface Sample {
  at: number;
  state: string;
  predictedEnd?: number;
}

const SIZES: [number, number, number][] = [
  // first id, last id, bytes
  [1, 30, MB / 4],
  [31, 60, 2 * MB],
  [61, 80, 6 * MB],
  [81, 90, 16 * MB],
];

function sizeOf(id: number): number {
  return SIZES.find(([a, b]) => id >= a && id <= b)?.[2] ?? 0;
}

/** A seeded generator, so every run draws the same workload. */
function seeded(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s * 1664525 + 1013904223) >>> 0;
    return s / 2 ** 32;
  };
}

export async function benchForecast(
  opts: { quick?: boolean } = {},
): Promise<{ rows: Row[]; data: unknown }> {
  const warmup = opts.quick ? 6 : 10;
  const count = opts.quick ? 16 : 40;
  const rand = seeded(20261202);
  const pick = (): number[] => {
    const n = 1 + Math.floor(rand() * 6);
    const ids = new Set<number>();
    while (ids.size < n) {
      // Small files more often than large ones.
      const r = rand();
      const [a, b] = (
        r < 0.4 ? SIZES[0] : r < 0.75 ? SIZES[1] : r < 0.93 ? SIZES[2] : SIZES[3]
      ) as [number, number, number];
      ids.add(a + Math.floor(rand() * (b - a + 1)));
    }
    return [...ids];
  };

  const load: { start: number[]; end?: number[] } = { start: loadavg() };
  const dir = mkdtempSync(join(tmpdir(), "dj-bench-forecast-"));
  const redis = await startRedis();
  const stops: (() => Promise<void>)[] = [];
  try {
    const s3 = await startNodeServer("bench/s3-server.ts", { S3_DIR: join(dir, "s3") });
    stops.push(s3.stop);
    const s3Endpoint = `http://127.0.0.1:${s3.port}`;
    const fixture = await startNodeServer("bench/s3-server.ts", {
      FIXTURE_TARGET: s3Endpoint,
      FIXTURE_BEHAVIOUR: JSON.stringify({
        ...S3_PROFILES.realistic,
        connectionBytesPerSecond: 6 * MB,
        aggregateBytesPerSecond: 10 * MB,
      }),
      GENERATED: [
        "download-sources/files/",
        ...SIZES.map(([a, b, size]) => `${a}-${b}:${size}`),
      ].join(" "),
    });
    stops.unshift(fixture.stop);
    const env = {
      ...serviceEnv(redis.url, `http://127.0.0.1:${fixture.port}`, "benchforecast"),
      S3_PUBLIC_ENDPOINT: s3Endpoint,
      S3_ACCESS_KEY_ID: LOCAL_S3_CREDENTIALS.accessKeyId,
      S3_SECRET_ACCESS_KEY: LOCAL_S3_CREDENTIALS.secretAccessKey,
    };
    const worker = await startNodeServer(
      "worker/main.ts",
      // Info, for the "worker ready" line that says it has started.
      { ...env, WORKER_CONCURRENCY: "2", PROGRESS_INTERVAL_MS: "200", LOG_LEVEL: "info" },
      // A loaded machine takes a while to start a worker.
      { ready: "worker ready", timeoutMs: 180_000 },
    );
    stops.unshift(worker.stop);
    const api = await startNodeServer(
      "bench/api-server.ts",
      { ...env, PORT: "0" },
      { timeoutMs: 180_000 },
    );
    stops.unshift(api.stop);
    const base = `http://127.0.0.1:${api.port}/downloads.v1.DownloadService`;
    const call = async (method: string, body: object): Promise<JobJson> => {
      const res = await fetch(`${base}/${method}`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify(body),
      });
      if (!res.ok) throw new Error(`${method}: HTTP ${res.status} ${await res.text()}`);
      return ((await res.json()) as { job: JobJson }).job;
    };
    const untilEnded = async (jobId: string, samples?: Sample[]): Promise<JobJson> => {
      for (;;) {
        const job = await call("GetStatus", { jobId });
        if (job.endTime !== undefined) return job;
        const end = job.estimate?.predictedEndTime;
        samples?.push({
          at: Date.now(),
          state: job.state,
          ...(end !== undefined ? { predictedEnd: Date.parse(end) } : {}),
        });
        await new Promise((r) => setTimeout(r, 1000));
      }
    };

    // Warm-up: the first measurements, two at a time (as many as the slots).
    const warmMs: number[] = [];
    for (let i = 0; i < warmup; i += 2) {
      const done = await Promise.all(
        [0, 1].map(async () => untilEnded((await call("Initiate", { fileIds: pick() })).jobId)),
      );
      for (const j of done) warmMs.push(Date.parse(j.endTime as string) - Date.parse(j.createTime));
    }
    const meanMs = warmMs.reduce((a, b) => a + b, 0) / warmMs.length;
    // Arrivals 1.3 times faster than two slots drain jobs of the warm-up's mean length.
    const gapMs = meanMs / 2 / 1.3;

    const jobs: {
      fileIds: number[];
      bytes: number;
      atInitiate?: number;
      estimateAtInitiate?: JobJson["estimate"];
      samples: Sample[];
      job?: JobJson;
    }[] = [];
    const runs: Promise<void>[] = [];
    for (let i = 0; i < count; i++) {
      const fileIds = pick();
      const entry = {
        fileIds,
        bytes: fileIds.reduce((n, id) => n + sizeOf(id), 0),
        samples: [] as Sample[],
      } as (typeof jobs)[number];
      jobs.push(entry);
      const started = await call("Initiate", { fileIds });
      const first = started.estimate?.predictedEndTime;
      if (first !== undefined) entry.atInitiate = Date.parse(first);
      entry.estimateAtInitiate = started.estimate;
      runs.push(
        untilEnded(started.jobId, entry.samples).then((j) => {
          entry.job = j;
        }),
      );
      await new Promise((r) => setTimeout(r, -Math.log(1 - rand()) * gapMs));
    }
    await Promise.all(runs);
    load.end = loadavg();
    // What the workers measured, and the fit the API made of it at the end.
    const conn = createRedis(redis.url, { role: "api" });
    const keys = new RedisKeys("benchforecast");
    const stats = await conn.hgetall(keys.runStats);
    const sizesKnown = await conn.hlen(keys.fileSizes);
    conn.disconnect();
    const model = fitRunModel(stats);

    const errors = { initiate: [] as number[], queued: [] as number[], running: [] as number[] };
    const waits: number[] = [];
    const lengths: number[] = [];
    for (const j of jobs) {
      const job = j.job as JobJson;
      const created = Date.parse(job.createTime);
      const ended = Date.parse(job.endTime as string);
      const span = ended - created;
      lengths.push(span);
      if (j.atInitiate !== undefined) errors.initiate.push(Math.abs(j.atInitiate - ended) / span);
      for (const s of j.samples) {
        if (s.predictedEnd === undefined) continue;
        const e = Math.abs(s.predictedEnd - ended) / span;
        if (s.state === "JOB_STATE_QUEUED") errors.queued.push(e);
        else if (s.state === "JOB_STATE_PROCESSING") errors.running.push(e);
      }
      const firstRunning = j.samples.find((s) => s.state === "JOB_STATE_PROCESSING");
      if (firstRunning !== undefined) waits.push(firstRunning.at - created);
    }
    const pct = (v: number) => `${fmt(v * 100, 0)} %`;
    const scenario = `forecast ${count} mixed jobs (1-6 files, 0.25-16 MiB), 2 slots`;
    const rows: Row[] = [
      {
        scenario,
        metric: "median |predicted - actual end| / job time, at Initiate",
        value: pct(percentile(errors.initiate, 50)),
        target: "<= 25 %",
        ok: percentile(errors.initiate, 50) <= 0.25,
      },
      {
        scenario,
        metric: "same, over every read while queued (p90)",
        value: `${pct(percentile(errors.queued, 50))} (${pct(percentile(errors.queued, 90))})`,
        target: "<= 25 %",
        ok: percentile(errors.queued, 50) <= 0.25,
      },
      {
        scenario,
        metric: "same, over every read while running (p90)",
        value: `${pct(percentile(errors.running, 50))} (${pct(percentile(errors.running, 90))})`,
        target: "<= 25 %",
        ok: percentile(errors.running, 50) <= 0.25,
      },
      {
        scenario,
        metric: "job time median / p90 (s); reads with a prediction",
        value: `${fmt(percentile(lengths, 50) / 1000)} / ${fmt(percentile(lengths, 90) / 1000)}; ${errors.queued.length + errors.running.length}`,
      },
      {
        scenario,
        metric: "load average 1 min at start / end",
        value: `${fmt(load.start[0] ?? 0, 2)} / ${fmt(load.end?.[0] ?? 0, 2)}`,
      },
    ];
    return {
      rows,
      data: {
        warmup,
        count,
        model,
        sizesKnown,
        warmMs,
        gapMs,
        load,
        errors,
        waits,
        jobs: jobs.map((j) => ({
          fileIds: j.fileIds,
          bytes: j.bytes,
          createTime: j.job?.createTime,
          startTime: j.job?.startTime,
          endTime: j.job?.endTime,
          atInitiate: j.atInitiate,
          estimateAtInitiate: j.estimateAtInitiate,
          samples: j.samples,
        })),
      },
    };
  } finally {
    for (const stop of stops) await stop().catch(() => undefined);
    await redis.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}
