// The API entry point for memory tests: the same server/main.ts, plus a SIGUSR2 handler
// that runs a full garbage collection (node --expose-gc) and prints the heap, so a test
// can tell memory that is still referenced (a leak) from heap V8 merely kept.
import "../../server/main.ts";

const gc = (globalThis as { gc?: () => void }).gc;
process.on("SIGUSR2", () => {
  gc?.();
  gc?.();
  const m = process.memoryUsage();
  process.stdout.write(`memory heapUsed=${m.heapUsed} rss=${m.rss} gc=${gc !== undefined}\n`);
});
