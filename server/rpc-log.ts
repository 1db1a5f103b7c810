import type { IncomingMessage, ServerResponse } from "node:http";
import type { Http2ServerRequest, Http2ServerResponse } from "node:http2";
import { type ContextValues, createContextKey, createContextValues } from "@connectrpc/connect";
import { context, SpanKind, SpanStatusCode, trace } from "@opentelemetry/api";
import type { Logger } from "pino";
import type { ApiMetrics } from "../core/metrics.js";
import { extractContext, startSpan } from "../core/tracing.js";

// One log line per RPC, written when the response closes. It is written at the HTTP
// layer, not in an interceptor, so calls that Connect rejects before any handler runs
// (malformed JSON, wrong content type, oversized body) are logged too, and so are the
// calls of the lean transport (lean/lean-transport.ts). The interceptor (or the lean transport)
// reports the code of calls that reached a handler through a per-request context value.
// The same place counts and times every RPC for /metrics and opens its trace span.

type NodeRequest = IncomingMessage | Http2ServerRequest;
type NodeResponse = ServerResponse | Http2ServerResponse;
export type NodeHandler = (req: NodeRequest, res: NodeResponse) => void;

export interface RpcOutcome {
  /** Connect code name ("ok", "not_found", ...), once a handler has finished. */
  code: string | undefined;
  /** The authenticated owner, for the log line, once auth has run. */
  owner?: string;
}

export const rpcOutcomeKey = createContextKey<RpcOutcome | undefined>(undefined, {
  description: "rpc outcome",
});

// Each request carries its outcome under a symbol of ours. Not a WeakMap keyed by the
// request: each call would add an ephemeron, which V8 walks in the pause of a full
// collection (wire/envelope.ts).
const OUTCOME = Symbol("rpc outcome");
type WithOutcome = NodeRequest & { [OUTCOME]?: RpcOutcome };
const outcomes = {
  get: (req: NodeRequest): RpcOutcome | undefined => (req as WithOutcome)[OUTCOME],
  set: (req: NodeRequest, outcome: RpcOutcome): void => {
    (req as WithOutcome)[OUTCOME] = outcome;
  },
};

/** For connectNodeAdapter's `contextValues`: links the request to its log line. */
export function rpcContextValues(req: NodeRequest): ContextValues {
  return createContextValues().set(rpcOutcomeKey, outcomes.get(req));
}

/**
 * Hands the final code name ("ok", "not_found", ...) and the owner, once known, to the
 * log line and metrics of a call that did not go through connect-node's interceptor.
 */
export function recordOutcome(req: NodeRequest, code: string, owner?: string): void {
  const outcome = outcomes.get(req);
  if (outcome === undefined) return;
  outcome.code = code;
  if (owner !== undefined) outcome.owner = owner;
}

export interface RpcObservers {
  /** Request paths of the procedures we serve ("/downloads.v1.DownloadService/Initiate"). */
  procedures?: ReadonlySet<string>;
  /** Counts and times every RPC (rpc_requests_total, rpc_duration_seconds). */
  metrics?: ApiMetrics;
  /** One server span per RPC, continuing the caller's `traceparent` when it sends one. */
  tracing?: boolean;
}

// Looks like /package.Service/Method: an RPC we may not serve, as opposed to a page,
// a probe or /metrics. Unknown ones share one label, so no caller can grow the series.
const RPC_PATH = /^\/[A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)+\/[A-Za-z_][\w]*$/;

/**
 * Wraps the node handler so that every request ends in one line: procedure, code, HTTP
 * status and duration. Never the body or the URL's query (a Connect GET carries the
 * request message there).
 */
