import http from "node:http";
import http2 from "node:http2";
import net from "node:net";
import type { Logger } from "pino";
import type { NodeHandler } from "./rpc-log.js";

// One port for HTTP/1.1 and cleartext HTTP/2 (h2c). Node's cleartext
// `http2.createServer({ allowHTTP1 })` does not accept HTTP/1.1, so a plain TCP server
// reads the first bytes of each connection, looks for the HTTP/2 client preface, and
// hands the socket to an `http2` or an `http` server that never listens by itself.

const PREFACE = Buffer.from("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");

export interface DualProtocolOptions {
  /** HTTP/1.1: the whole request head must arrive within this (slow-loris). */
  headersTimeoutMs: number;
  /** HTTP/1.1: the whole request (head and body) must arrive within this. */
  requestTimeoutMs: number;
  /** HTTP/1.1: an idle keep-alive connection is closed after this. */
  keepAliveTimeoutMs: number;
  /** How often the HTTP/1.1 server looks for connections past those timeouts. */
  connectionsCheckingIntervalMs: number;
  log: Logger;
}

export interface DualProtocolListener {
  /** Resolves with the bound port (useful with port 0). */
  listen(port: number, host: string): Promise<number>;
  /** True once close() has begun; handlers may refuse new work. */
  readonly closing: boolean;
  /**
   * Stops accepting, sends HTTP/2 GOAWAY (open streams may finish) and closes HTTP/1.1
   * connections as soon as they are idle. Whatever is still open after `timeoutMs` is
   * destroyed.
   */
  close(timeoutMs: number): Promise<void>;
}

export function createDualProtocolListener(
  handler: NodeHandler,
  opts: DualProtocolOptions,
): DualProtocolListener {
  const log = opts.log;
  let closing = false;
  const sockets = new Set<net.Socket>();
  const sessions = new Set<http2.ServerHttp2Session>();

  const serve: NodeHandler = (req, res) => {
    // While draining, tell HTTP/1.1 clients not to reuse the connection.
    if (closing && req.httpVersionMajor === 1 && !res.headersSent)
      res.setHeader("Connection", "close");
    handler(req, res);
  };

  const h1 = http.createServer(
    {
      headersTimeout: opts.headersTimeoutMs,
      requestTimeout: opts.requestTimeoutMs,
      keepAliveTimeout: opts.keepAliveTimeoutMs,
      connectionsCheckingInterval: opts.connectionsCheckingIntervalMs,
      noDelay: true,
    },
    serve,
  );
  const h2 = http2.createServer({}, serve);
  h2.on("session", (session) => {
    sessions.add(session);
    session.once("close", () => sessions.delete(session));
    if (closing) session.close();
  });
  h2.on("sessionError", (err) => log.debug({ err }, "http2 session error"));

  const handOff = (socket: net.Socket, head: Buffer, isHttp2: boolean): void => {
    socket.setTimeout(0);
    socket.pause();
    if (isHttp2) {
      // The http2 session takes over the handle and first reads what is buffered on the
      // socket; resuming the JS stream here would race it for those bytes.
      socket.unshift(head);
      h2.emit("connection", socket);
      return;
    }
    // The http parser consumes the socket's handle directly from now on: bytes put back
    // with unshift() would reach it after newer ones. Feed them through its data listener.
    h1.emit("connection", socket);
    socket.emit("data", head);
    socket.resume();
  };

  const front = net.createServer({ noDelay: true }, (socket) => {
    // A reset before the hand-off would otherwise be an unhandled 'error' event, which
    // kills the process. The listener stays: the servers add their own as well.
    socket.on("error", (err) => log.debug({ err }, "socket error"));
    if (closing) {
      socket.destroy();
      return;
    }
    sockets.add(socket);
    socket.once("close", () => sockets.delete(socket));
    // A client that connects and says nothing (or too little to tell the protocol) is
    // cut like a slow HTTP/1.1 head.
    socket.setTimeout(opts.headersTimeoutMs, () => socket.destroy());
    let head: Buffer | undefined;
    const onData = (chunk: Buffer) => {
      head = head === undefined ? chunk : Buffer.concat([head, chunk]);
      const n = Math.min(head.length, PREFACE.length);
      const maybeHttp2 = head.compare(PREFACE, 0, n, 0, n) === 0;
      // A prefix of the preface could still become either protocol: wait for more.
      if (maybeHttp2 && head.length < PREFACE.length) return;
      socket.off("data", onData);
      handOff(socket, head, maybeHttp2);
    };
    socket.on("data", onData);
  });

  return {
    get closing() {
      return closing;
    },

    listen(port, host) {
      return new Promise((resolve, reject) => {
        front.once("error", reject);
        front.listen(port, host, () => {
          front.off("error", reject);
          // The http server arms its headers/request timeouts (and tracks connections
          // for closeIdleConnections) on 'listening', which it never sees by itself:
          // without this a handed-over socket could hold its head open forever.
          h1.emit("listening");
          const addr = front.address();
          resolve(typeof addr === "object" && addr !== null ? addr.port : port);
        });
      });
    },

    async close(timeoutMs) {
      if (closing) return;
      closing = true;
      const frontClosed = new Promise<void>((resolve) => front.close(() => resolve()));
      for (const session of sessions) session.close();
      h1.closeIdleConnections();
      const deadline = Date.now() + timeoutMs;
      while (sockets.size > 0 && Date.now() < deadline) {
        await new Promise((r) => setTimeout(r, 25));
        h1.closeIdleConnections();
      }
      for (const session of sessions) session.destroy();
      for (const socket of sockets) socket.destroy();
      // Neither inner server listens, so their close() only clears their timers.
      h1.close(() => undefined);
      h2.close(() => undefined);
      await frontClosed;
    },
  };
}
