import { readFileSync } from "node:fs";
import { type ClientHttp2Session, type ClientHttp2Stream, connect, constants } from "node:http2";
import { monitorEventLoopDelay } from "node:perf_hooks";

// WatchJob clients over HTTP/2 cleartext, many streams per connection as a proxy such as
// Envoy carries them, run as a child process of the watch benchmarks (watch-many.ts) so
// that the clients are neither in the API's process nor in the open-file budget of one
// process. Each stream sends one Connect envelope and reads envelopes with a minimal
// reader; only the job's version is taken from each message.
//
// argv: url idsFile watchersPerJob connections record(0|1)
//   idsFile: job ids, one a line; every id gets `watchersPerJob` streams, spread over
//   `connections` sessions round-robin (the API must allow enough concurrent streams per
//   connection: node's client queues streams beyond SETTINGS_MAX_CONCURRENT_STREAMS
//   without a word).
// Prints "ready <n> errors <e>" once every stream has had its first message or failed. When stdin closes it
// prints one JSON line: {errors, streams: [[jobIndex, v1, t1, v2, t2, ...], ...]} with
// record=1 (receipt times after the snapshot, wall clock with sub-millisecond
// resolution, comparable across processes), or {errors, open} with record=0.

const [, , url, idsFile, perJobArg, connectionsArg, recordArg] = process.argv;
const ids = readFileSync(idsFile as string, "utf8")
  .split("\n")
  .filter(Boolean);
const perJob = Number(perJobArg);
const connections = Number(connectionsArg);
const record = recordArg === "1";
const now = () => performance.timeOrigin + performance.now();
const path = "/downloads.v1.DownloadService/WatchJob";
const total = ids.length * perJob;

// A stall here would read as delivery latency: reported so it can be told apart.
const loop = monitorEventLoopDelay({ resolution: 10 });
// A proxy's receive windows, not Node's client defaults: 64 KiB for a whole connection of
// 1,000 streams held the API's writes back whenever this process was slow to read
// (Envoy's defaults are 256 MiB; 1 MiB per stream and per connection here).
const WINDOW_BYTES = 1 << 20;
const sessions: ClientHttp2Session[] = [];
for (let i = 0; i < connections; i++) {
  const s = connect(url as string, {
    settings: { enablePush: false, initialWindowSize: WINDOW_BYTES },
  });
  s.on("connect", () => s.setLocalWindowSize(WINDOW_BYTES));
  s.on("error", () => undefined);
  sessions.push(s);
}

let snapshots = 0;
let errors = 0;
let retries = 0;
let open = 0;
const streams: ClientHttp2Stream[] = [];
const receipts: number[][] = [];

/** Counts a stream that got its snapshot or failed first; all of them: "ready". */
let firsts = 0;
function settled(): void {
  firsts++;
  if (firsts === total) {
    loop.enable();
    process.stdout.write(`ready ${snapshots} errors ${errors} retries ${retries}\n`);
  }
}

function envelope(jobId: string): Buffer {
  const body = Buffer.from(JSON.stringify({ jobId }));
  const out = Buffer.alloc(5 + body.length);
  out.writeUInt32BE(body.length, 1);
  body.copy(out, 5);
  return out;
}

/**
 * A stream refused before its snapshot is opened again a second later, as a Connect
 * client honouring retry-after does: the API answers UNAVAILABLE when a burst of new
 * watches waits longer than its subscribe timeout for Redis, which a busy machine does.
 */
function refused(
  session: ClientHttp2Session,
  jobIndex: number,
  attempt: number,
  mine: number[],
  why: string,
): void {
  if (retries === 0) process.stderr.write(`watch stream refused (retried): ${why.slice(0, 200)}\n`);
  if (attempt >= 30) {
    errors++;
    settled();
    return;
  }
  retries++;
  setTimeout(() => watch(session, jobIndex, attempt + 1, mine), 1000);
}

function watch(
  session: ClientHttp2Session,
  jobIndex: number,
  attempt = 0,
  mine: number[] = [jobIndex],
): void {
  const stream = session.request({
    [constants.HTTP2_HEADER_METHOD]: "POST",
    [constants.HTTP2_HEADER_PATH]: path,
    "content-type": "application/connect+json",
  });
  if (record && attempt === 0) receipts.push(mine);
  let first = true;
  let buf: Buffer = Buffer.alloc(0);
  open++;
  stream.on("data", (chunk: Buffer) => {
    const at = now();
    buf = buf.length === 0 ? chunk : Buffer.concat([buf, chunk]);
    while (buf.length >= 5) {
      const length = buf.readUInt32BE(1);
      if (buf.length < 5 + length) break;
      const flags = buf[0] as number;
      const text = buf.toString("latin1", 5, 5 + length);
      buf = buf.subarray(5 + length);
      if (flags !== 0) {
        // The end of the stream before the snapshot: a refusal.
        if (first) {
          first = false;
          refused(session, jobIndex, attempt, mine, text);
        }
        continue;
      }
      const match = text.startsWith('{"job":') ? /"version":(\d+)/.exec(text) : null;
      if (match === null) continue;
      if (first) {
        first = false;
        snapshots++;
        settled();
        continue;
      }
      if (record) mine.push(Number(match[1]), at);
    }
  });
  stream.on("error", (err) => {
    if (first) {
      first = false;
      refused(session, jobIndex, attempt, mine, String(err));
    } else errors++;
  });
  stream.on("close", () => {
    open--;
    if (first) {
      first = false;
      refused(session, jobIndex, attempt, mine, "closed before the snapshot");
    }
  });
  stream.end(envelope(ids[jobIndex] as string));
  streams.push(stream);
}

// Open in waves so the API's accept and subscribe batching, not a burst of 25,000
// HEADERS frames, is what the open time shows.
let next = 0;
function wave(): void {
  const end = Math.min(total, next + 500);
  for (; next < end; next++) {
    watch(sessions[next % connections] as ClientHttp2Session, next % ids.length);
  }
  if (next < total) setTimeout(wave, 5);
}
wave();

// A run that does not get ready says how far it got (the bench's deadline ends it).
const progress = setInterval(() => {
  if (firsts === total) clearInterval(progress);
  else
    process.stderr.write(
      `watch clients: ${snapshots} snapshots, ${errors} failed, ${retries} retried, ${open} open of ${total}\n`,
    );
}, 15_000);
progress.unref();

process.stdin.resume();
process.stdin.on("end", () => {
  const loopMaxMs = loop.max / 1e6;
  const line = JSON.stringify(
    record
      ? { errors, retries, open, loopMaxMs, streams: receipts }
      : { errors, retries, open, loopMaxMs },
  );
  for (const s of streams) s.close();
  for (const s of sessions) s.destroy();
  process.stdout.write(`${line}\n`, () => process.exit(0));
});
