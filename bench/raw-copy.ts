import { PassThrough } from "node:stream";
import { loadConfig } from "../core/config.js";
import { type SourceInfo, Storage, storageOptionsFrom } from "../core/storage.js";
import { procMemory } from "./lib.js";

// Baseline for the bundling benchmark: the same bytes copied as fast as plain parallel
// S3 calls go, with no ZIP and no order: HEAD every source, then GET them (large ones as
// ranges) COPY_CONCURRENCY at a time, writing the bytes as they come into one multipart
// upload in the result bucket. Run as its own process so its peak RSS is comparable with
// a worker's. Prints one JSON line.

const ids = process.argv.slice(2).map(Number);
const cfg = loadConfig();
const storage = new Storage(storageOptionsFrom(cfg));
const concurrency = Number(process.env.COPY_CONCURRENCY ?? 16);
const range = cfg.READ_RANGE_BYTES;

async function lanes<T>(items: readonly T[], n: number, each: (item: T) => Promise<void>) {
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.min(n, items.length) }, async () => {
      while (next < items.length) await each(items[next++] as T);
    }),
  );
}

const started = performance.now();
const cpuStart = process.cpuUsage();
const sources: SourceInfo[] = [];
await lanes(ids, concurrency, async (id) => {
  const head = await storage.headSource(id);
  if (head === undefined) throw new Error(`missing source ${id}`);
  sources.push(head);
});
const pieces = sources.flatMap((s) => {
  const n = s.sizeBytes <= 2 * range ? 1 : Math.floor(s.sizeBytes / range);
  return Array.from({ length: n }, (_, i) => ({
    s,
    start: i * range,
    end: i === n - 1 ? s.sizeBytes - 1 : (i + 1) * range - 1,
  }));
});
const sink = new PassThrough({ highWaterMark: 1024 * 1024 });
const upload = storage.uploadResult("raw-copy/all.bin", sink, "all.bin");
const uploaded = upload.done();
let bytes = 0;
await lanes(pieces, concurrency, async (p) => {
  const { body } = await storage.getSourceRange(p.s.key, { start: p.start, end: p.end });
  for await (const chunk of body) {
    bytes += (chunk as Buffer).length;
    if (!sink.write(chunk)) await new Promise((ok) => sink.once("drain", ok));
  }
});
sink.end();
await uploaded;
const ms = performance.now() - started;
const cpu = process.cpuUsage(cpuStart);
process.stdout.write(
  `${JSON.stringify({ bytes, ms, cpuMs: (cpu.user + cpu.system) / 1000, peakRss: procMemory(process.pid).peak })}\n`,
);
storage.destroy();
