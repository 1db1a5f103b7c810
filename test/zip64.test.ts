import { execFile } from "node:child_process";
import { rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { promisify } from "node:util";
import { crc32 } from "node:zlib";
import { createClient } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { pino } from "pino";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import yauzl from "yauzl";
import type { JobRecord } from "../core/jobs.js";
import { DownloadService } from "../gen/downloads/v1/download_service_pb.js";
import { type RealisticS3, startRealisticS3 } from "../local/realistic-s3.js";
import { sampleStream } from "../local/samples.js";
import { type RunningWorker, startWorker } from "../worker/worker.js";
import { type ApiStack, startApiStack, withTestToken } from "./helpers/api.js";

// ZIP64, proven by readers nobody here wrote: jobs whose archive passes 4 GiB, with one
// entry over 4 GiB, and with more than 65,535 entries. The sources are made up by the
// realistic-S3 fixture from the sample generator (nothing stored), the worker bundles
// them as in production, and the archive s3rver stored is then tested in place by
// Info-ZIP `unzip -t`, `7z t`, Python's `zipfile` and `yauzl`, each entry's size and
// CRC-32 checked against the generator's bytes (yauzl also reads every byte).
//
// Slow (minutes, gigabytes through the worker): outside `npm test`, run with
//   ZIP64=1 npx vitest run test/zip64.test.ts

const run = promisify(execFile);
const GiB = 1024 ** 3;

interface Source {
  fileId: number;
  size: number;
}

const big: Source[] = [
  { fileId: 1, size: 4.5 * GiB },
  { fileId: 2, size: 1024 * 1024 + 7 },
];
// Just past the 65,535 entries a ZIP without ZIP64 can count.
const many: Source[] = Array.from({ length: 66_000 }, (_, i) => ({
  fileId: 100_000 + i,
  size: (i * 7919) % 2000,
}));
const sizes = new Map([...big, ...many].map((s) => [s.fileId, s.size]));

let st: ApiStack;
let fixture: RealisticS3;
let worker: RunningWorker;

async function expectedCrc(s: Source): Promise<number> {
  let crc = 0;
  for await (const chunk of sampleStream(s.fileId, s.size)) crc = crc32(chunk as Buffer, crc);
  return crc;
}

async function timed<T>(what: string, f: () => Promise<T>): Promise<T> {
  const started = performance.now();
  try {
    return await f();
  } finally {
    console.log(`zip64: ${what} took ${((performance.now() - started) / 1000).toFixed(1)} s`);
  }
}

/** Bundles `sources` and returns the path of the archive s3rver stored, and the record. */
async function bundle(sources: Source[]): Promise<{ path: string; rec: JobRecord }> {
  const client = createClient(
    DownloadService,
    createConnectTransport({
      baseUrl: st.server.url,
      httpVersion: "1.1",
      useBinaryFormat: true,
      interceptors: [withTestToken],
    }),
  );
  const jobId = (await client.initiate({ fileIds: sources.map((s) => s.fileId) })).job?.jobId ?? "";
  let rec: JobRecord | undefined;
  await expect
    .poll(async () => (rec = await st.store.get(jobId)).state, {
      timeout: 3 * 3600_000,
      interval: 1000,
    })
    .toMatch(/COMPLETED|FAILED|CANCELLED/);
  expect(rec?.state, rec?.error?.message).toBe("COMPLETED");
  const key = rec?.result?.key ?? "";
  return {
    path: join(st.svc.s3.dir, st.cfg.RESULT_BUCKET, `${key}._S3rver_object`),
    rec: rec as JobRecord,
  };
}

/** Runs all four readers on the archive; each must find every entry with the right bytes. */
async function checkWithEveryReader(path: string, sources: Source[]): Promise<void> {
  const crcs = await timed("the generator's CRC-32s", () => Promise.all(sources.map(expectedCrc)));
  const names = sources.map((s) => `generated-${s.fileId}.bin`);

  const unzip = await timed("unzip -t", () => run("unzip", ["-tq", path], { maxBuffer: 1 << 26 }));
  expect(unzip.stdout).toMatch(/No errors detected/);

  const sevenZip = await timed("7z t", () => run("7z", ["t", path], { maxBuffer: 1 << 26 }));
  expect(sevenZip.stdout).toMatch(/Everything is Ok/);
  expect(sevenZip.stdout).toMatch(new RegExp(`Files: ${sources.length}\\b`));

  const expected = join(st.svc.s3.dir, "zip64-expected.json");
  writeFileSync(expected, JSON.stringify(sources.map((s, i) => [names[i], s.size, crcs[i]])));
  const python = await timed("Python zipfile", () =>
    run(
      "python3",
      [
        "-c",
        `
import json, sys, zipfile
want = json.load(open(sys.argv[2]))
with zipfile.ZipFile(sys.argv[1]) as z:
    infos = z.infolist()
    assert len(infos) == len(want), (len(infos), len(want))
    for info, (name, size, crc) in zip(infos, want):
        assert (info.filename, info.file_size, info.CRC) == (name, size, crc), (info.filename, info.file_size, info.CRC, name, size, crc)
    bad = z.testzip()
    assert bad is None, bad
print("ok", len(infos))
`,
        path,
        expected,
      ],
      { maxBuffer: 1 << 20 },
    ),
  );
  expect(python.stdout.trim()).toBe(`ok ${sources.length}`);

  await timed("yauzl, every byte", async () => {
    const zip = await new Promise<yauzl.ZipFile>((ok, fail) =>
      yauzl.open(path, { lazyEntries: true }, (err, z) => (err ? fail(err) : ok(z))),
    );
    const seen: [string, number, number][] = [];
    await new Promise<void>((ok, fail) => {
      zip.on("error", fail);
      zip.on("end", () => ok());
      zip.on("entry", (entry: yauzl.Entry) => {
        zip.openReadStream(entry, (err, stream) => {
          if (err) return fail(err);
          let crc = 0;
          let n = 0;
          stream.on("data", (c: Buffer) => {
            crc = crc32(c, crc);
            n += c.length;
          });
          stream.on("error", fail);
          stream.on("end", () => {
            seen.push([entry.fileName, n, crc]);
            zip.readEntry();
          });
        });
      });
      zip.readEntry();
    });
    zip.close();
    expect(seen).toEqual(sources.map((s, i) => [names[i], s.size, crcs[i]]));
  });
}

describe.runIf(process.env.ZIP64 === "1")("ZIP64", () => {
  beforeAll(async () => {
    st = await startApiStack({
      MAX_FILES_PER_JOB: "100000",
      MAX_REQUEST_BYTES: String(4 * 1024 * 1024),
      MAX_JOB_BYTES: "0",
    });
    fixture = await startRealisticS3(st.svc.s3.endpoint, "loopback", 42, {
      bucket: st.cfg.SOURCE_BUCKET,
      prefix: st.cfg.SOURCE_PREFIX,
      sizeOf: (id) => sizes.get(id),
    });
    worker = await startWorker(
      {
        ...st.cfg,
        S3_ENDPOINT: fixture.endpoint,
        S3_PUBLIC_ENDPOINT: st.svc.s3.endpoint,
        MAX_JOB_BYTES: 0,
        MAX_JOB_SECONDS: 0,
        // s3rver answers a CompleteMultipartUpload only once it has copied every part
        // (over a minute for 4.5 GiB here) and sends nothing meanwhile, where S3 keeps
        // the connection alive with white space: the idle deadline must outlast it.
        S3_STALL_MS: 120_000,
        // Every progress write carries the whole record, 66,000 files long (~7 MB): at
        // one a second they and their Lua scripts starved the lock renewal on this busy
        // host until BullMQ failed the job as stalled. Few writes, a long lock.
        PROGRESS_INTERVAL_MS: 15_000,
        JOB_LOCK_MS: 120_000,
        JOB_STALLED_INTERVAL_MS: 60_000,
      },
      pino({ level: "warn" }),
    );
  });
  afterAll(async () => {
    await worker?.close();
    await fixture?.close();
    await st?.stop();
  });

  test(
    "an archive over 4 GiB with an entry over 4 GiB opens in every reader, every byte right",
    async () => {
      const { path, rec } = await timed("bundling 4.5 GiB + 1 MiB", () => bundle(big));
      console.log(`zip64: archive of ${rec.result?.sizeBytes} bytes`);
      expect(rec.result?.sizeBytes ?? 0).toBeGreaterThan(4 * GiB + 1024 * 1024);
      try {
        await checkWithEveryReader(path, big);
      } finally {
        // 4.5 GiB on disk: gone now, not only when the S3 server's folder is.
        rmSync(path, { force: true });
      }
    },
    3 * 3600_000,
  );

  test(
    "an archive of 66,000 entries opens in every reader, every byte right",
    async () => {
      const { path, rec } = await timed("bundling 66,000 files", () => bundle(many));
      console.log(`zip64: archive of ${rec.result?.sizeBytes} bytes, ${many.length} entries`);
      await checkWithEveryReader(path, many);
    },
    3 * 3600_000,
  );
});
