import { Agent, request } from "node:http";

// Light WatchJob clients for the fan-out benchmark, run as a child process so that the
// clients are not the bottleneck being measured: plain node:http requests carrying one
// Connect envelope, and a minimal envelope reader. Each message's version and receipt
// time (wall clock with sub-millisecond resolution, comparable across processes) is
// recorded. argv: url jobId count. Prints "ready" once every stream has its snapshot,
// and the receipts as one JSON line when stdin closes.

const [, , url, jobId, countArg] = process.argv;
const count = Number(countArg);
const now = () => performance.timeOrigin + performance.now();
const agent = new Agent({ keepAlive: true, maxSockets: Number.POSITIVE_INFINITY });
const receipts: Record<number, number[]> = {};
const body = Buffer.from(JSON.stringify({ jobId }));
const head = Buffer.alloc(5);
head.writeUInt32BE(body.length, 1);
const payload = Buffer.concat([head, body]);
let snapshots = 0;
const requests: ReturnType<typeof request>[] = [];

function open(): void {
  const req = request(
    `${url}/downloads.v1.DownloadService/WatchJob`,
    { method: "POST", agent, headers: { "content-type": "application/connect+json" } },
    (res) => {
      let buf: Buffer = Buffer.alloc(0);
      res.on("data", (chunk: Buffer) => {
        const at = now();
        buf = buf.length === 0 ? chunk : Buffer.concat([buf, chunk]);
        while (buf.length >= 5) {
          const length = buf.readUInt32BE(1);
          if (buf.length < 5 + length) break;
          const flags = buf[0] as number;
          const msg = buf.subarray(5, 5 + length);
          buf = buf.subarray(5 + length);
          if (flags !== 0) continue;
          // Only the version is needed: a pattern instead of JSON.parse keeps the client light.
          const text = msg.toString("latin1");
          const match = text.startsWith('{"job":') ? /"version":(\d+)/.exec(text) : null;
          if (match === null) continue;
          const version = Number(match[1]);
          if (version === 1) {
            snapshots++;
            if (snapshots === count) process.stdout.write("ready\n");
            continue;
          }
          (receipts[version] ??= []).push(at);
        }
      });
      res.on("error", () => undefined);
    },
  );
  req.on("error", () => undefined);
  req.end(payload);
  requests.push(req);
}

for (let i = 0; i < count; i++) open();
process.stdin.resume();
process.stdin.on("end", () => {
  for (const r of requests) r.destroy();
  agent.destroy();
  // Exit only once the (large) line has reached the pipe.
  process.stdout.write(`${JSON.stringify(receipts)}\n`, () => process.exit(0));
});