export function withRpcLog(
  handler: NodeHandler,
  log: Logger,
  observers: RpcObservers = {},
): NodeHandler {
  const { procedures, metrics, tracing = false } = observers;
  return (req, res) => {
    const started = performance.now();
    const outcome: RpcOutcome = { code: undefined };
    outcomes.set(req, outcome);
    const url = req.url ?? "";
    const query = url.indexOf("?");
    const path = query === -1 ? url : url.slice(0, query);
    const label =
      procedures?.has(path) === true ? path.slice(1) : RPC_PATH.test(path) ? "unknown" : undefined;
    const parent = tracing && label !== undefined ? extractContext(req.headers) : undefined;
    const span =
      parent === undefined || label === undefined
        ? undefined
        : startSpan(label, { kind: SpanKind.SERVER, attributes: rpcAttributes(path) }, parent);
    res.once("close", () => {
      const seconds = (performance.now() - started) / 1000;
      const grpcStatus = res.getHeader("grpc-status");
      // The line is built only when it is written: at `warn` (busy deployments, the
      // benchmarks) every call would otherwise pay for an object nobody reads.
      const serverFault = res.statusCode >= 500;
      if (serverFault || log.isLevelEnabled("info")) {
        const line = {
          rpc: path,
          method: req.method,
          http: req.httpVersion,
          code:
            outcome.code ??
            (grpcStatus !== undefined ? `grpc-status ${String(grpcStatus)}` : undefined),
          ...(outcome.owner !== undefined ? { owner: outcome.owner } : {}),
          // Written after the span's context is gone, so the logger cannot add it itself.
          ...(span !== undefined ? { traceId: span.spanContext().traceId } : {}),
          status: res.statusCode,
          ms: Math.round(seconds * 1000),
        };
        if (serverFault) log.warn(line, "rpc");
        else log.info(line, "rpc");
      }
      if (label === undefined) return;
      // A client that hung up before the answer ended closes the response before the
      // handler hears of it (and reports "canceled"): say so now.
      const code =
        outcome.code ?? (res.writableEnded ? codeOf(grpcStatus, res.statusCode) : "canceled");
      metrics?.rpc(label, code, seconds);
      if (span !== undefined) {
        span.setAttribute("http.response.status_code", res.statusCode);
        if (code !== "ok") span.setAttribute("rpc.connect_rpc.error_code", code);
        if (SERVER_FAULTS.has(code)) span.setStatus({ code: SpanStatusCode.ERROR, message: code });
        span.end();
      }
    });
    if (span === undefined || parent === undefined) handler(req, res);
    else context.with(trace.setSpan(parent, span), () => handler(req, res));
  };
}

function rpcAttributes(path: string): Record<string, string> {
  const [, service = "", method = ""] = path.split("/");
  return { "rpc.system": "connect_rpc", "rpc.service": service, "rpc.method": method };
}

/** Codes that say the server, not the caller, is at fault: the span is an error. */
const SERVER_FAULTS = new Set([
  "unknown",
  "internal",
  "unavailable",
  "data_loss",
  "deadline_exceeded",
  "unimplemented",
]);

const GRPC_CODES = [
  "ok",
  "canceled",
  "unknown",
  "invalid_argument",
  "deadline_exceeded",
  "not_found",
  "already_exists",
  "permission_denied",
  "resource_exhausted",
  "failed_precondition",
  "aborted",
  "out_of_range",
  "unimplemented",
  "internal",
  "unavailable",
  "data_loss",
  "unauthenticated",
];

/**
 * The code of a call that no handler reported: gRPC's status header, else the HTTP
 * status Connect chose (its mapping from codes, read backwards; 400 stands for every
 * "bad request" code).
 */
function codeOf(grpcStatus: unknown, httpStatus: number): string {
  if (grpcStatus !== undefined) return GRPC_CODES[Number(grpcStatus)] ?? "unknown";
  switch (httpStatus) {
    case 200:
      return "ok";
    case 400:
      return "invalid_argument";
    case 401:
      return "unauthenticated";
    case 403:
      return "permission_denied";
    case 404:
      return "unimplemented";
    case 408:
    case 499:
      return "canceled";
    case 409:
      return "aborted";
    // Refused before any RPC ran: the caller's mistake, under names of their own.
    case 405:
      return "method_not_allowed";
    case 413:
    case 429:
      return "resource_exhausted";
    case 415:
      return "unsupported_media_type";
    case 501:
      return "unimplemented";
    case 502:
    case 503:
      return "unavailable";
    case 504:
      return "deadline_exceeded";
    default:
      return httpStatus >= 500 ? "internal" : "unknown";
  }
}
