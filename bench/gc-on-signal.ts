import { writeFileSync } from "node:fs";

// Preloaded (`--expose-gc --import ./bench/gc-on-signal.ts`) into the processes the soak
// scenario measures: SIGUSR2 runs a full collection and then writes
// process.memoryUsage() as JSON to BENCH_MEMORY_FILE, so each reading is what is still
// reachable rather than what the collector has not got round to yet.
const file = process.env.BENCH_MEMORY_FILE;
process.on("SIGUSR2", () => {
  (globalThis as { gc?: () => void }).gc?.();
  if (file !== undefined && file !== "") writeFileSync(file, JSON.stringify(process.memoryUsage()));
});
