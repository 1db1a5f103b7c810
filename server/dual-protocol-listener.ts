import http from "node:http";
import http2 from "node:http2";
import net from "node:net";
import type { Logger } from "pino";
import type { Http2LimitEvent } from "../core/metrics.js";
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
  /** How often both servers look for connections and streams past those timeouts. */
  connectionsCheckingIntervalMs: number;
  http2: Http2Limits;
  /** Told each time an HTTP/2 limit ends a session or a stream (for /metrics). */
  onHttp2Limit?: (event: Http2LimitEvent) => void;
  log: Logger;
}

/**
 * What keeps one HTTP/2 connection from holding the server: Node's http2 server has
 * none of it by default (no session timeout, no body deadline, 2^32-1 streams, nothing
 * against rapid reset). The request-head deadline (headersTimeoutMs) bounds a new
 * session's wait for its first request, the request deadline (requestTimeoutMs) each
 * stream's body.
 */
export interface Http2Limits {
  /** A session with no open stream is closed with GOAWAY (NO_ERROR) after this. */
  idleTimeoutMs: number;
  /** SETTINGS_MAX_CONCURRENT_STREAMS: streams beyond it are refused by nghttp2. */
  maxConcurrentStreams: number;
  /**
   * Client-reset streams a session may have within RESET_WINDOW_MS while it resets more
   * than it completes (CVE-2023-44487); beyond it: GOAWAY (ENHANCE_YOUR_CALM), closed.
   */
  maxResetsPerWindow: number;
}

/** The window HTTP2_MAX_RESETS_PER_10S counts in. */
export const RESET_WINDOW_MS = 10_000;

/**
 * RFC 9113 §6.8's graceful shutdown. A plain close() announces the last stream the
 * server has seen, so a request already on its way is refused (REFUSED_STREAM), which
 * connect-node's clients report as an error instead of retrying. First a GOAWAY that
 * keeps every stream id acceptable (the client opens no new stream after it), then,
 * one round trip later (a PING, or a second for a client that never answers one), the
 * real close.
 */
function closeGracefully(session: http2.Http2Session): void {
  if (session.closed || session.destroyed) return;
  session.goaway(http2.constants.NGHTTP2_NO_ERROR, 2 ** 31 - 1);
  let done = false;
  const close = () => {
    if (done) return;
    done = true;
    clearTimeout(fallback);
    if (!session.closed && !session.destroyed) session.close();
  };
  const fallback = setTimeout(close, 1_000).unref();
  if (!session.ping(close)) close();
}

/** Per-session bookkeeping for the limits above. */
interface SessionLimits {
  open: number;
  resets: number;
  completed: number;
  windowStart: number;
  /** Head deadline until the first stream, idle deadline afterwards. */
  timer: NodeJS.Timeout;
  sawStream: boolean;
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
  const limits = opts.http2;
  const h2 = http2.createServer(
    { settings: { maxConcurrentStreams: limits.maxConcurrentStreams } },
    serve,
  );
  // Streams whose request body has not ended yet, with the time they opened; a sweep
  // at connectionsCheckingIntervalMs resets those past requestTimeoutMs, as the HTTP/1.1
  // server does for its connections (one interval, not a timer per stream).
  const awaitingBody = new Map<http2.ServerHttp2Stream, number>();
  const cutByUs = new WeakSet<http2.ServerHttp2Stream>();
  const sweep = setInterval(() => {
    const now = Date.now();
    for (const [stream, openedAt] of awaitingBody) {
      if (now - openedAt < opts.requestTimeoutMs) continue;
      awaitingBody.delete(stream);
      if (stream.closed || stream.destroyed || stream.state.remoteClose === 1) continue;
      cutByUs.add(stream);
      opts.onHttp2Limit?.("body_timeout");
      log.debug({ remote: stream.session?.socket?.remoteAddress }, "http2 request body too slow");
      stream.close(http2.constants.NGHTTP2_CANCEL);
    }
  }, opts.connectionsCheckingIntervalMs);
  sweep.unref();

  h2.on("session", (session) => {
    sessions.add(session);
    if (closing) session.close();
    // Before its first request a session gets what an HTTP/1.1 head gets; after that,
    // the idle timeout runs whenever it has no stream open.
    const st: SessionLimits = {
      open: 0,
      resets: 0,
      completed: 0,
      windowStart: Date.now(),
      timer: setTimeout(() => {
        if (st.open > 0 || session.closed || session.destroyed) return;
        opts.onHttp2Limit?.("head_timeout");
        closeGracefully(session);
      }, opts.headersTimeoutMs),
      sawStream: false,
    };
    session.once("close", () => {
      sessions.delete(session);
      clearTimeout(st.timer);
    });
    session.on("stream", (stream) => {
      st.open++;
      if (!st.sawStream) {
        st.sawStream = true;
        clearTimeout(st.timer);
        st.timer = setTimeout(() => {
          if (st.open > 0 || session.closed || session.destroyed) return;
          opts.onHttp2Limit?.("idle_close");
          closeGracefully(session);
        }, limits.idleTimeoutMs);
      }
      if (!stream.endAfterHeaders) awaitingBody.set(stream, Date.now());
      stream.once("close", () => {
        st.open--;
        awaitingBody.delete(stream);
        if (st.open === 0) st.timer.refresh();
        const now = Date.now();
        if (now - st.windowStart >= RESET_WINDOW_MS) {
          st.windowStart = now;
          st.resets = 0;
          st.completed = 0;
        }
        // `aborted`: closed by the client before our answer ended.
        if (!stream.aborted || cutByUs.has(stream)) {
          st.completed++;
          return;
        }
        st.resets++;
        if (
          st.resets > limits.maxResetsPerWindow &&
          st.resets > st.completed &&
          !session.destroyed
        ) {
          log.warn(
            { remote: session.socket?.remoteAddress, resets: st.resets, completed: st.completed },
            "http2 client resets streams faster than it uses them: GOAWAY ENHANCE_YOUR_CALM",
          );
          opts.onHttp2Limit?.("rapid_reset");
          // destroy(undefined, code) would send NO_ERROR: the GOAWAY goes first.
          session.goaway(http2.constants.NGHTTP2_ENHANCE_YOUR_CALM);
          session.destroy();
        }
      });
    });
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
      for (const session of sessions) closeGracefully(session);
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
      clearInterval(sweep);
      awaitingBody.clear();
      await frontClosed;
    },
  };
}
