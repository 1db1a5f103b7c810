import http from "node:http";
import type { AddressInfo, Socket } from "node:net";
import { Readable } from "node:stream";
import { setTimeout as sleep } from "node:timers/promises";
import { sampleStream } from "./samples.js";

// S3 as it behaves over a real network, in front of the embedded S3 server (s3rver) on
// loopback: every request waits a first-byte latency, response bodies are paced per
// connection and in aggregate, and a share of requests misbehave on purpose: 503
// SlowDown, a connection reset before any answer, a body cut off part-way (reset), or a
// body that stops part-way and never continues (a silent stall: the socket stays open).
// It also answers `If-Match` on GET, which s3rver ignores, so a changed object fails
// a resumed read as it would on S3. Draws come from a seeded generator, so a run's
// faults are reproducible. It can also make up source objects of any size from the
// sample generator (GeneratedObjects), for benchmarks and ZIP64 runs that would not fit
// on disk. Tests, benchmarks and `npm start` (S3_PROFILE) use it.
//
// Multipart uploads are followed as S3 keeps them: the fixture answers ListParts and
// AbortMultipartUpload itself (s3rver has neither), and an upload that was aborted or
// completed is gone (NoSuchUpload) for every later part, listing or completion.

export interface S3Behaviour {
  /** Added before the response headers of every request. */
  firstByteMs: number;
  /** Pace of one connection's response bodies; 0 = unpaced. */
  connectionBytesPerSecond: number;
  /** Pace of all response bodies together; 0 = unpaced. */
  aggregateBytesPerSecond: number;
  /** Share of requests answered 503 SlowDown. */
  slowDown: number;
  /** Share of requests whose connection is reset before an answer. */
  reset: number;
  /** Share of GET bodies cut off (connection reset) part-way. */
  cutBody: number;
  /** Share of GET bodies that stop part-way and send nothing more. */
  stall: number;
}

const MB = 1024 * 1024;
const calm = { slowDown: 0, reset: 0, cutBody: 0, stall: 0 };

/** The named profiles; `realistic` is what the benchmarks call real S3. */
export const S3_PROFILES = {
  /** The embedded server as it is: no latency, no pacing, no faults. */
  loopback: { firstByteMs: 0, connectionBytesPerSecond: 0, aggregateBytesPerSecond: 0, ...calm },
  /** 30 ms to the first byte, 40 MiB/s per connection, 80 MiB/s in all. */
  realistic: {
    firstByteMs: 30,
    connectionBytesPerSecond: 40 * MB,
    aggregateBytesPerSecond: 80 * MB,
    ...calm,
  },
  /** `realistic` under load: 5 % SlowDown and 1 % of bodies reset part-way. */
  throttled: {
    firstByteMs: 30,
    connectionBytesPerSecond: 40 * MB,
    aggregateBytesPerSecond: 80 * MB,
    ...calm,
    slowDown: 0.05,
    cutBody: 0.01,
  },
  /** Every fault often, at loopback speed: for tests that want each path taken. */
  hostile: {
    firstByteMs: 5,
    connectionBytesPerSecond: 0,
    aggregateBytesPerSecond: 0,
    slowDown: 0.12,
    reset: 0.06,
    cutBody: 0.08,
    stall: 0.04,
  },
} satisfies Record<string, S3Behaviour>;

export type S3ProfileName = keyof typeof S3_PROFILES;

export function isS3ProfileName(name: string): name is S3ProfileName {
  return Object.hasOwn(S3_PROFILES, name);
}

export interface RealisticS3Stats {
  requests: number;
  slowDowns: number;
  resets: number;
  cutBodies: number;
  stalls: number;
  /** GETs refused with 412 because If-Match named another ETag. */
  preconditionFailed: number;
  /** Response body bytes sent. */
  bytesSent: number;
  /** Body bytes of successful GETs. */
  getBytes: number;
  /** Body bytes of GETs of generated objects (what a job read of its sources). */
  generatedBytes: number;
  /** Requests by `METHOD /path`. */
  byKey: Map<string, number>;
  /** Requests by the session token they were signed with ("" for none). */
  bySessionToken: Map<string, number>;
  /** Most GETs in flight at once. */
  peakConcurrentGets: number;
}

export interface KeyError {
  status: number;
  code: string;
  /** Methods refused; all by default. */
  methods?: string[];
}

export interface RealisticS3 {
  endpoint: string;
  stats: RealisticS3Stats;
  behaviour: S3Behaviour;
  /** Changes the behaviour for the requests that follow (faults: true restores them). */
  set(change: Partial<S3Behaviour>): void;
  /**
   * Answers requests for `path` (/bucket/key) with an S3 error from now on, as S3 does
   * for a forbidden (403 AccessDenied) or archived (403 InvalidObjectState, GET only)
   * object; `undefined` serves it normally again.
   */
  failKey(path: string, error: KeyError | undefined): void;
  /** Turns every fault off (latency and pacing stay) or back on. */
  setEnabled(on: boolean): void;
  close(): Promise<void>;
}

