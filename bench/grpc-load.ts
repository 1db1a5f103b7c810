import http2 from "node:http2";
import { percentile } from "./lib.js";

// A small closed-loop gRPC load generator over h2c: `connections` calls in flight at
// all times, spread over one HTTP/2 session per 25 of them (as gRPC clients multiplex),
// each call a pre-encoded unary request. Latency is per call, from request to trailers.

export interface LoadResult {
  requests: number;
  rps: number;
  p50: number;
  p99: number;
  errors: number;
}

export async function grpcLoad(opts: {
  url: string;
  path: string;
  message: Uint8Array;
  connections: number;
  durationMs: number;
}): Promise<LoadResult> {
  const frame = Buffer.alloc(5 + opts.message.length);
  frame.writeUInt32BE(opts.message.length, 1);
  frame.set(opts.message, 5);
  const sessions = Array.from({ length: Math.max(1, Math.ceil(opts.connections / 25)) }, () => http2.connect(opts.url));
  await Promise.all(sessions.map((s) => new Promise((ok, fail) => s.once("connect", ok).once("error", fail))));
  const latencies: number[] = [];
  let errors = 0;
  const deadline = performance.now() + opts.durationMs;

  const call = (session: http2.ClientHttp2Session) =>
    new Promise<void>((resolve) => {
      const started = performance.now();
      const stream = session.request({
        ":method": "POST",
        ":path": opts.path,
        "content-type": "application/grpc",
        te: "trailers",
      });
      let ok = false;
      stream.on("trailers", (t) => {
        ok = t["grpc-status"] === "0";
      });
      stream.on("data", () => undefined);
      stream.on("close", () => {
        if (ok) latencies.push(performance.now() - started);
        else errors++;
        resolve();
      });
      stream.on("error", () => undefined);
      stream.end(frame);
    });

  const lanes = Array.from({ length: opts.connections }, async (_, i) => {
    const session = sessions[i % sessions.length] as http2.ClientHttp2Session;
    while (performance.now() < deadline) await call(session);
  });
  const started = performance.now();
  await Promise.all(lanes);
  const seconds = (performance.now() - started) / 1000;
  for (const s of sessions) s.close();
  return {
    requests: latencies.length,
    rps: latencies.length / seconds,
    p50: percentile(latencies, 50),
    p99: percentile(latencies, 99),
    errors,
  };
}
