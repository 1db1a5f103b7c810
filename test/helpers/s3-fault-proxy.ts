import http from "node:http";
import type { AddressInfo } from "node:net";

// A small HTTP proxy in front of the S3 server that misbehaves on purpose: a share of
// requests gets a 503 SlowDown (as S3 answers under load), a share has its connection
// reset before any answer, and a share of GETs is cut off half-way through the body.
// Draws come from a seeded generator, so a run's faults are reproducible.

export interface FaultRates {
  /** Share of requests answered 503 SlowDown. */
  slowDown: number;
  /** Share of requests whose connection is reset before an answer. */
  reset: number;
  /** Share of GETs cut off after part of the body. */
  cutBody: number;
}

export interface FaultStats {
  requests: number;
  slowDowns: number;
  resets: number;
  cutBodies: number;
  /** Requests by method and whether the key matched `watch`. */
  byKey: Map<string, number>;
}

export interface S3FaultProxy {
  endpoint: string;
  stats: FaultStats;
  /** Turns faults on or off (on at start). */
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

export async function startS3FaultProxy(
  target: string,
  rates: FaultRates,
  seed = 42,
): Promise<S3FaultProxy> {
  const upstream = new URL(target);
  const random = mulberry32(seed);
  const stats: FaultStats = {
    requests: 0,
    slowDowns: 0,
    resets: 0,
    cutBodies: 0,
    byKey: new Map(),
  };
  let enabled = true;
  const agent = new http.Agent({ keepAlive: true });

  const server = http.createServer((req, res) => {
    stats.requests += 1;
    const key = `${req.method} ${(req.url ?? "").split("?", 1)[0]}`;
    stats.byKey.set(key, (stats.byKey.get(key) ?? 0) + 1);
    const draw = enabled ? random() : 1;
    if (draw < rates.reset) {
      stats.resets += 1;
      req.socket.destroy();
      return;
    }
    if (draw < rates.reset + rates.slowDown) {
      stats.slowDowns += 1;
      // Read the body first, as S3 does, so the client is not cut off mid-upload.
      req.resume();
      req.on("end", () => {
        res.writeHead(503, { "content-type": "application/xml" });
        res.end(
          '<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>',
        );
      });
      return;
    }
    const cut = enabled && req.method === "GET" && random() < rates.cutBody;
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
        res.writeHead(up.statusCode ?? 502, up.headers);
        if (!cut) {
          up.pipe(res);
          return;
        }
        stats.cutBodies += 1;
        let sent = 0;
        const limit = Math.max(1, Math.floor(Number(up.headers["content-length"] ?? 2) / 2));
        up.on("data", (chunk: Buffer) => {
          if (sent >= limit) return;
          res.write(chunk.subarray(0, limit - sent));
          sent += chunk.length;
          if (sent >= limit) {
            up.destroy();
            res.socket?.destroy();
          }
        });
        up.on("end", () => res.end());
      },
    );
    out.on("error", () => res.socket?.destroy());
    req.pipe(out);
  });
  server.on("clientError", (_err, socket) => socket.destroy());
  await new Promise<void>((ok) => server.listen(0, "127.0.0.1", ok));
  return {
    endpoint: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    stats,
    setEnabled(on) {
      enabled = on;
    },
    async close() {
      server.closeAllConnections();
      await new Promise((ok) => server.close(ok));
      agent.destroy();
    },
  };
}
