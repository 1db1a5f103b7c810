import type { IncomingHttpHeaders, IncomingMessage, ServerResponse } from "node:http";
import type { Http2ServerRequest, Http2ServerResponse } from "node:http2";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  codeToHttpStatus,
  codeToString,
  endStreamFlag,
  errorToJsonBytes,
  parseTimeout,
} from "@connectrpc/connect/protocol-connect";
import type { Logger } from "pino";
import type { Initiated, InitiateInput } from "../core/job-service.js";
import { type JobRecord, OverloadedError } from "../core/jobs.js";
import { toConnectError } from "./errors.js";
import { rpcContextValues, rpcOutcomeKey } from "./rpc-log.js";

// The pieces of the Connect protocol (https://connectrpc.com/docs/protocol) that the
// lean handlers in fast-status.ts and fast-watch.ts share: envelopes, error bodies,
// timeouts, bounded body reads, and the error mapping and RPC outcome that the
// interceptor gives connect-node calls. connect-es's own helpers are used wherever they
// exist (status codes, error JSON, timeout parsing), so both paths answer alike.

export type NodeRequest = IncomingMessage | Http2ServerRequest;
export type NodeResponse = ServerResponse | Http2ServerResponse;

/**
 * The response as HTTP/1.1 types it. Node's HTTP/2 compatibility response takes the same
 * writeHead/write/end calls, but TypeScript cannot call a union of their overloads.
 */
export function out(res: NodeResponse): ServerResponse {
  return res as ServerResponse;
}

/** What the fast handlers need from the rest of the server; passed in by server.ts. */
export interface FastPathDeps {
  /**
   * Who the call acts for. The hook for bearer-token auth: it throws ConnectError
   * UNAUTHENTICATED (or any Connect error) to refuse the call before anything is read.
   */
  authenticate(headers: IncomingHttpHeaders): string;
  /** The job as `owner` may see it; throws the domain errors JobService.get throws. */
  getJob(owner: string, rawJobId: string): Promise<JobRecord>;
  /** JobService.initiate for `owner`: validation, admission, the queue entry. */
  initiate(owner: string, input: InitiateInput): Promise<Initiated>;
  /** WatchHub.watch for `owner`: snapshot, changes, heartbeats, ends after the terminal state. */
  watch(
    owner: string,
    rawJobId: string,
    afterVersion: number,
    signal: AbortSignal,
  ): AsyncIterable<
    | { job: JobRecord; heartbeat?: undefined }
    | { heartbeat: { time: number; version: number }; job?: undefined }
  >;
  /** Presigns a completed job's result for the public endpoint (core/storage.ts). */
  presigner: {
    presignResult(key: string, fileName: string): Promise<{ url: string; expiresAt: number }>;
  };
  /** Largest request message accepted, as connect-node's readMaxBytes. */
  readMaxBytes: number;
  /** Lifetime of a presigned URL, for the Cache-Control of a completed job. */
  presignExpirySeconds: number;
  log: Logger;
}

/** A Connect error for anything a handler threw: domain errors mapped, the rest logged. */
export function asConnectError(err: unknown, log: Logger, procedure: string): ConnectError {
  const mapped = toConnectError(err);
  if (mapped === undefined) {
    log.error({ rpc: procedure, err }, "unexpected error");
    return new ConnectError("internal error", Code.Internal, undefined, undefined, err);
  }
  // As in rpc-interceptor.ts: a ConnectError thrown on purpose (the shutdown) is not
  // news, and neither is a full queue turning callers away.
  if (mapped.code === Code.Unavailable && mapped !== err && !(err instanceof OverloadedError)) {
    log.warn({ rpc: procedure, err: mapped.cause }, "backend unavailable");
  }
  return mapped;
}

/** Hands the final code (and the owner, once known) to the RPC log line written by rpc-log.ts. */
export function recordOutcome(req: NodeRequest, code: Code | undefined, owner?: string): void {
  const outcome = rpcContextValues(req).get(rpcOutcomeKey);
  if (outcome === undefined) return;
  outcome.code = code === undefined ? "ok" : codeToString(code);
  if (owner !== undefined) outcome.owner = owner;
}

