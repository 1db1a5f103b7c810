import { execFile } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { loadavg, tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { crc32 } from "node:zlib";
import yauzl from "yauzl";
import { loadConfig } from "../core/config.js";
import { JobService } from "../core/job-service.js";
import { JobStore } from "../core/job-store.js";
import { createBundleQueue } from "../core/queue.js";
import { createRedis } from "../core/redis.js";
import { S3_PROFILES, type S3Behaviour } from "../local/realistic-s3.js";
import { startRedis } from "../local/redis-server.js";
import { LOCAL_S3_CREDENTIALS } from "../local/s3-server.js";
import { sampleStream } from "../local/samples.js";
import { fmt, MB, procMemory, type Row, startNodeServer } from "./lib.js";

// Bundling at real S3 conditions. The worker reads its sources through the realistic-S3
// fixture (local/realistic-s3.ts: 30 ms to the first byte, 40 MiB/s per connection, an
// aggregate cap), which makes the sources up from the sample generator (no disk, no
// seeding) and passes the uploads on to s3rver. Side by side in one run, for each case:
//
// - the worker as it is (read-ahead window, ranged GETs of large objects);
// - the worker reading one object after another, as it did before (READ_AHEAD_OBJECTS=1,
//   no ranges): what the read-ahead is worth;
// - a raw parallel copy (bench/raw-copy.ts: the same bytes by plain parallel GETs into
//   one multipart upload, no ZIP): what this machine and fixture allow at most;
// - the fixture's aggregate cap: what real S3 would allow.
//
// Then the small-files case again at the `throttled` profile (5 % SlowDown, 1 % of
// bodies reset part-way): it must complete with the right bytes, and its cost is
// reported. Every ZIP is checked: each entry's CRC-32 and size against the generator's.
// Peak RSS (VmHWM) of each worker process, and of a 100 MB job against the largest.
//
// The aggregate cap (BENCH_S3_AGGREGATE_MIB, default 48) is what the fixture alone
// serves to 16 readers at ~0.9 of; with the worker and s3rver on the same two cores the
// raw copy moves ~26–34 MB/s, so there the ratio to the cap measures the machine and
// the ratio to the raw copy the worker. BENCH_S3_CONNECTION_MIB sets the per-connection cap (default
// 40; keep it below the aggregate, as at S3, or ranged reads have nothing to win) and
// BENCH_LARGE_MIB the size of the large files (default 512). BENCH_BUNDLE_SMALL_ONLY=1
// runs the small-files case alone (side by side as above), for quick profiling rounds;
// every row says the load average at its start.

const run = promisify(execFile);

interface Case {
  name: string;
  first: number;
  files: number;
  fileBytes: number;
}

interface BundleRun {
  mode: string;
  ms: number;
  MBps: number;
  peakRss: number;
  verified: boolean;
  problem?: string;
}

const expectedCrc = new Map<string, number>();

async function sampleCrc(fileId: number, size: number): Promise<number> {
  const key = `${fileId}:${size}`;
  let crc = expectedCrc.get(key);
  if (crc === undefined) {
    crc = 0;
    for await (const chunk of sampleStream(fileId, size)) crc = crc32(chunk as Buffer, crc);
    expectedCrc.set(key, crc);
  }
  return crc;
}

/** Every entry of the ZIP (a file on s3rver's disk) has the generator's size and CRC-32. */
async function verifyZip(path: string, c: Case): Promise<string | undefined> {
  const zip = await new Promise<yauzl.ZipFile>((ok, fail) =>
    yauzl.open(path, { lazyEntries: true }, (err, z) => (err ? fail(err) : ok(z))),
  );
  try {
    if (zip.entryCount !== c.files) return `${zip.entryCount} entries, expected ${c.files}`;
    let i = 0;
    let problem: string | undefined;
    await new Promise<void>((ok, fail) => {
      zip.on("error", fail);
      zip.on("end", () => ok());
      zip.on("entry", (e: yauzl.Entry) => {
        const id = c.first + i++;
        sampleCrc(id, c.fileBytes).then((crc) => {
          if (e.uncompressedSize !== c.fileBytes || e.crc32 !== crc)
            problem ??= `entry ${e.fileName}: size ${e.uncompressedSize}, crc ${e.crc32} (expected ${crc})`;
          zip.readEntry();
        }, fail);
      });
      zip.readEntry();
    });
    return problem;
  } finally {
    zip.close();
  }
}

export async function benchBundle(
  opts: { quick?: boolean } = {},
): Promise<{ rows: Row[]; data: unknown }> {
  const aggregate = Number(process.env.BENCH_S3_AGGREGATE_MIB ?? 48) * MB;
  const perConnection = Number(process.env.BENCH_S3_CONNECTION_MIB ?? 40) * MB;
  const largeBytes = (opts.quick ? 64 : Number(process.env.BENCH_LARGE_MIB ?? 512)) * MB;
  const cases: Case[] = [
    {
      name: `${opts.quick ? 300 : 1000} × 256 KiB`,
      first: 1,
      files: opts.quick ? 300 : 1000,
      fileBytes: 256 * 1024,
    },
    { name: `4 × ${largeBytes / MB} MiB`, first: 2001, files: 4, fileBytes: largeBytes },
  ];
  const flat: Case = { name: "4 × 25 MiB", first: 3001, files: 4, fileBytes: 25 * MB };
  const caps = { aggregateBytesPerSecond: aggregate, connectionBytesPerSecond: perConnection };
  const realistic: S3Behaviour = { ...S3_PROFILES.realistic, ...caps };
  const throttled: S3Behaviour = { ...S3_PROFILES.throttled, ...caps };
  const generated = [
    "download-sources/files/",
    ...[...cases, flat].map((c) => `${c.first}-${c.first + c.files - 1}:${c.fileBytes}`),
  ].join(" ");

  const dir = mkdtempSync(join(tmpdir(), "dj-bench-bundle-"));
  const redis = await startRedis();
  const s3 = await startNodeServer("bench/s3-server.ts", { S3_DIR: join(dir, "s3") });
  const s3Endpoint = `http://127.0.0.1:${s3.port}`;
  const base = {
    REDIS_URL: redis.url,
    S3_PUBLIC_ENDPOINT: s3Endpoint,
    S3_ACCESS_KEY_ID: LOCAL_S3_CREDENTIALS.accessKeyId,
    S3_SECRET_ACCESS_KEY: LOCAL_S3_CREDENTIALS.secretAccessKey,
    QUEUE_PREFIX: "benchbundle",
    LOG_LEVEL: "warn",
  };
  const cfg = loadConfig({ ...base, S3_ENDPOINT: s3Endpoint });
  const conn = createRedis(redis.url, { role: "api" });
  const store = new JobStore(conn, { prefix: cfg.QUEUE_PREFIX, recordTtlSeconds: 3600 });
  const queue = createBundleQueue(conn, { prefix: cfg.QUEUE_PREFIX, attempts: 3, backoffMs: 200 });
  // Every run bundles the same files afresh: no reuse of an earlier result.
  const jobs = new JobService({
    store,
    queue,
    redis: conn,
    maxFilesPerJob: 100_000,
    policy: { dedupInFlight: false, reuseResults: false },
  });

  async function withFixture<T>(
    behaviour: S3Behaviour,
    use: (endpoint: string) => Promise<T>,
  ): Promise<{ result: T; stats: Record<string, number> }> {
    const fixture = await startNodeServer("bench/s3-server.ts", {
      FIXTURE_TARGET: s3Endpoint,
      FIXTURE_BEHAVIOUR: JSON.stringify(behaviour),
      GENERATED: generated,
    });
    let out = "";
    fixture.child.stdout?.on("data", (d: Buffer) => (out += d.toString()));
    let result: T;
    try {
      result = await use(`http://127.0.0.1:${fixture.port}`);
    } finally {
      await fixture.stop();
    }
    return {
      result,
      stats: JSON.parse(/stats (.*)/.exec(out)?.[1] ?? "{}") as Record<string, number>,
    };
  }

  async function bundle(
    c: Case,
    mode: string,
    endpoint: string,
    extra: Record<string, string>,
  ): Promise<BundleRun> {
    const ids = Array.from({ length: c.files }, (_, i) => c.first + i);
    const mb = (c.files * c.fileBytes) / MB;
    const worker = await startNodeServer(
      "worker/main.ts",
      { ...base, S3_ENDPOINT: endpoint, WORKER_CONCURRENCY: "1", LOG_LEVEL: "info", ...extra },
      { ready: "worker ready" },
    );
    const pid = worker.child.pid as number;
    let peakRss = 0;
    try {
      const started = performance.now();
      const { job } = await jobs.initiate("bench", { fileIds: ids });
      let rec = await store.get(job.id);
      while (rec.state === "QUEUED" || rec.state === "PROCESSING") {
        await new Promise((r) => setTimeout(r, 100));
        rec = await store.get(job.id);
        peakRss = Math.max(peakRss, procMemory(pid).peak);
      }
      const ms = performance.now() - started;
      peakRss = Math.max(peakRss, procMemory(pid).peak);
      if (rec.state !== "COMPLETED" || rec.result === undefined) {
        return {
          mode,
          ms,
          MBps: 0,
          peakRss,
          verified: false,
          problem: `${rec.state}: ${rec.error?.message ?? ""}`,
        };
      }
      const problem = await verifyZip(
        join(dir, "s3", cfg.RESULT_BUCKET, `${rec.result.key}._S3rver_object`),
        c,
      );
      return {
        mode,
        ms,
        MBps: mb / (ms / 1000),
        peakRss,
        verified: problem === undefined,
        ...(problem !== undefined ? { problem } : {}),
      };
    } finally {
      await worker.stop();
    }
  }

  async function rawCopy(c: Case, endpoint: string): Promise<BundleRun> {
    const ids = Array.from({ length: c.files }, (_, i) => String(c.first + i));
    const out = await run(process.execPath, ["--import", "tsx", "bench/raw-copy.ts", ...ids], {
      env: { ...process.env, ...base, S3_ENDPOINT: endpoint },
      maxBuffer: 1 << 20,
    });
    const r = JSON.parse(out.stdout.trim().split("\n").at(-1) ?? "{}") as {
      bytes: number;
      ms: number;
      peakRss: number;
    };
    return {
      mode: "raw parallel copy",
      ms: r.ms,
      MBps: r.bytes / MB / (r.ms / 1000),
      peakRss: r.peakRss,
      verified: true,
    };
  }

  const SEQUENTIAL = { READ_AHEAD_OBJECTS: "1", READ_RANGE_BYTES: String(1024 * MB * 1024) };
  const rows: Row[] = [];
  const results: Record<string, unknown>[] = [];
  try {
    const smallOnly = process.env.BENCH_BUNDLE_SMALL_ONLY === "1";
    for (const c of smallOnly ? cases.slice(0, 1) : cases) {
      const load = loadavg()[0] ?? 0;
      // Each case meets a fresh fixture: its pacers start empty.
      const runs: BundleRun[] = [];
      for (const mode of ["raw", "read-ahead", "sequential"] as const) {
        const { result } = await withFixture(realistic, (endpoint) =>
          mode === "raw"
            ? rawCopy(c, endpoint)
            : bundle(
                c,
                mode === "read-ahead" ? "worker (read-ahead)" : "worker, sequential reads (before)",
                endpoint,
                mode === "sequential" ? SEQUENTIAL : {},
              ),
        );
        runs.push(result);
        process.stderr.write(
          `  ${c.name} ${result.mode}: ${fmt(result.MBps)} MB/s, peak RSS ${fmt(result.peakRss / MB)} MB${result.problem ? ` (${result.problem})` : ""}\n`,
        );
      }
      const [raw, ahead, seq] = runs as [BundleRun, BundleRun, BundleRun];
      const capMBps = aggregate / MB;
      results.push({ case: c.name, aggregateMBps: capMBps, runs });
      const scenario = `bundle ${c.name}, realistic S3 (30 ms, ${fmt(perConnection / MB, 0)} MiB/s per connection, ${fmt(capMBps, 0)} MiB/s in all), load ${fmt(load)}`;
      rows.push(
        { scenario, metric: "worker MB/s (read-ahead)", value: fmt(ahead.MBps) },
        { scenario, metric: "worker MB/s, sequential reads (before)", value: fmt(seq.MBps) },
        { scenario, metric: "raw parallel copy MB/s", value: fmt(raw.MBps) },
        {
          scenario,
          metric: "read-ahead / aggregate cap",
          value: fmt(ahead.MBps / capMBps, 2),
          target: ">= 0.8",
          ok: ahead.MBps / capMBps >= 0.8,
        },
        {
          scenario,
          metric: "read-ahead / sequential",
          value: fmt(ahead.MBps / seq.MBps, 1),
          ...(c.fileBytes < MB ? { target: ">= 8", ok: ahead.MBps / seq.MBps >= 8 } : {}),
        },
        {
          scenario,
          metric: "read-ahead / raw parallel copy",
          value: fmt(ahead.MBps / raw.MBps, 2),
        },
        {
          scenario,
          metric: "worker peak RSS MB (read-ahead)",
          value: fmt(ahead.peakRss / MB),
          target: "<= 300",
          ok: ahead.peakRss <= 300 * MB,
        },
        {
          scenario,
          metric: "every ZIP entry's size and CRC right",
          value: ahead.verified && seq.verified ? "yes" : `no: ${ahead.problem ?? seq.problem}`,
          ok: ahead.verified && seq.verified,
        },
      );
    }

    if (smallOnly) return { rows, data: results };
    const { result: small } = await withFixture(realistic, (endpoint) =>
      bundle(flat, "worker (read-ahead)", endpoint, {}),
    );
    const largest = (results[1]?.runs as BundleRun[] | undefined)?.[1];
    rows.push({
      scenario: "bundle",
      metric: `worker peak RSS ${cases[1]?.name} / ${flat.name} (${fmt((largest?.peakRss ?? 0) / MB)} / ${fmt(small.peakRss / MB)} MB)`,
      value: fmt((largest?.peakRss ?? 0) / small.peakRss, 2),
      target: "<= 1.2",
      ok: (largest?.peakRss ?? 0) / small.peakRss <= 1.2,
    });

    const c0 = cases[0] as Case;
    const { result: faulty, stats } = await withFixture(throttled, (endpoint) =>
      bundle(c0, "worker at throttled", endpoint, {}),
    );
    const clean = (results[0]?.runs as BundleRun[] | undefined)?.[1];
    results.push({ case: `${c0.name} throttled`, run: faulty, fixture: stats });
    const scenario = `bundle ${c0.name}, throttled S3 (5 % SlowDown, 1 % resets)`;
    rows.push(
      {
        scenario,
        metric: "completed, every entry's size and CRC right",
        value: faulty.verified ? "yes" : `no: ${faulty.problem}`,
        ok: faulty.verified,
      },
      { scenario, metric: "worker MB/s", value: fmt(faulty.MBps) },
      {
        scenario,
        metric: "throughput cost against realistic",
        value: `${fmt((1 - faulty.MBps / (clean?.MBps ?? 1)) * 100, 0)} %`,
      },
      {
        scenario,
        metric: "faults met: SlowDown / bodies reset",
        value: `${stats.slowDowns ?? "?"} / ${stats.cutBodies ?? "?"} of ${stats.requests ?? "?"} requests`,
      },
    );
    return { rows, data: results };
  } finally {
    await queue.close();
    conn.disconnect();
    await s3.stop();
    await redis.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}
