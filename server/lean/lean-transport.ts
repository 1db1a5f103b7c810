import { once } from "node:events";
import type { IncomingHttpHeaders, IncomingMessage, ServerResponse } from "node:http";
import type { Http2ServerRequest, Http2ServerResponse } from "node:http2";
import type { DescMessage, MessageShape } from "@bufbuild/protobuf";
import { MethodOptions_IdempotencyLevel } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import { type Compression, compressedFlag } from "@connectrpc/connect/protocol";
import {
  codeToHttpStatus,
  codeToString,
  endStreamFlag,
  endStreamToJson,
  errorToJsonBytes,
} from "@connectrpc/connect/protocol-connect";
import { setTrailerStatus } from "@connectrpc/connect/protocol-grpc";
import { trailerFlag, trailerSerialize } from "@connectrpc/connect/protocol-grpc-web";
import type { Logger } from "pino";
import type { Owner } from "../auth.js";
import type { RpcCall, RpcRow, StreamRow, UnaryRow } from "../rpc/download-rpcs.js";
import { rpcFailure } from "../rpc/errors.js";
import type { Answer, Reply } from "../rpc/presenter.js";
import { recordOutcome } from "../rpc-log.js";
import { envelope, httpChunk } from "../wire/envelope.js";
import {
  BodyCollector,
  COMPRESS_MIN_BYTES,
  negotiate,
  PROTOCOLS,
  type Protocol,
  protocolOf,
  queryMessage,
  readMessage,
} from "../wire/request-reader.js";
import { STREAM_HEADERS } from "../wire/stream-headers.js";

// The second way in: the RPC table (rpc/download-rpcs.ts) served straight on Node's
// request and response, without connect-node's per-call machinery (abort signals and
// their DOMExceptions, header objects, async-iterable pipelines, interceptor chain),
// which costs more than a poll itself. Each protocol's framing is written once below:
// Connect unary and GET answer bare, Connect streaming, gRPC and gRPC-Web in envelopes
// ending with their own kind of status. Requests are read by the same code that guards
// connect-node's handlers (wire/request-reader.ts), so both ways answer alike;
// test/lean-differential.test.ts proves it. Anything this file does not serve (gRPC over
// HTTP/1.1, unknown compressions, other services) is left to connect-node.

type NodeRequest = IncomingMessage | Http2ServerRequest;
type NodeResponse = ServerResponse | Http2ServerResponse;

/** Returns true when it has taken the request; false leaves it to connect-node. */
export type LeanTransport = (req: NodeRequest, res: NodeResponse) => boolean;

export interface LeanTransportOptions {
  rows: readonly RpcRow[];
  /** The same bearer-token check as connect-node's auth interceptor (auth.ts). */
  authenticate(headers: IncomingHttpHeaders): Owner;
  /** Largest request message accepted, as connect-node's readMaxBytes. */
  readMaxBytes: number;
  log: Logger;
}

interface Route {
  row: RpcRow;
  procedure: string;
  streaming: boolean;
  /** Connect GET is allowed for NO_SIDE_EFFECTS methods only. */
  get: boolean;
}

interface Wire {
  protocol: Protocol;
  binary: boolean;
  request: Compression | null;
  response: Compression | null;
  /** Connect GET: the query holding the message. */
  params?: URLSearchParams;
}

const CONNECT = PROTOCOLS[0] as Protocol;
/** abort() without a reason builds a DOMException with a stack trace; nothing reads it. */
const STREAM_OVER = new Error("stream over");
/** The most an early answer waits to read over HTTP/2 (see afterBody); connect-node drains as much over HTTP/1.1. */
const DRAIN_BYTES = 256 * 1024;
const DRAIN_MS = 2_000;

/**
 * The response as HTTP/1.1 types it. Node's HTTP/2 compatibility response takes the same
 * writeHead/write/end calls, but TypeScript cannot call a union of their overloads.
 */
function out(res: NodeResponse): ServerResponse {
  return res as ServerResponse;
}

