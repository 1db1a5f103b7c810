import {
  create,
  type DescMessage,
  fromBinary,
  fromJsonString,
  type MessageShape,
} from "@bufbuild/protobuf";
import { base64Decode } from "@bufbuild/protobuf/wire";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  type Compression,
  compressedFlag,
  compressionNegotiate,
} from "@connectrpc/connect/protocol";
import {
  parseTimeout as connectTimeout,
  contentTypeStreamRegExp,
  contentTypeUnaryRegExp,
  endStreamFlag,
} from "@connectrpc/connect/protocol-connect";
import {
  parseTimeout as grpcTimeout,
  contentTypeRegExp as grpcType,
} from "@connectrpc/connect/protocol-grpc";
import {
  contentTypeRegExp as grpcWebType,
  trailerFlag,
} from "@connectrpc/connect/protocol-grpc-web";
import { compressionBrotli, compressionGzip } from "@connectrpc/connect-node";

// How a request message is read, for both ways in: the lean transport calls these
// directly, and connect-node's handlers get them through connect/request-guard.ts before
// connect-node reads the body itself. So both answer a bad body with the same code and
// words, and a caller's mistake is always the caller's: connect-es makes undecodable
// protobuf, a compressed envelope nobody announced and a truncated gzip or brotli body
// INTERNAL (HTTP 500), here they are INVALID_ARGUMENT. Limits and messages are
// connect-node's (https://connectrpc.com/docs/protocol), so well-formed and ordinary
// malformed requests get the answers connect-es gives.

/** The compressions connect-node accepts and answers with, and from what size it compresses. */
export const COMPRESSIONS: Compression[] = [compressionGzip, compressionBrotli];
export const COMPRESS_MIN_BYTES = 1024;

export type ProtocolName = "connect" | "connect-stream" | "grpc" | "grpc-web";

/** What tells the protocols apart, and the headers each one uses for the same things. */
export interface Protocol {
  name: ProtocolName;
  /** Messages in 5-byte envelopes (all but Connect unary). */
  enveloped: boolean;
  /** A request envelope with this flag carries no message (Connect end-stream, gRPC-Web trailers). */
  endFlag: number | undefined;
  encodingHeader: string;
  acceptEncodingHeader: string;
  timeoutHeader: string;
  parseTimeout(value: string | null): {
    timeoutMs?: number | undefined;
    error?: ConnectError | undefined;
  };
  /** Protocol buffers (true), JSON (false), or not this protocol (undefined). */
  binary(contentType: string, streaming: boolean): boolean | undefined;
  contentType(binary: boolean): string;
}

const MAX_TIMEOUT = Number.MAX_SAFE_INTEGER;

const CONNECT: Protocol = {
  name: "connect",
  enveloped: false,
  endFlag: undefined,
  encodingHeader: "content-encoding",
  acceptEncodingHeader: "accept-encoding",
  timeoutHeader: "connect-timeout-ms",
  parseTimeout: (v) => connectTimeout(v, MAX_TIMEOUT),
  binary: (type, streaming) =>
    streaming || !contentTypeUnaryRegExp.test(type)
      ? undefined
      : type.slice(-5).toLowerCase() === "proto",
  contentType: (binary) => (binary ? "application/proto" : "application/json"),
};

/** connect-node tries its protocols in this order; the first whose content type matches wins. */
export const PROTOCOLS: readonly Protocol[] = [
  CONNECT,
  {
    ...CONNECT,
    name: "connect-stream",
    enveloped: true,
    endFlag: endStreamFlag,
    encodingHeader: "connect-content-encoding",
    acceptEncodingHeader: "connect-accept-encoding",
    binary: (type, streaming) =>
      !streaming || !contentTypeStreamRegExp.test(type)
        ? undefined
        : type.slice(-5).toLowerCase() === "proto",
    contentType: (binary) => (binary ? "application/connect+proto" : "application/connect+json"),
  },
  {
    name: "grpc",
    enveloped: true,
    endFlag: undefined,
    encodingHeader: "grpc-encoding",
    acceptEncodingHeader: "grpc-accept-encoding",
    timeoutHeader: "grpc-timeout",
    parseTimeout: (v) => grpcTimeout(v, MAX_TIMEOUT),
    binary: (type) => {
      const m = grpcType.exec(type);
      return m === null ? undefined : m[1] === undefined;
    },
    contentType: (binary) => (binary ? "application/grpc+proto" : "application/grpc+json"),
  },
  {
    name: "grpc-web",
    enveloped: true,
    endFlag: trailerFlag,
    encodingHeader: "grpc-encoding",
    acceptEncodingHeader: "grpc-accept-encoding",
    timeoutHeader: "grpc-timeout",
    parseTimeout: (v) => grpcTimeout(v, MAX_TIMEOUT),
    // grpc-web-text (base64 bodies) matches too: connect-node refuses it with 415.
    binary: (type) => {
      const m = grpcWebType.exec(type);
      return m === null ? undefined : m[2] === undefined;
    },
    contentType: (binary) => (binary ? "application/grpc-web+proto" : "application/grpc-web+json"),
  },
];

