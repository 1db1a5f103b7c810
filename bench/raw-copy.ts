import { loadConfig } from "../core/config.js";
import { Storage, storageOptionsFrom } from "../core/storage.js";
import { procMemory } from "./lib.js";

// Baseline for the bundling benchmark: the same bytes copied object by object from the
// source bucket to the result bucket (GetObject -> multipart Upload), no ZIP. Run as its
// own process so its peak RSS is comparable with a worker's. Prints one JSON line.

const [, , ...ids] = process.argv;
const cfg = loadConfig();
const storage = new Storage(storageOptionsFrom(cfg));
const started = performance.now();
const cpuStart = process.cpuUsage();
let bytes = 0;
for (const id of ids) {
  const fileId = Number(id);
  const head = await storage.headSource(fileId);
  if (head === undefined) throw new Error(`missing source ${fileId}`);
  const body = await storage.openSource(head.key);
  await storage.uploadResult(`raw-copy/${fileId}`, body, `${fileId}.bin`).done();
  bytes += head.sizeBytes;
}
const ms = performance.now() - started;
const cpu = process.cpuUsage(cpuStart);
const cpuMs = (cpu.user + cpu.system) / 1000;
process.stdout.write(
  `${JSON.stringify({ bytes, ms, cpuMs, peakRss: procMemory(process.pid).peak })}\n`,
);
storage.destroy();
