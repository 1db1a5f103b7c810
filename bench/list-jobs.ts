import { randomUUID } from "node:crypto";
import { loadavg } from "node:os";
import { JobIndex, type JobListQuery } from "../core/job-index.js";
import { JobStore } from "../core/job-store.js";
import { createRedis, waitForRedis } from "../core/redis.js";
import { startRedis } from "../local/redis-server.js";
import { fmt, percentile, type Row } from "./lib.js";

// ListJobs' cost against the owner's total: a small owner (1,000 jobs) and a large one
// (100,000; 20,000 with --quick) in one Redis, pages read alternately in slices so the
// machine's drift hits both alike. Each page is one script call (core/lua/list-jobs.lua):
// the figures are its latency from the API's side, for the first page, a page deep in
// the list (from a token), and a filtered first page (one state in ten).

const PAGE = 50;

async function seed(store: JobStore, owner: string, count: number): Promise<void> {
  const now = Date.now();
  for (let i = 0; i < count; i += 1000) {
    const pipe = store.redis.pipeline();
    for (let k = i; k < Math.min(count, i + 1000); k++) {
      const id = randomUUID();
      pipe.hset(store.key(id), {
        id,
        owner,
        state: k % 10 === 0 ? "FAILED" : "COMPLETED",
        fileIds: "[1,2,3]",
        version: "3",
        attempts: "1",
        createdAt: String(now - k),
        updatedAt: String(now - k),
        progress: '{"filesDone":3,"filesTotal":3,"bytesDone":0,"bytesTotal":0,"bytesPerSecond":0}',
        labels: `{"team":"t${k % 7}"}`,
      });
      pipe.zadd(store.keys.ownerJobs(owner), now - k, id);
    }
    await pipe.exec();
  }
}

export async function benchListJobs(
  opts: { quick?: boolean } = {},
): Promise<{ rows: Row[]; data: unknown }> {
  const large = opts.quick ? 20_000 : 100_000;
  const slices = opts.quick ? 5 : 15;
  const perSlice = 20;
  const server = await startRedis();
  const redis = createRedis(server.url, { role: "api" });
  try {
    await waitForRedis(redis);
    const store = new JobStore(redis, { prefix: "benchlist", recordTtlSeconds: 3600 });
    const index = new JobIndex(store);
    const owners = { small: 1_000, large };
    for (const [owner, count] of Object.entries(owners)) await seed(store, owner, count);

    const first: JobListQuery = { pageSize: PAGE, pageToken: "", states: [], labels: {} };
    const failed: JobListQuery = { ...first, states: ["FAILED"] };
    // The token of page 10 of each owner: a page deep in the list.
    const deep: Record<string, string> = {};
    for (const owner of Object.keys(owners)) {
      let token = "";
      for (let p = 0; p < 10; p++)
        token = (await index.list(owner, { ...first, pageToken: token })).nextPageToken;
      deep[owner] = token;
    }
    const kinds = {
      first: (owner: string) => index.list(owner, first),
      deep: (owner: string) => index.list(owner, { ...first, pageToken: deep[owner] ?? "" }),
      "failed only": (owner: string) => index.list(owner, failed),
    };
    const ms: Record<string, number[]> = {};
    const held: Record<string, number> = {};
    const load = loadavg()[0] ?? 0;
    for (let s = 0; s < slices; s++) {
      for (const [kind, call] of Object.entries(kinds)) {
        for (const owner of Object.keys(owners)) {
          const key = `${kind} ${owner}`;
          ms[key] ??= [];
          for (let i = 0; i < perSlice; i++) {
            const t0 = performance.now();
            const page = await call(owner);
            ms[key].push(performance.now() - t0);
            // A filtered page may be short (a bounded look per call): count what it held.
            if (kind !== "failed only" && page.jobs.length !== PAGE)
              throw new Error(`${key}: ${page.jobs.length} jobs`);
            held[key] = page.jobs.length;
          }
        }
      }
    }
    const scenario = `ListJobs page of ${PAGE}: owner of ${owners.small} vs ${owners.large} jobs (load ${fmt(load, 1)})`;
    const rows: Row[] = [];
    for (const kind of Object.keys(kinds)) {
      const small = ms[`${kind} small`] ?? [];
      const big = ms[`${kind} large`] ?? [];
      rows.push({
        scenario,
        metric: `${kind} (${held[`${kind} large`] ?? 0} jobs): p50 ms small / large (large ÷ small)`,
        value: `${fmt(percentile(small, 50), 2)} / ${fmt(percentile(big, 50), 2)} (${fmt(percentile(big, 50) / percentile(small, 50), 2)})`,
      });
      rows.push({
        scenario,
        metric: `${kind}: p99 ms small / large`,
        value: `${fmt(percentile(small, 99), 2)} / ${fmt(percentile(big, 99), 2)}`,
      });
    }
    return { rows, data: { owners, page: PAGE, slices, perSlice, load, held, ms } };
  } finally {
    redis.disconnect();
    await server.stop();
  }
}
