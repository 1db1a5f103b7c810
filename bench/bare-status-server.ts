import { createServer } from "node:http";
import { Redis } from "ioredis";
import { RedisKeys } from "../core/keys.js";

// The limit of this stack for a status poll: node:http, one HGETALL of the job's hash,
// the hash as JSON. No validation, no conversion, no framework. GET /jobs/<id>.
// REDIS_URL, KEY_PREFIX (QUEUE_PREFIX of the jobs) and PORT from the environment.

const redis = new Redis(process.env.REDIS_URL ?? "redis://127.0.0.1:6379");
const keys = new RedisKeys(process.env.KEY_PREFIX ?? "dj");
const server = createServer((req, res) => {
  const id = (req.url ?? "").slice("/jobs/".length);
  redis.hgetall(keys.job(id)).then(
    (job) => {
      if (job.state === undefined) {
        res.writeHead(404).end();
        return;
      }
      const body = JSON.stringify(job);
      res.writeHead(200, {
        "content-type": "application/json",
        "content-length": Buffer.byteLength(body),
      });
      res.end(body);
    },
    () => res.writeHead(503).end(),
  );
});
server.listen(Number(process.env.PORT ?? 0), "127.0.0.1", () => {
  const addr = server.address();
  process.stdout.write(`listening ${typeof addr === "object" && addr ? addr.port : 0}\n`);
});
process.on("SIGTERM", () => process.exit(0));
