import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    testTimeout: 60_000,
    hookTimeout: 60_000,
    // Each file starts its own redis-server and S3 server; two at a time fits 2 cores.
    maxWorkers: 2,
    pool: "forks",
  },
});
