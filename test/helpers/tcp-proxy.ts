import net from "node:net";

// A TCP proxy on 127.0.0.1 between one client and a server, which can stop forwarding
// and resume: a network partition as a process sees it. pause(): no packet is lost but
// none gets through (no reset, no close: connections stay open, writes are buffered,
// commands wait for answers; new connections are accepted and held). drop(): every
// connection is reset and new ones are refused until resume() (the client reconnects
// and may send its unanswered commands again).

export interface TcpProxy {
  port: number;
  /** Stops forwarding in both directions on every connection, old and new. */
  pause(): void;
  /** Resets every connection and refuses new ones. */
  drop(): void;
  /** Forwards again; what was held back is delivered in order. */
  resume(): void;
  close(): Promise<void>;
}

/**
 * Ties a client connection to its upstream one: each is tracked in `sockets` while open,
 * and a reset or close of either side ends both (the other side sees it closed).
 */
export function pairSockets(
  client: net.Socket,
  upstream: net.Socket,
  sockets: Set<net.Socket>,
): void {
  for (const s of [client, upstream]) {
    sockets.add(s);
    s.on("close", () => sockets.delete(s));
    s.on("error", () => {
      client.destroy();
      upstream.destroy();
    });
  }
  client.on("close", () => upstream.destroy());
  upstream.on("close", () => client.destroy());
}

export async function startTcpProxy(target: { host?: string; port: number }): Promise<TcpProxy> {
  const host = target.host ?? "127.0.0.1";
  const sockets = new Set<net.Socket>();
  let paused = false;
  let refusing = false;

  const server = net.createServer((client) => {
    if (refusing) {
      client.resetAndDestroy();
      return;
    }
    const upstream = net.connect(target.port, host);
    pairSockets(client, upstream, sockets);
    // Piped by hand: stream.pipe would resume a paused source as soon as it is piped.
    client.on("data", (d: Buffer) => upstream.write(d));
    upstream.on("data", (d: Buffer) => client.write(d));
    if (paused) {
      client.pause();
      upstream.pause();
    }
  });
  await new Promise<void>((ok, fail) => {
    server.once("error", fail);
    server.listen(0, "127.0.0.1", () => ok());
  });
  return {
    port: (server.address() as net.AddressInfo).port,
    pause() {
      paused = true;
      for (const s of sockets) s.pause();
    },
    drop() {
      refusing = true;
      for (const s of sockets) s.resetAndDestroy();
    },
    resume() {
      paused = false;
      refusing = false;
      for (const s of sockets) s.resume();
    },
    async close() {
      for (const s of sockets) s.destroy();
      await new Promise<void>((ok) => server.close(() => ok()));
    },
  };
}
