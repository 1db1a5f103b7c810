import { Code, ConnectError, type ConnectRouter } from "@connectrpc/connect";
import {
  createAsyncIterable,
  type UniversalHandler,
  type UniversalServerRequest,
  type UniversalServerResponse,
} from "@connectrpc/connect/protocol";
import { codeToHttpStatus, errorToJsonBytes } from "@connectrpc/connect/protocol-connect";
import {
  BodyCollector,
  negotiate,
  PROTOCOLS,
  type Protocol,
  parseMessage,
  protocolOf,
  queryMessage,
  readMessage,
} from "../wire/request-reader.js";

// connect-es decodes a request before any interceptor runs, and answers a caller's
// mistake as its own fault: undecodable protobuf, a compressed envelope nobody
// announced and a truncated gzip or brotli body are INTERNAL (HTTP 500, gRPC 13), and
// clients, proxies and alerting count them as ours. So every unary and server-streaming
// handler first reads the request with the lean transport's own reader
// (wire/request-reader.ts): a request it refuses fails with that reader's code and
// words, which every protocol handler passes on as they are; a request it accepts is
// handed on byte for byte. Both ways in thus refuse the same requests alike.

const CONNECT = PROTOCOLS[0] as Protocol;

async function* replay(chunks: readonly Uint8Array[]): AsyncIterable<Uint8Array> {
  yield* chunks;
}

/** A body that fails as soon as the handler starts reading it. */
// biome-ignore lint/correctness/useYield: it throws before the first chunk, by design
async function* failing(err: ConnectError): AsyncIterable<Uint8Array> {
  throw err;
}

/** Connect GET carries no body to fail: its error answer is made here, as connect-node makes it. */
function getError(err: ConnectError): UniversalServerResponse {
  const body = errorToJsonBytes(err, {});
  const header = new Headers({ "content-type": "application/json" });
  // An error answer must not be reused: the next poll may well succeed.
  header.set("cache-control", "no-store");
  header.set("content-length", String(body.byteLength));
  return { status: codeToHttpStatus(err.code), header, body: createAsyncIterable([body]) };
}

function guard(handler: UniversalHandler, readMaxBytes: number): UniversalHandler {
  const schema = handler.method.input;
  const streaming = handler.method.methodKind === "server_streaming";
  const guarded = async (req: UniversalServerRequest): Promise<UniversalServerResponse> => {
    const header = (name: string) => req.header.get(name);
    const type = header("content-type") ?? "";
    // What connect-node refuses before reading (method, content type, compression,
    // timeout) it refuses as before.
    if (req.method === "GET") {
      const params = new URL(req.url).searchParams;
      const encoding = params.get("encoding");
      const compression = params.get("compression");
      if (
        (type !== "" && CONNECT.binary(type, false) === undefined) ||
        (encoding !== "json" && encoding !== "proto") ||
        (compression !== null && compression !== "identity") ||
        CONNECT.parseTimeout(header(CONNECT.timeoutHeader)).error !== undefined
      ) {
        return handler(req);
      }
      try {
        parseMessage(schema, queryMessage(params), encoding === "proto", readMaxBytes);
      } catch (err) {
        return getError(ConnectError.from(err, Code.InvalidArgument));
      }
      return handler(req);
    }
    const found = req.method === "POST" ? protocolOf(type, streaming) : undefined;
    if (found === undefined || found.text || !(Symbol.asyncIterator in Object(req.body)))
      return handler(req);
    const { protocol, binary } = found;
    const compression = negotiate(protocol, header);
    if (
      compression.error !== undefined ||
      protocol.parseTimeout(header(protocol.timeoutHeader)).error !== undefined
    )
      return handler(req);
    let collector: BodyCollector | undefined;
    try {
      collector = new BodyCollector(protocol.enveloped, readMaxBytes, header("content-length"));
      for await (const chunk of req.body as AsyncIterable<Uint8Array>) collector.push(chunk);
      await readMessage(
        schema,
        collector.finish(),
        { protocol, binary, compression: compression.request },
        readMaxBytes,
        { streaming },
      );
    } catch (err) {
      return handler({ ...req, body: failing(ConnectError.from(err)) });
    }
    return handler({ ...req, body: replay(collector.received) });
  };
  return Object.assign(guarded, handler);
}

/**
 * Wraps a routes function so that every unary and server-streaming handler it registers
 * reads its request through the shared reader first.
 */
export function guardRequests(
  routes: (router: ConnectRouter) => void,
  readMaxBytes: number,
): (router: ConnectRouter) => void {
  return (router) => {
    routes(router);
    for (const [i, handler] of router.handlers.entries()) {
      const kind = handler.method.methodKind;
      // Client and bidi streams send many messages while reading answers: never buffered.
      if (kind === "unary" || kind === "server_streaming")
        router.handlers[i] = guard(handler, readMaxBytes);
    }
  };
}