/** As Headers.get reads it for connect-node: repeated values joined by ", ". */
function header(req: NodeRequest, name: string): string | null {
  const value = req.headers[name];
  if (value === undefined) return null;
  return Array.isArray(value) ? value.join(", ") : value;
}

export function createLeanTransport(opts: LeanTransportOptions): LeanTransport {
  const routes = new Map<string, Route>();
  const services = new Set<string>();
  for (const row of opts.rows) {
    const prefix = `/${row.method.parent.typeName}/`;
    services.add(prefix);
    routes.set(`${prefix}${row.method.name}`, {
      row,
      procedure: `${prefix}${row.method.name}`,
      streaming: row.method.methodKind === "server_streaming",
      get: row.method.idempotency === MethodOptions_IdempotencyLevel.NO_SIDE_EFFECTS,
    });
  }

  return (req, res) => {
    const url = req.url ?? "";
    const q = url.indexOf("?");
    const path = q === -1 ? url : url.slice(0, q);
    const route = routes.get(path);
    if (route === undefined) {
      // An unknown method of our service: connect-node's fallback answers 404 at once.
      const slash = path.lastIndexOf("/");
      if (slash <= 0 || !services.has(path.slice(0, slash + 1))) return false;
      refuse(req, res, 404, "unimplemented");
      return true;
    }
    const wire = negotiateWire(req, route, q === -1 ? undefined : url.slice(q + 1));
    if (wire === 405) refuse(req, res, 405, "method_not_allowed");
    else if (wire === 415) refuse(req, res, 415, "unsupported_media_type");
    else if (wire === undefined) return false;
    else void serve(req, res, route, wire, opts);
    return true;
  };
}

/** The protocol, encoding and compressions, as connect-node negotiates them; a number is its refusal. */
function negotiateWire(
  req: NodeRequest,
  route: Route,
  query: string | undefined,
): Wire | 405 | 415 | undefined {
  const type = header(req, "content-type") ?? "";
  const get = (name: string) => header(req, name);
  if (req.method === "GET") {
    if (!route.get) return 405;
    if (type !== "" && CONNECT.binary(type, false) === undefined) return 415;
    const params = new URLSearchParams(query);
    const encoding = params.get("encoding");
    if (encoding !== "json" && encoding !== "proto") return 415;
    const requested = params.get("compression");
    if (requested !== null && requested !== "identity") return undefined;
    const { response } = negotiate(CONNECT, get);
    return { protocol: CONNECT, binary: encoding === "proto", request: null, response, params };
  }
  if (req.method !== "POST") return 405;
  const found = protocolOf(type, route.streaming);
  if (found === undefined || found.text) return 415;
  if (found.protocol.name === "grpc" && req.httpVersionMajor !== 2) return undefined;
  const { request, response, error } = negotiate(found.protocol, get);
  if (error !== undefined) return undefined;
  return { protocol: found.protocol, binary: found.binary, request, response };
}

/**
 * Over HTTP/2, an answer given while the caller is still sending its body is followed
 * by RST_STREAM, and Debian 12's curl then reports "(92) Stream error in the HTTP/2
 * framing layer" instead of the answer. Read (and drop) a small body first; a large or
 * stalled one is cut as before. HTTP/1.1 needs nothing: Node reads what is left.
 */
function afterBody(req: NodeRequest, then: () => void | Promise<void>): void | Promise<void> {
  if (req.httpVersionMajor !== 2 || req.readableEnded) return then();
  return new Promise((resolve) => drainThen(req, () => resolve(then())));
}

function drainThen(req: NodeRequest, then: () => void): void {
  let size = 0;
  let over = false;
  const done = () => {
    if (over) return;
    over = true;
    clearTimeout(timer);
    req.off("data", onData);
    req.off("end", done);
    req.off("error", done);
    req.off("close", done);
    then();
  };
  const onData = (chunk: Buffer) => {
    size += chunk.length;
    if (size > DRAIN_BYTES) done();
  };
  const timer = setTimeout(done, DRAIN_MS);
  req.on("data", onData);
  req.once("end", done);
  req.once("error", done);
  req.once("close", done);
}

