import { serve } from "@hono/node-server";
import { Queue } from "bullmq";
import { Hono } from "hono";
import { Redis } from "ioredis";

// The alternative users would write (the seeds' design): a Hono REST endpoint that reads
// the job from BullMQ. GET /jobs/<id> -> { id, state, progress }, 404 when unknown.
// REDIS_URL, QUEUE_PREFIX, QUEUE_NAME and PORT from the environment.

const connection = new Redis(process.env.REDIS_URL ?? "redis://127.0.0.1:6379", {
  maxRetriesPerRequest: null,
});
const queue = new Queue(process.env.QUEUE_NAME ?? "bundles", {
  connection,
  prefix: process.env.QUEUE_PREFIX ?? "bull",
});
const app = new Hono();
app.get("/jobs/:id", async (c) => {
  const job = await queue.getJob(c.req.param("id"));
  if (job === undefined) return c.json({ error: "not found" }, 404);
  return c.json({ id: job.id, state: await job.getState(), progress: job.progress });
});
serve({ fetch: app.fetch, port: Number(process.env.PORT ?? 0), hostname: "127.0.0.1" }, (info) => {
  process.stdout.write(`listening ${info.port}\n`);
});
process.on("SIGTERM", () => process.exit(0));