function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Reserves send times: a byte may leave no earlier than its pacer allows. */
class Pacer {
  private next = 0;
  constructor(private readonly bytesPerSecond: number) {}
  reserve(bytes: number, now: number): number {
    if (this.bytesPerSecond <= 0) return now;
    this.next = Math.max(this.next, now) + (bytes / this.bytesPerSecond) * 1000;
    return this.next;
  }
}

const SLICE = 16 * 1024;

function errorXml(code: string, message: string): string {
  return `<?xml version="1.0" encoding="UTF-8"?><Error><Code>${code}</Code><Message>${message}</Message></Error>`;
}

/**
 * Source objects the fixture makes up instead of asking the S3 server: the bytes of the
 * sample generator (local/samples.ts) for a file id, any size, never stored anywhere. A
 * job of 10 GB or of 70,000 files then costs no disk and no seeding.
 */
export interface GeneratedObjects {
  bucket: string;
  /** Key prefix; the rest of the key is the file id. */
  prefix: string;
  /** The object's size, or undefined when the file id is not generated. */
  sizeOf(fileId: number): number | undefined;
}

export async function startRealisticS3(
  target: string,
  behaviour: S3Behaviour | S3ProfileName = "realistic",
  seed = 42,
  generate?: GeneratedObjects,
): Promise<RealisticS3> {
  const upstream = new URL(target);
  const random = mulberry32(seed);
  const b: S3Behaviour = {
    ...(typeof behaviour === "string" ? S3_PROFILES[behaviour] : behaviour),
  };
  const keyErrors = new Map<string, KeyError>();
  let enabled = true;
  const stats: RealisticS3Stats = {
    requests: 0,
    slowDowns: 0,
    resets: 0,
    cutBodies: 0,
    stalls: 0,
    preconditionFailed: 0,
    bytesSent: 0,
    getBytes: 0,
    generatedBytes: 0,
    byKey: new Map(),
    bySessionToken: new Map(),
    peakConcurrentGets: 0,
  };
  let aggregate = new Pacer(b.aggregateBytesPerSecond);
  const perConnection = new WeakMap<Socket, Pacer>();
  const agent = new http.Agent({ keepAlive: true, maxSockets: 256 });
  let getsInFlight = 0;
  const stalled = new Set<http.ServerResponse>();
  /** Multipart uploads by id: their parts (number -> ETag, size), or gone. */
  const uploads = new Map<
    string,
    { parts: Map<number, { etag: string; size: number }>; gone: boolean }
  >();

  function noSuchUpload(res: http.ServerResponse): void {
    res.writeHead(404, { "content-type": "application/xml" });
    res.end(errorXml("NoSuchUpload", "The specified upload does not exist."));
  }

  /** ListParts and AbortMultipartUpload; true when answered here. */
  function multipart(req: http.IncomingMessage, res: http.ServerResponse, path: string): boolean {
    const query = new URLSearchParams((req.url ?? "").split("?")[1] ?? "");
    const uploadId = query.get("uploadId");
    if (uploadId === null) return false;
    const upload = uploads.get(uploadId);
    if (req.method === "DELETE") {
      req.resume();
      if (upload !== undefined) upload.gone = true;
      res.writeHead(204);
      res.end();
      return true;
    }
    if (req.method === "GET") {
      req.resume();
      if (upload === undefined || upload.gone) {
        noSuchUpload(res);
        return true;
      }
      const slash = path.indexOf("/", 1);
      const parts = [...upload.parts.entries()]
        .sort((a, b) => a[0] - b[0])
        .map(
          ([n, p]) =>
            `<Part><PartNumber>${n}</PartNumber><ETag>${p.etag.replace(/"/g, "&quot;")}</ETag><Size>${p.size}</Size></Part>`,
        )
        .join("");
      res.writeHead(200, { "content-type": "application/xml" });
      res.end(
        `<?xml version="1.0" encoding="UTF-8"?><ListPartsResult><Bucket>${path.slice(1, slash)}</Bucket><Key>${path.slice(slash + 1)}</Key><UploadId>${uploadId}</UploadId><IsTruncated>false</IsTruncated>${parts}</ListPartsResult>`,
      );
      return true;
    }
    if (upload?.gone === true) {
      req.resume();
      req.on("end", () => noSuchUpload(res));
      return true;
    }
    return false;
  }

  /** Notes what the S3 server behind answered to a multipart call. */
  function follow(
    req: http.IncomingMessage,
    status: number,
    headers: http.IncomingHttpHeaders,
    body?: Buffer,
  ): void {
    const query = new URLSearchParams((req.url ?? "").split("?")[1] ?? "");
    const uploadId = query.get("uploadId");
    if (status >= 300) return;
    if (req.method === "POST" && query.has("uploads") && body !== undefined) {
      const id = /<UploadId>([^<]+)<\/UploadId>/.exec(body.toString())?.[1];
      if (id !== undefined) uploads.set(id, { parts: new Map(), gone: false });
    } else if (req.method === "PUT" && uploadId !== null) {
      let upload = uploads.get(uploadId);
      if (upload === undefined) {
        upload = { parts: new Map(), gone: false };
        uploads.set(uploadId, upload);
      }
      upload.parts.set(Number(query.get("partNumber")), {
        etag: String(headers.etag ?? ""),
        size: Number(req.headers["content-length"] ?? 0),
      });
    } else if (req.method === "POST" && uploadId !== null) {
      const upload = uploads.get(uploadId);
      if (upload !== undefined) upload.gone = true;
    }
  }

  const share = (rate: number) => enabled && rate > 0 && random() < rate;

  /** HEAD or GET of a generated object (see `generate`), or undefined for any other. */
  function generated(
    method: string,
    path: string,
    range: string | undefined,
  ): { status: number; headers: http.OutgoingHttpHeaders; body: Readable } | undefined {
    if (generate === undefined || (method !== "GET" && method !== "HEAD")) return undefined;
    const prefix = `/${generate.bucket}/${generate.prefix}`;
    if (!path.startsWith(prefix)) return undefined;
    const fileId = Number(path.slice(prefix.length));
    const size = Number.isSafeInteger(fileId) ? generate.sizeOf(fileId) : undefined;
    if (size === undefined) return undefined;
    const m = range === undefined ? null : /^bytes=(\d+)-(\d*)$/.exec(range);
    const start = m !== null ? Number(m[1]) : 0;
    const end = m !== null && m[2] !== "" ? Math.min(Number(m[2]), size - 1) : size - 1;
    const headers: http.OutgoingHttpHeaders = {
      etag: `"generated-${fileId}-${size}"`,
      "last-modified": new Date(0).toUTCString(),
      "content-type": "application/octet-stream",
      "accept-ranges": "bytes",
      "x-amz-meta-filename": `generated-${fileId}.bin`,
      "content-length": String(m !== null ? end - start + 1 : size),
      ...(m !== null ? { "content-range": `bytes ${start}-${end}/${size}` } : {}),
    };
    const body =
      method === "HEAD" || size === 0 ? Readable.from([]) : sampleStream(fileId, end + 1, start);
    return { status: m !== null ? 206 : 200, headers, body };
  }

  /** Writes `chunk` in slices at the pace both pacers allow; false once the client is gone. */
  async function paced(res: http.ServerResponse, pacer: Pacer, chunk: Buffer): Promise<boolean> {
    for (let at = 0; at < chunk.length; at += SLICE) {
      const slice = chunk.subarray(at, at + SLICE);
      const now = performance.now();
      const due = Math.max(pacer.reserve(slice.length, now), aggregate.reserve(slice.length, now));
      if (due - now >= 1) await sleep(due - now);
      if (res.destroyed) return false;
      stats.bytesSent += slice.length;
      if (!res.write(slice)) {
        await new Promise<void>((ok) => {
          const done = () => {
            res.off("drain", done);
            res.off("close", done);
            ok();
          };
          res.on("drain", done);
          res.on("close", done);
        });
        if (res.destroyed) return false;
      }
    }
    return true;
  }

  const server = http.createServer(async (req, res) => {
    stats.requests += 1;
    const path = (req.url ?? "").split("?", 1)[0] ?? "";
    const key = `${req.method} ${path}`;
    stats.byKey.set(key, (stats.byKey.get(key) ?? 0) + 1);
    const token = String(
      req.headers["x-amz-security-token"] ??
        new URLSearchParams((req.url ?? "").split("?")[1] ?? "").get("X-Amz-Security-Token") ??
        "",
    );
    stats.bySessionToken.set(token, (stats.bySessionToken.get(token) ?? 0) + 1);
    const isGet = req.method === "GET" && !(req.url ?? "").includes("uploadId=");
    if (multipart(req, res, path)) return;
    const keyError = keyErrors.get(path);
    if (keyError !== undefined && (keyError.methods ?? [req.method]).includes(req.method ?? "")) {
      req.resume();
      req.on("end", () => {
        res.writeHead(keyError.status, { "content-type": "application/xml" });
        res.end(req.method === "HEAD" ? undefined : errorXml(keyError.code, keyError.code));
      });
      return;
    }
    // One draw decides a request's fate, so rates add up as documented.
    if (share(b.reset)) {
      stats.resets += 1;
      req.socket.destroy();
      return;
    }
    if (share(b.slowDown)) {
      stats.slowDowns += 1;
      // Read the body first, as S3 does, so the client is not cut off mid-upload.
      req.resume();
      req.on("end", () => {
        res.writeHead(503, { "content-type": "application/xml" });
        res.end(errorXml("SlowDown", "Please reduce your request rate."));
      });
      return;
    }
    const cut = isGet && share(b.cutBody);
    const stall = isGet && !cut && share(b.stall);
    if (b.firstByteMs > 0) await sleep(b.firstByteMs);
    if (req.socket.destroyed) return;
    let pacer = perConnection.get(req.socket);
    if (pacer === undefined) {
      pacer = new Pacer(b.connectionBytesPerSecond);
      perConnection.set(req.socket, pacer);
    }
    if (isGet) {
      getsInFlight += 1;
      stats.peakConcurrentGets = Math.max(stats.peakConcurrentGets, getsInFlight);
      res.on("close", () => {
        getsInFlight -= 1;
      });
    }
    // Where the answer comes from: a generated object, or the S3 server behind.
    let answered = false;
    const answer = (status: number, headers: http.OutgoingHttpHeaders, body: Readable) => {
      answered = true;
      const ifMatch = req.headers["if-match"];
      if (isGet && ifMatch !== undefined && status < 300 && headers.etag !== ifMatch) {
        stats.preconditionFailed += 1;
        body.destroy();
        res.writeHead(412, { "content-type": "application/xml" });
        res.end(
          errorXml(
            "PreconditionFailed",
            "At least one of the pre-conditions you specified did not hold",
          ),
        );
        return;
      }
      res.writeHead(status, headers);
      const length = Number(headers["content-length"] ?? 0);
      // Where a faulty body stops: somewhere in its middle, at least one byte in.
      const stopAt = cut || stall ? Math.max(1, Math.floor(length * (0.1 + random() * 0.8))) : -1;
      let sent = 0;
      void (async () => {
        try {
          for await (const chunk of body as AsyncIterable<Buffer>) {
            const room = stopAt >= 0 ? stopAt - sent : chunk.length;
            const part = chunk.length > room ? chunk.subarray(0, room) : chunk;
            if (!(await paced(res, pacer, part))) {
              body.destroy();
              return;
            }
            sent += part.length;
            if (isGet && status < 300) {
              stats.getBytes += part.length;
              if (made !== undefined) stats.generatedBytes += part.length;
            }
            if (stopAt >= 0 && sent >= stopAt) {
              body.destroy();
              if (cut) {
                stats.cutBodies += 1;
                res.socket?.destroy();
              } else {
                // Headers and some bytes sent, then nothing: only the client's own
                // deadline ends this.
                stats.stalls += 1;
                stalled.add(res);
                res.on("close", () => stalled.delete(res));
              }
              return;
            }
          }
          res.end();
        } catch {
          res.socket?.destroy();
        }
      })();
    };
    const made = generated(req.method ?? "", path, req.headers.range);
    if (made !== undefined) {
      req.resume();
      answer(made.status, made.headers, made.body);
      return;
    }
    const out = http.request(
      {
        host: upstream.hostname,
        port: upstream.port,
        method: req.method,
        path: req.url,
        headers: req.headers,
        agent,
      },
      (up) => {
        const status = up.statusCode ?? 502;
        if (req.method !== "POST") {
          follow(req, status, up.headers);
          answer(status, up.headers, up);
          return;
        }
        // Small XML answers: read whole, to learn a new upload's id.
        const chunks: Buffer[] = [];
        up.on("data", (c: Buffer) => chunks.push(c));
        up.on("error", () => res.socket?.destroy());
        up.on("end", () => {
          const body = Buffer.concat(chunks);
          follow(req, status, up.headers, body);
          answer(status, up.headers, Readable.from([body]));
        });
      },
    );
    out.on("error", () => {
      if (!answered) res.socket?.destroy();
    });
    req.pipe(out);
  });
  server.on("clientError", (_err, socket) => socket.destroy());
  await new Promise<void>((ok) => server.listen(0, "127.0.0.1", ok));
  return {
    endpoint: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    stats,
    behaviour: b,
    set(change) {
      Object.assign(b, change);
      if (change.aggregateBytesPerSecond !== undefined)
        aggregate = new Pacer(change.aggregateBytesPerSecond);
    },
    failKey(path, error) {
      if (error === undefined) keyErrors.delete(path);
      else keyErrors.set(path, error);
    },
    setEnabled(on) {
      enabled = on;
    },
    async close() {
      for (const res of stalled) res.socket?.destroy();
      server.closeAllConnections();
      await new Promise((ok) => server.close(ok));
      agent.destroy();
    },
  };
}