/** 404, 405, 415: answered before any RPC, with no body, as connect-node answers them. */
function refuse(req: NodeRequest, res: NodeResponse, status: number, code: string): void {
  recordOutcome(req, code);
  void afterBody(req, () => {
    if (res.writableEnded || res.destroyed) return;
    out(res).writeHead(status);
    out(res).end();
  });
}

function readBody(req: NodeRequest, collector: BodyCollector): Promise<Uint8Array> {
  return new Promise((resolve, reject) => {
    const settle = (fn: () => void) => {
      req.off("data", onData);
      req.off("end", onEnd);
      req.off("error", onError);
      try {
        fn();
      } catch (err) {
        reject(err);
      }
    };
    const onData = (chunk: Buffer) => {
      try {
        collector.push(chunk);
      } catch (err) {
        settle(() => reject(err));
      }
    };
    const onEnd = () => settle(() => resolve(collector.finish()));
    const onError = () =>
      settle(() => reject(new ConnectError("request body could not be read", Code.Canceled)));
    req.on("data", onData);
    req.once("end", onEnd);
    req.once("error", onError);
  });
}

async function readInput(
  req: NodeRequest,
  route: Route,
  wire: Wire,
  readMaxBytes: number,
): Promise<MessageShape<DescMessage>> {
  const { row, streaming } = route;
  const opts = { streaming, plain: row.plain };
  const reading = { protocol: wire.protocol, binary: wire.binary, compression: wire.request };
  if (wire.params !== undefined)
    return readMessage(row.method.input, queryMessage(wire.params), reading, readMaxBytes, opts);
  const collector = new BodyCollector(
    wire.protocol.enveloped,
    readMaxBytes,
    header(req, "content-length"),
  );
  return readMessage(row.method.input, await readBody(req, collector), reading, readMaxBytes, opts);
}

function deadlineExceeded(): ConnectError {
  return new ConnectError("the operation timed out", Code.DeadlineExceeded);
}

/**
 * `work`, or DEADLINE_EXCEEDED once `ms` have passed. The deadline ends the call, not the
 * work: what it was doing (an admission, say) carries on, and a retry finds its outcome.
 */