/** The protocol of a POST, as connect-node negotiates it; undefined is its 415. */
export function protocolOf(
  contentType: string,
  streaming: boolean,
): { protocol: Protocol; binary: boolean; text: boolean } | undefined {
  for (const protocol of PROTOCOLS) {
    const binary = protocol.binary(contentType, streaming);
    if (binary !== undefined)
      return { protocol, binary, text: protocol.name === "grpc-web" && /-text/i.test(contentType) };
  }
  return undefined;
}

/**
 * Request and response compression as connect-node negotiates them; `error` (an unknown
 * request encoding) is UNIMPLEMENTED, and the lean transport leaves such calls to connect-node.
 */
export function negotiate(
  protocol: Protocol,
  header: (name: string) => string | null,
): { request: Compression | null; response: Compression | null; error?: ConnectError } {
  return compressionNegotiate(
    COMPRESSIONS,
    header(protocol.encodingHeader),
    header(protocol.acceptEncodingHeader),
    protocol.acceptEncodingHeader,
  );
}

function tooLarge(size: number | undefined, max: number): ConnectError {
  return new ConnectError(
    size === undefined
      ? `message size is larger than configured readMaxBytes ${max}`
      : `message size ${size} is larger than configured readMaxBytes ${max}`,
    Code.ResourceExhausted,
  );
}

function promised(hint: number, received: number): ConnectError {
  return new ConnectError(
    `protocol error: promised ${hint} bytes, received ${received}`,
    Code.InvalidArgument,
  );
}

/**
 * Collects a request body as it arrives. A bare (Connect unary) body is held to
 * readMaxBytes and to its Content-Length, as connect-node holds it. An enveloped body of
 * a single-message RPC is held to two envelopes' worth: nothing longer can be valid, and
 * connect-node (which has no such limit) would refuse it as well, only later.
 */
export class BodyCollector {
  private readonly chunks: Uint8Array[] = [];
  private size = 0;
  private readonly max: number;
  private readonly hint: number | undefined;

  constructor(enveloped: boolean, readMaxBytes: number, contentLength: string | null | undefined) {
    this.max = enveloped ? 2 * (readMaxBytes + 5) : readMaxBytes;
    const hint =
      !enveloped &&
      contentLength !== null &&
      contentLength !== undefined &&
      /^\d+$/.test(contentLength)
        ? Number(contentLength)
        : undefined;
    if (hint !== undefined && hint > readMaxBytes) throw tooLarge(hint, readMaxBytes);
    this.hint = hint;
  }

  push(chunk: Uint8Array): void {
    this.size += chunk.byteLength;
    if (this.hint !== undefined && this.size > this.hint) throw promised(this.hint, this.size);
    if (this.size > this.max) throw tooLarge(undefined, this.max);
    this.chunks.push(chunk);
  }

  finish(): Uint8Array {
    if (this.hint !== undefined && this.size < this.hint) throw promised(this.hint, this.size);
    if (this.chunks.length === 1) return this.chunks[0] as Uint8Array;
    return Buffer.concat(this.chunks, this.size);
  }

  /** What has been pushed, unchanged (connect-node reads it again). */
  get received(): readonly Uint8Array[] {
    return this.chunks;
  }
}

/** Each decompression failure but "too large" is the sender's corrupt or truncated data. */
async function decompress(c: Compression, data: Uint8Array, max: number): Promise<Uint8Array> {
  try {
    return await c.decompress(data, max);
  } catch (err) {
    const e = ConnectError.from(err);
    if (e.code === Code.ResourceExhausted) throw e;
    throw new ConnectError(
      `${c.name} body could not be decompressed (truncated or corrupt)`,
      Code.InvalidArgument,
      undefined,
      undefined,
      err,
    );
  }
}

export type PlainKind = "string" | "int32" | "int32[]";
/** The JSON names and kinds of a request's usual fields, for parseMessage's JSON.parse path. */
export type PlainFields = Readonly<Record<string, PlainKind>>;

