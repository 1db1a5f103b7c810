import net from "node:net";
import { pairSockets } from "./tcp-proxy.js";

// A TCP proxy on 127.0.0.1 in front of an HTTP server (S3) that breaks transfers the way
// a flaky network does: the n-th connection is cut once `cutAfter[n]` bytes of its
// answer have gone through, and may be held `holdMs[n]` before its request is passed on.
// It counts every byte the server sent through it and keeps each request's head, so a
// test can tell what was fetched twice.

export interface CuttingProxy {
  port: number;
  /** Bytes the server sent through the proxy, all connections together. */
  bytesServed(): number;
  /** The head (request line and headers) of every request passed on, in order. */
  requests(): string[];
  close(): Promise<void>;
}

export async function startCuttingProxy(
  target: { host?: string; port: number },
  plan: { cutAfter?: (number | undefined)[]; holdMs?: (number | undefined)[] } = {},
): Promise<CuttingProxy> {
  const host = target.host ?? "127.0.0.1";
  const sockets = new Set<net.Socket>();
  const heads: string[] = [];
  let served = 0;
  let connections = 0;

  const server = net.createServer((client) => {
    const n = connections++;
    const cutAfter = plan.cutAfter?.[n];
    const holdMs = plan.holdMs?.[n] ?? 0;
    const upstream = net.connect(target.port, host);
    pairSockets(client, upstream, sockets);
    let pending = "";
    let held: Buffer[] | undefined = holdMs > 0 ? [] : undefined;
    if (held !== undefined) {
      setTimeout(() => {
        for (const d of held ?? []) upstream.write(d);
        held = undefined;
      }, holdMs);
    }
    client.on("data", (d: Buffer) => {
      // Request heads, for the test to read (bodies of GETs are empty).
      pending += d.toString("latin1");
      for (let end = pending.indexOf("\r\n\r\n"); end >= 0; end = pending.indexOf("\r\n\r\n")) {
        heads.push(pending.slice(0, end));
        pending = pending.slice(end + 4);
      }
      if (held !== undefined) held.push(d);
      else upstream.write(d);
    });
    let sent = 0;
    upstream.on("data", (d: Buffer) => {
      if (cutAfter !== undefined && sent + d.length >= cutAfter) {
        const part = d.subarray(0, Math.max(0, cutAfter - sent));
        sent += part.length;
        served += part.length;
        // The rest of the answer never arrives: the connection ends right after `part`
        // (a FIN mid-answer, not a reset, so every byte counted here did reach the
        // client: a reset would throw away what sat unread in its socket buffer, and
        // those bytes would count as served though never received).
        upstream.pause();
        upstream.destroy();
        client.end(part);
        return;
      }
      sent += d.length;
      served += d.length;
      client.write(d);
    });
  });
  await new Promise<void>((ok, fail) => {
    server.once("error", fail);
    server.listen(0, "127.0.0.1", () => ok());
  });
  return {
    port: (server.address() as net.AddressInfo).port,
    bytesServed: () => served,
    requests: () => [...heads],
    async close() {
      for (const s of sockets) s.destroy();
      await new Promise<void>((ok) => server.close(() => ok()));
    },
  };
}