async function withDeadline<T>(work: Promise<T>, ms: number | undefined): Promise<T> {
  if (ms === undefined) return work;
  work.catch(() => undefined);
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([
      work,
      new Promise<never>((_resolve, reject) => {
        timer = setTimeout(() => reject(deadlineExceeded()), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/** A payload as it goes out: compressed when the caller accepts it and it is large, as connect-node does. */
function framed(flags: number, payload: Uint8Array, wire: Wire): Buffer | Promise<Buffer> {
  const c = wire.response;
  if (c !== null && payload.byteLength >= COMPRESS_MIN_BYTES)
    return c.compress(payload).then((packed) => envelope(flags | compressedFlag, packed));
  return envelope(flags, payload);
}

/** An answer's message as it goes out: its own kept envelope unless it is compressed. */
function framedReply(reply: Reply<DescMessage>, wire: Wire): Buffer | Promise<Buffer> {
  const payload = reply.bytes(wire.binary);
  if (wire.response !== null && payload.byteLength >= COMPRESS_MIN_BYTES)
    return framed(0, payload, wire);
  return reply.enveloped(wire.binary);
}

/** The ends of a call that went well, made once: every OK answer ends the same way. */
const GRPC_OK = { "grpc-status": "0" } as const;
const GRPC_WEB_OK = envelope(trailerFlag, Buffer.from("grpc-status: 0\r\n"));
const CONNECT_OK = envelope(endStreamFlag, Buffer.from("{}"));

/** The end of an enveloped call: the trailers frame, or (gRPC) the trailers themselves. */
function endOf(
  name: Protocol["name"],
  err: ConnectError | undefined,
  wire: Wire,
): Record<string, string> | Buffer | Promise<Buffer> {
  if (name === "grpc") {
    if (err === undefined) return GRPC_OK;
    const trailers: Record<string, string> = {};
    setTrailerStatus(new Headers(), err).forEach((value, key) => {
      trailers[key] = value;
    });
    return trailers;
  }
  if (err === undefined) return name === "grpc-web" ? GRPC_WEB_OK : CONNECT_OK;
  return name === "grpc-web"
    ? framed(trailerFlag, trailerSerialize(setTrailerStatus(new Headers(), err)), wire)
    : framed(
        endStreamFlag,
        Buffer.from(JSON.stringify(endStreamToJson(new Headers(), err, {}))),
        wire,
      );
}

/** The answers of one call, in its protocol's framing. */
class Responder {
  private headersSent = false;
  /** Set once a stream's handler runs: its answer then carries STREAM_HEADERS, as connect-node's does. */
  streaming = false;
  private corked: { uncork(): void } | undefined;
  private waitOn: NodeJS.EventEmitter;
  private readonly h1: ServerResponse | undefined;

  constructor(
    private readonly req: NodeRequest,
    private readonly res: NodeResponse,
    private readonly wire: Wire,
  ) {
    this.waitOn = res;
    this.h1 = req.httpVersionMajor === 1 ? out(res) : undefined;
  }

  private get gone(): boolean {
    return this.res.writableEnded || this.res.destroyed;
  }

  /** A unary answer: bare (Connect, with its length and the headers it asks for) or one envelope and the end. */
  unary(answer: Answer<DescMessage>): void | Promise<void> {
    const { protocol, binary, params } = this.wire;
    if (answer.notModified === true && params !== undefined) {
      // The caller's copy is current: headers only (RFC 9110 15.4.5), nothing encoded.
      if (this.gone) return;
      out(this.res).writeHead(304, { ...answer.header });
      out(this.res).end();
      return;
    }
    const bytes = answer.reply.bytes(binary);
    if (!protocol.enveloped) {
      // Response headers an RPC asks for are for GET answers only (cache-control).
      return this.bare(
        200,
        protocol.contentType(binary),
        bytes,
        params !== undefined ? answer.header : undefined,
      );
    }
    const frame = framed(0, bytes, this.wire);
    if (frame instanceof Promise) return frame.then((f) => this.finish(f, undefined));
    return this.finish(frame, undefined);
  }

  private bare(
    status: number,
    type: string,
    body: Uint8Array,
    extra: Readonly<Record<string, string>> | undefined,
  ): void | Promise<void> {
    const headers: Record<string, string> = { "content-type": type, ...extra };
    const c = this.wire.response;
    if (c !== null && body.byteLength >= COMPRESS_MIN_BYTES) {
      headers["content-encoding"] = c.name;
      return c.compress(body).then((packed) => this.send(status, headers, packed));
    }
    this.send(status, headers, body);
  }

  private send(status: number, headers: Record<string, string>, body: Uint8Array): void {
    headers["content-length"] = String(body.byteLength);
    if (this.gone) return;
    out(this.res).writeHead(status, headers);
    out(this.res).end(body);
  }

  private head(): void {
    if (this.headersSent) return;
    this.headersSent = true;
    const { protocol, binary, response } = this.wire;
    const headers: Record<string, string> = { "content-type": protocol.contentType(binary) };
    if (response !== null) headers[protocol.encodingHeader] = response.name;
    out(this.res).writeHead(200, this.streaming ? { ...headers, ...STREAM_HEADERS } : headers);
  }

  /** Writes one message; false when the caller should wait for `drained()`. */
  async message(reply: Reply<DescMessage>): Promise<boolean> {
    let frame = framedReply(reply, this.wire);
    if (frame instanceof Promise) frame = await frame;
    return this.write(frame, reply);
  }

  /**
   * message() in the same turn when it can be (no compression): undefined once written,
   * or a promise to wait for (the compressed frame, or a full socket draining).
   */
  push(reply: Reply<DescMessage>, signal: AbortSignal): undefined | Promise<unknown> {
    const frame = framedReply(reply, this.wire);
    if (frame instanceof Promise) {
      return frame.then((f) => this.write(f, reply) || reply.last || this.drained(signal));
    }
    return this.write(frame, reply) || reply.last ? undefined : this.drained(signal);
  }

  /** `frame` is the reply's message as it goes out (its kept envelope unless compressed). */
  private write(frame: Buffer, reply: Reply<DescMessage>): boolean {
    if (this.gone) return true;
    const socket = this.h1?.socket;
    if (reply.last && socket != null && this.headersSent) {
      // The stream ends right after: the last message and the end leave in one write.
      this.corked = socket;
      socket.cork();
    }
    if (this.headersSent && this.h1?.chunkedEncoding === true && socket != null) {
      this.waitOn = socket;
      // A shared answer is also chunk-framed once, for every HTTP/1.1 stream.
      const { binary } = this.wire;
      return socket.write(
        frame === reply.enveloped(binary) ? reply.chunked(binary) : httpChunk(frame),
      );
    }
    this.head();
    this.waitOn = this.res;
    return out(this.res).write(frame);
  }

  drained(signal: AbortSignal): Promise<unknown> {
    return once(this.waitOn, "drain", { signal }).catch(() => undefined);
  }

  /** Ends the call: a bare error, or the protocol's end of stream with its status. */
  end(err: ConnectError | undefined): void | Promise<void> {
    if (!this.wire.protocol.enveloped) {
      const error = err ?? new ConnectError("internal error", Code.Internal);
      const headers: Record<string, string> = {};
      // Metadata the error carries (Retry-After, cache-control) are headers, as connect-node sends them.
      error.metadata.forEach((value, name) => {
        headers[name] = value;
      });
      const body = errorToJsonBytes(error, {});
      return afterBody(this.req, () =>
        this.bare(codeToHttpStatus(error.code), "application/json", body, headers),
      );
    }
    return afterBody(this.req, () => this.finish(undefined, err));
  }

  /** The last message (if any) and the end of the call, in as few writes as possible. */
  private finish(last: Buffer | undefined, err: ConnectError | undefined): void | Promise<void> {
    const end = endOf(this.wire.protocol.name, err, this.wire);
    if (end instanceof Promise) return end.then((frame) => this.close(last, frame));
    return this.close(last, end);
  }

  private close(last: Buffer | undefined, end: Record<string, string> | Buffer): void {
    try {
      if (this.gone) return;
      this.head();
      const res = out(this.res);
      if (Buffer.isBuffer(end)) {
        if (last !== undefined) res.write(last);
        res.end(end);
        return;
      }
      res.addTrailers(end);
      if (last === undefined) res.end();
      else res.end(last);
    } finally {
      this.corked?.uncork();
      this.corked = undefined;
    }
  }
}

/** An RPC's view of a call on Node's request: one object per call, no closures. */
class NodeCall implements RpcCall {
  private abort: AbortController | undefined;

  constructor(
    readonly owner: Owner,
    private readonly req: NodeRequest,
    private readonly given: AbortSignal | undefined,
    readonly get: boolean,
    private readonly res?: NodeResponse,
    readonly deadline?: number,
  ) {}

  /** A GET answer is this transport's own: it answers 304 itself. */
  get notModifiedOk(): boolean {
    return this.get;
  }

  /**
   * A stream's own signal; for a unary call one made on first use (a long-poll waits
   * and must stop when its caller goes away): most calls never ask, and an
   * AbortController per call costs.
   */
  get signal(): AbortSignal {
    if (this.given !== undefined) return this.given;
    if (this.abort === undefined) {
      const abort = new AbortController();
      this.abort = abort;
      const res = this.res;
      if (res === undefined || res.writableEnded || res.destroyed) abort.abort(STREAM_OVER);
      else res.once("close", () => abort.abort(STREAM_OVER));
    }
    return this.abort.signal;
  }

  header(name: string): string | null {
    return header(this.req, name);
  }
}

/** A unary call: read, authenticate (where connect-node's interceptor does), run. */
async function answerUnary(
  req: NodeRequest,
  res: NodeResponse,
  route: Route,
  wire: Wire,
  opts: LeanTransportOptions,
  who: { owner?: string },
  timeoutMs: number | undefined,
): Promise<Answer<DescMessage>> {
  const input = await readInput(req, route, wire, opts.readMaxBytes);
  who.owner = opts.authenticate(req.headers);
  const call = new NodeCall(
    who.owner,
    req,
    undefined,
    wire.params !== undefined,
    res,
    timeoutMs === undefined ? undefined : Date.now() + timeoutMs,
  );
  return (route.row as UnaryRow).run(call, input);
}

async function serve(
  req: NodeRequest,
  res: NodeResponse,
  route: Route,
  wire: Wire,
  opts: LeanTransportOptions,
): Promise<void> {
  const get = wire.params !== undefined;
  const responder = new Responder(req, res, wire);
  // Who the call acts for, once authenticated: for the log line, whatever happens next.
  const who: { owner?: string } = {};
  const timeout = wire.protocol.parseTimeout(header(req, wire.protocol.timeoutHeader));
  // A stream ends when the caller goes away or its deadline passes; a unary call only
  // races its deadline.
  const abort = route.streaming ? new AbortController() : undefined;
  const onClose = abort === undefined ? undefined : () => abort.abort(STREAM_OVER);
  let timedOut = false;
  let deadline: NodeJS.Timeout | undefined;
  try {
    if (abort === undefined) {
      if (timeout.error !== undefined) throw timeout.error;
      const answer = await withDeadline(
        answerUnary(req, res, route, wire, opts, who, timeout.timeoutMs),
        timeout.timeoutMs,
      );
      recordOutcome(req, "ok", who.owner);
      await responder.unary(answer);
      return;
    }
    res.once("close", onClose as () => void);
    if (timeout.timeoutMs !== undefined) {
      deadline = setTimeout(() => {
        timedOut = true;
        abort.abort(STREAM_OVER);
      }, timeout.timeoutMs);
    }
    // connect-node runs a stream's interceptors (auth) before it reads the request, and
    // a unary call's after (answerUnary): a bad token and a bad body then get the same
    // answer on both ways in.
    who.owner = opts.authenticate(req.headers);
    const call = new NodeCall(who.owner, req, abort.signal, get);
    if (timeout.error !== undefined) throw timeout.error;
    const input = await readInput(req, route, wire, opts.readMaxBytes);
    responder.streaming = true;
    const row = route.row as StreamRow;
    if (row.push !== undefined) {
      // Each message written as it comes, with no async iterator in between.
      await row.push(call, input, (reply) =>
        abort.signal.aborted ? undefined : responder.push(reply, abort.signal),
      );
    } else {
      for await (const reply of row.run(call, input)) {
        if (abort.signal.aborted) break;
        // A caller that reads slowly is sent nothing more until it catches up; meanwhile
        // the hub keeps only the latest record of each state for it.
        if (!(await responder.message(reply)) && !reply.last) await responder.drained(abort.signal);
      }
    }
    if (abort.signal.aborted && !timedOut) {
      recordOutcome(req, "canceled", who.owner);
      return;
    }
    const end = timedOut ? deadlineExceeded() : undefined;
    recordOutcome(req, end === undefined ? "ok" : codeToString(end.code), who.owner);
    await responder.end(end);
  } catch (err) {
    if (abort?.signal.aborted === true && !timedOut) {
      recordOutcome(req, "canceled", who.owner);
      return;
    }
    const error = timedOut ? deadlineExceeded() : rpcFailure(err, opts.log, route.procedure, get);
    recordOutcome(req, codeToString(error.code), who.owner);
    await responder.end(error);
  } finally {
    if (abort !== undefined) {
      clearTimeout(deadline);
      res.off("close", onClose as () => void);
      // Answered or abandoned: release the hub's generator if it is still open.
      abort.abort(STREAM_OVER);
    }
  }
}