/**
 * The unary error answer: HTTP status from the code, `{"code","message","details"}` as
 * JSON, and the error's metadata as headers (Retry-After), as connect-node sends them.
 */
export function writeUnaryError(
  res: NodeResponse,
  err: ConnectError,
  extraHeaders?: Record<string, string>,
): void {
  const body = errorToJsonBytes(err, {});
  const headers: Record<string, string> = {};
  err.metadata.forEach((value, name) => {
    headers[name] = value;
  });
  out(res).writeHead(codeToHttpStatus(err.code), {
    ...headers,
    "content-type": "application/json",
    "content-length": String(body.byteLength),
    ...extraHeaders,
  });
  out(res).end(body);
}

/** One Connect envelope: flags, big-endian length, payload. */
export function envelope(flags: number, payload: Uint8Array): Buffer {
  const out = Buffer.allocUnsafe(5 + payload.byteLength);
  out[0] = flags;
  out.writeUInt32BE(payload.byteLength, 1);
  out.set(payload, 5);
  return out;
}

const END_OK = envelope(endStreamFlag, Buffer.from("{}"));

/** The end-of-stream envelope: `{}`, or `{"error":{...}}`. */
export function endStream(err?: ConnectError): Buffer {
  if (err === undefined) return END_OK;
  const error = errorToJsonBytes(err, {});
  return envelope(
    endStreamFlag,
    Buffer.concat([Buffer.from('{"error":'), error, Buffer.from("}")]),
  );
}

/**
 * `connect-timeout-ms`, as connect-node reads it: undefined when absent, a Connect
 * error when malformed.
 */
export function timeoutOf(headers: IncomingHttpHeaders): { ms?: number; error?: ConnectError } {
  const raw = headers["connect-timeout-ms"];
  if (raw === undefined) return {};
  const parsed = parseTimeout(Array.isArray(raw) ? (raw[0] ?? "") : raw, Number.MAX_SAFE_INTEGER);
  return {
    ...(parsed.timeoutMs !== undefined ? { ms: parsed.timeoutMs } : {}),
    ...(parsed.error !== undefined ? { error: parsed.error } : {}),
  };
}

export function deadlineExceeded(): ConnectError {
  return new ConnectError("the operation timed out", Code.DeadlineExceeded);
}

/**
 * `work`, or DEADLINE_EXCEEDED once `ms` have passed (no deadline when undefined). The
 * deadline ends the call, not the work: what it was doing (an admission, say) carries
 * on, and its outcome is what a retry finds.
 */
export async function withDeadline<T>(work: Promise<T>, ms: number | undefined): Promise<T> {
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

/** A header that names no compression: absent or "identity". */
export function isIdentity(value: string | string[] | undefined): boolean {
  return value === undefined || value === "identity";
}

/**
 * Reads the whole request body, refusing it as connect-node does: more than `maxBytes`
 * (declared by Content-Length or seen while reading) is RESOURCE_EXHAUSTED, a body
 * shorter or longer than its Content-Length is INVALID_ARGUMENT.
 */
export function readBody(req: NodeRequest, maxBytes: number): Promise<Buffer> {
  const declared = req.headers["content-length"];
  const hint = declared !== undefined && /^\d+$/.test(declared) ? Number(declared) : undefined;
  if (hint !== undefined && hint > maxBytes) {
    return Promise.reject(
      new ConnectError(
        `message size ${hint} is larger than configured readMaxBytes ${maxBytes}`,
        Code.ResourceExhausted,
      ),
    );
  }
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    const fail = (err: ConnectError) => {
      cleanup();
      reject(err);
    };
    const onData = (chunk: Buffer) => {
      size += chunk.length;
      if (hint !== undefined && size > hint) {
        fail(
          new ConnectError(
            `protocol error: promised ${hint} bytes, received ${size}`,
            Code.InvalidArgument,
          ),
        );
        return;
      }
      if (size > maxBytes) {
        fail(
          new ConnectError(
            `message size is larger than configured readMaxBytes ${maxBytes}`,
            Code.ResourceExhausted,
          ),
        );
        return;
      }
      chunks.push(chunk);
    };
    const onEnd = () => {
      cleanup();
      if (hint !== undefined && size < hint) {
        reject(
          new ConnectError(
            `protocol error: promised ${hint} bytes, received ${size}`,
            Code.InvalidArgument,
          ),
        );
        return;
      }
      resolve(chunks.length === 1 ? (chunks[0] as Buffer) : Buffer.concat(chunks, size));
    };
    const onError = () => fail(new ConnectError("request body could not be read", Code.Canceled));
    const cleanup = () => {
      req.off("data", onData);
      req.off("end", onEnd);
      req.off("error", onError);
    };
    req.on("data", onData);
    req.once("end", onEnd);
    req.once("error", onError);
  });
}

