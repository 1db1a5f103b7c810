import { type DescMessage, fromBinary } from "@bufbuild/protobuf";
import { Code, ConnectError, type ConnectRouter } from "@connectrpc/connect";
import type { UniversalHandler, UniversalServerRequest } from "@connectrpc/connect/protocol";

// A request whose protobuf bytes do not decode is the caller's mistake, yet connect-es
// answers it with INTERNAL (HTTP 500): its serializer turns every decode error into
// `parse binary: ...` with Code.Internal, and it decodes before any interceptor runs.
// Clients, proxies and alerting then count a bad request as our failure. So, for the
// RPCs whose request is a single message (unary and server streaming), the request body
// is read here first and each message decoded once; a message that does not decode
// makes the body fail with INVALID_ARGUMENT, which every protocol handler passes on as
// it is (a Connect 400, gRPC status 3). The same goes for an envelope flagged compressed
// when no compression was negotiated. Bodies that pass are handed on unchanged.

type Framing = "unary" | "enveloped" | "enveloped-json";

/**
 * How a body is framed: a bare protobuf message, protobuf in 5-byte envelopes, or JSON
 * in envelopes (checked only for a compressed flag: JSON errors are reported well).
 */
function framingOf(contentType: string | null): Framing | undefined {
  const type = (contentType ?? "").split(";", 1)[0]?.trim().toLowerCase() ?? "";
  if (type === "application/proto") return "unary";
  if (
    type === "application/connect+proto" ||
    type === "application/grpc" ||
    type === "application/grpc+proto" ||
    type === "application/grpc-web" ||
    type === "application/grpc-web+proto"
  ) {
    return "enveloped";
  }
  if (
    type === "application/connect+json" ||
    type === "application/grpc+json" ||
    type === "application/grpc-web+json"
  ) {
    return "enveloped-json";
  }
  return undefined;
}

async function* replay(
  chunks: Uint8Array[],
  rest?: AsyncIterator<Uint8Array>,
): AsyncIterable<Uint8Array> {
  yield* chunks;
  if (rest === undefined) return;
  for (;;) {
    const next = await rest.next();
    if (next.done === true) return;
    yield next.value;
  }
}

/** A body that fails as soon as the handler starts reading it. */
// biome-ignore lint/correctness/useYield: it throws before the first chunk, by design
async function* failing(err: ConnectError): AsyncIterable<Uint8Array> {
  throw err;
}

function concat(chunks: Uint8Array[], length: number): Uint8Array {
  const out = new Uint8Array(length);
  let at = 0;
  for (const c of chunks) {
    out.set(c, at);
    at += c.length;
  }
  return out;
}

/** The first decode error of the message(s) in `bytes`, if any. */
function decodeError(schema: DescMessage, bytes: Uint8Array, framing: Framing): string | undefined {
  const tryDecode = (data: Uint8Array): string | undefined => {
    try {
      fromBinary(schema, data);
      return undefined;
    } catch (err) {
      return err instanceof Error ? err.message : String(err);
    }
  };
  if (framing === "unary") return tryDecode(bytes);
  for (let at = 0; at + 5 <= bytes.length; ) {
    const flags = bytes[at] as number;
    const length = new DataView(bytes.buffer, bytes.byteOffset + at + 1, 4).getUint32(0);
    // An incomplete frame: the protocol handler reports that (as INVALID_ARGUMENT).
    if (at + 5 + length > bytes.length) return undefined;
    // Only called for identity encoding, where a compressed frame cannot be read either
    // (connect-es says so with INTERNAL too).
    if ((flags & 0b1) !== 0)
      return "received compressed envelope, but do not know how to decompress";
    const err =
      framing === "enveloped" ? tryDecode(bytes.subarray(at + 5, at + 5 + length)) : undefined;
    if (err !== undefined) return err;
    at += 5 + length;
  }
  return undefined;
}

function guard(handler: UniversalHandler, maxBytes: number): UniversalHandler {
  const schema = handler.method.input;
  const guarded = async (req: UniversalServerRequest) => {
    const framing = framingOf(req.header.get("content-type"));
    const encoding =
      req.header.get("content-encoding") ?? req.header.get("grpc-encoding") ?? "identity";
    if (
      framing === undefined ||
      encoding !== "identity" ||
      req.body === undefined ||
      !(Symbol.asyncIterator in Object(req.body))
    ) {
      return handler(req);
    }
    const source = (req.body as AsyncIterable<Uint8Array>)[Symbol.asyncIterator]();
    const chunks: Uint8Array[] = [];
    let length = 0;
    for (;;) {
      const next = await source.next();
      if (next.done === true) break;
      chunks.push(next.value);
      length += next.value.length;
      // Too large to be ours: the handler applies its own limit to the whole body.
      if (length > maxBytes) return handler({ ...req, body: replay(chunks, source) });
    }
    const err = decodeError(schema, concat(chunks, length), framing);
    const message =
      err?.startsWith("received compressed") === true ? err : `parse binary: ${err ?? ""}`;
    const body =
      err === undefined ? replay(chunks) : failing(new ConnectError(message, Code.InvalidArgument));
    return handler({ ...req, body });
  };
  return Object.assign(guarded, handler);
}

/**
 * Wraps a routes function so that every unary and server-streaming handler it registers
 * answers undecodable protobuf with INVALID_ARGUMENT instead of INTERNAL. `maxBytes` is
 * the largest body examined (the server's read limit plus framing).
 */
export function strictBinary(
  routes: (router: ConnectRouter) => void,
  maxBytes: number,
): (router: ConnectRouter) => void {
  return (router) => {
    routes(router);
    for (const [i, handler] of router.handlers.entries()) {
      const kind = handler.method.methodKind;
      // Client and bidi streams send many messages while reading answers: never buffered.
      if (kind === "unary" || kind === "server_streaming")
        router.handlers[i] = guard(handler, maxBytes);
    }
  };
}