function isInt32(v: unknown): v is number {
  return typeof v === "number" && Number.isInteger(v) && v >= -2147483648 && v <= 2147483647;
}

/**
 * JSON.parse for the usual request: an object whose keys are all among `fields`, with
 * values of the named kinds. Anything else, including what protobuf JSON also accepts
 * (proto field names, numbers as strings, null), gives undefined, and protobuf-es
 * parses it with its exact errors. Its reflective reader costs more than the rest of a poll.
 */
function plainJson(text: string, fields: PlainFields): Record<string, unknown> | undefined {
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
    const ok =
      kind === "string"
        ? typeof v === "string"
        : kind === "int32"
          ? isInt32(v)
          : kind === "int32[]" && Array.isArray(v) && v.every(isInt32);
    if (!ok) return undefined;
  }
  return value as Record<string, unknown>;
}

/** One message in the request's encoding; every failure is INVALID_ARGUMENT. */
export function parseMessage<D extends DescMessage>(
  schema: D,
  data: Uint8Array,
  binary: boolean,
  readMaxBytes: number,
  plain?: PlainFields,
): MessageShape<D> {
  if (data.byteLength > readMaxBytes) throw tooLarge(data.byteLength, readMaxBytes);
  if (binary) {
    try {
      return fromBinary(schema, data);
    } catch (err) {
      throw new ConnectError(
        `parse binary: ${err instanceof Error ? err.message : String(err)}`,
        Code.InvalidArgument,
      );
    }
  }
  const text = Buffer.from(data.buffer, data.byteOffset, data.byteLength).toString("utf8");
  const fast = plain === undefined ? undefined : plainJson(text, plain);
  if (fast !== undefined) return create(schema, fast as never) as MessageShape<D>;
  try {
    return fromJsonString(schema, text, { ignoreUnknownFields: false });
  } catch (err) {
    throw ConnectError.from(err, Code.InvalidArgument);
  }
}

export interface Wire {
  protocol: Protocol;
  binary: boolean;
  /** The request's compression (null: none). */
  compression: Compression | null;
}

/**
 * The single request message of a unary or server-streaming call from its whole body,
 * checked envelope by envelope in the order connect-node checks them.
 */
export async function readMessage<D extends DescMessage>(
  schema: D,
  body: Uint8Array,
  wire: Wire,
  readMaxBytes: number,
  opts: { streaming: boolean; plain?: PlainFields },
): Promise<MessageShape<D>> {
  const { compression, binary } = wire;
  if (!wire.protocol.enveloped) {
    const data = compression === null ? body : await decompress(compression, body, readMaxBytes);
    return parseMessage(schema, data, binary, readMaxBytes, opts.plain);
  }
  const kind = opts.streaming ? "server-streaming" : "unary";
  const view = Buffer.from(body.buffer, body.byteOffset, body.byteLength);
  let message: MessageShape<D> | undefined;
  let at = 0;
  while (view.length - at >= 5) {
    const flags = view[at] as number;
    const length = view.readUInt32BE(at + 1);
    if (length > readMaxBytes) throw tooLarge(length, readMaxBytes);
    if (view.length - at - 5 < length) break;
    let data: Uint8Array = view.subarray(at + 5, at + 5 + length);
    at += 5 + length;
    if ((flags & compressedFlag) === compressedFlag) {
      if (compression === null) {
        throw new ConnectError(
          "received compressed envelope, but do not know how to decompress",
          Code.InvalidArgument,
        );
      }
      data = await decompress(compression, data, readMaxBytes);
    }
    const endFlag = wire.protocol.endFlag;
    if (endFlag !== undefined && (flags & endFlag) === endFlag) continue;
    const parsed = parseMessage(schema, data, binary, readMaxBytes, opts.plain);
    if (message !== undefined) {
      throw new ConnectError(
        `protocol error: received extra input message for ${kind} method`,
        Code.Unimplemented,
      );
    }
    message = parsed;
  }
  if (at < view.length)
    throw new ConnectError("protocol error: incomplete envelope", Code.InvalidArgument);
  if (message === undefined) {
    throw new ConnectError(
      `protocol error: missing input message for ${kind} method`,
      Code.Unimplemented,
    );
  }
  return message;
}

/** Connect GET: the message in the query, base64url-encoded when `base64=1`. */
export function queryMessage(params: URLSearchParams): Uint8Array {
  const message = params.get("message") ?? "";
  if (params.get("base64") !== "1") return Buffer.from(message, "utf8");
  try {
    return base64Decode(message);
  } catch {
    throw new ConnectError("message is not valid base64", Code.InvalidArgument);
  }
}