/**
 * The single message of a server-streaming request body, checked as connect-node checks
 * it: every envelope within `maxBytes`, none cut short, none compressed (compressed
 * requests announce their encoding in a header, and go to connect-node), exactly one.
 */
export function singleRequestMessage(body: Buffer, maxBytes: number): Uint8Array {
  let message: Uint8Array | undefined;
  let count = 0;
  let at = 0;
  while (at < body.length) {
    if (body.length - at < 5)
      throw new ConnectError("protocol error: incomplete envelope", Code.InvalidArgument);
    const flags = body[at] as number;
    const length = body.readUInt32BE(at + 1);
    if (length > maxBytes) {
      throw new ConnectError(
        `message size ${length} is larger than configured readMaxBytes ${maxBytes}`,
        Code.ResourceExhausted,
      );
    }
    if (body.length - at - 5 < length)
      throw new ConnectError("protocol error: incomplete envelope", Code.InvalidArgument);
    const data = body.subarray(at + 5, at + 5 + length);
    at += 5 + length;
    // A client's end-stream envelope carries no message.
    if ((flags & endStreamFlag) === endStreamFlag) continue;
    if ((flags & 0b1) === 0b1) {
      throw new ConnectError(
        "received compressed envelope, but do not know how to decompress",
        Code.InvalidArgument,
      );
    }
    count += 1;
    message = data;
  }
  if (message === undefined) {
    throw new ConnectError(
      "protocol error: missing input message for server-streaming method",
      Code.Unimplemented,
    );
  }
  if (count > 1) {
    throw new ConnectError(
      "protocol error: received extra input message for server-streaming method",
      Code.Unimplemented,
    );
  }
  return message;
}

/** The byte limit for a whole streaming request body: one envelope, and a little slack. */
export function streamBodyLimit(maxBytes: number): number {
  return 2 * (maxBytes + 5);
}

type PlainKind = "string" | "int32" | "int32[]";

function isInt32(v: unknown): v is number {
  return typeof v === "number" && Number.isInteger(v) && v >= -2147483648 && v <= 2147483647;
}

/**
 * JSON.parse for the usual request: an object whose keys are all among `fields`, with
 * values of the named kinds (the JSON names protobuf-es writes). Anything else,
 * including what protobuf JSON also accepts (proto field names, numbers as strings,
 * null), gives undefined: the caller then parses with protobuf-es, which also gives
 * the exact error. protobuf-es's reflective reader costs more than the rest of a call.
 */
export function plainJson(
  text: string,
  fields: Readonly<Record<string, PlainKind>>,
): Record<string, unknown> | undefined {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch {
    return undefined;
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) return undefined;
  for (const [key, v] of Object.entries(value)) {
    // A key written twice (or escaped) is an error for protobuf JSON; JSON.parse keeps
    // the last one silently.
    const at = text.indexOf(`"${key}"`);
    if (at === -1 || at !== text.lastIndexOf(`"${key}"`)) return undefined;
    const kind = fields[key];
    if (
      kind === "string"
        ? typeof v !== "string"
        : kind === "int32"
          ? !isInt32(v)
          : kind === "int32[]"
            ? !(Array.isArray(v) && v.every(isInt32))
            : true
    ) {
      return undefined;
    }
  }
  return value as Record<string, unknown>;
}
