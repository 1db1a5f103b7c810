import { defineConfig } from "vitest/config";

// The suite runs on shared two-core machines, next to other work: every wait is for a
// condition, with deadlines far above what an idle machine needs (speed belongs in
// `npm run bench`). Service logs are held back and shown only for a test that fails,
// unless LOG_LEVEL asks to see them as they come (test/helpers/test-log.ts).
const showLogs = (process.env.LOG_LEVEL ?? "") !== "";

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    testTimeout: 180_000,
    hookTimeout: 180_000,
    teardownTimeout: 60_000,
    expect: { poll: { timeout: 60_000, interval: 50 } },
    silent: showLogs ? false : "passed-only",
    // Each file starts its own redis-server and S3 server; two at a time fits 2 cores.
    maxWorkers: 2,
    pool: "forks",
  },
});
