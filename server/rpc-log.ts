import type { IncomingMessage, ServerResponse } from "node:http";
import type { Http2ServerRequest, Http2ServerResponse } from "node:http2";
import { type ContextValues, createContextKey, createContextValues } from "@connectrpc/connect";
import type { Logger } from "pino";

// One log line per RPC, written when the response closes. It is written at the HTTP
// layer, not in an interceptor, so calls that Connect rejects before any handler runs
// (malformed JSON, wrong content type, oversized body) are logged too. The interceptor
// reports the code of calls that reached a handler through a per-request context value.

type NodeRequest = IncomingMessage | Http2ServerRequest;
type NodeResponse = ServerResponse | Http2ServerResponse;
export type NodeHandler = (req: NodeRequest, res: NodeResponse) => void;

export interface RpcOutcome {
  /** Connect code name ("ok", "not_found", ...), once a handler has finished. */
  code: string | undefined;
}

export const rpcOutcomeKey = createContextKey<RpcOutcome | undefined>(undefined, { description: "rpc outcome" });

const outcomes = new WeakMap<NodeRequest, RpcOutcome>();

/** For connectNodeAdapter's `contextValues`: links the request to its log line. */
export function rpcContextValues(req: NodeRequest): ContextValues {
  return createContextValues().set(rpcOutcomeKey, outcomes.get(req));
}

/**
 * Wraps the node handler so that every request ends in one line: procedure, code, HTTP
 * status and duration. Never the body or the URL's query (a Connect GET carries the
 * request message there).
 */
export function withRpcLog(handler: NodeHandler, log: Logger): NodeHandler {
  return (req, res) => {
    const started = performance.now();
    const outcome: RpcOutcome = { code: undefined };
    outcomes.set(req, outcome);
    res.once("close", () => {
      const path = (req.url ?? "").split("?", 1)[0];
      const grpcStatus = res.getHeader("grpc-status");
      const line = {
        rpc: path,
        method: req.method,
        http: req.httpVersion,
        code: outcome.code ?? (grpcStatus !== undefined ? `grpc-status ${String(grpcStatus)}` : undefined),
        status: res.statusCode,
        ms: Math.round(performance.now() - started),
      };
      if (res.statusCode >= 500) log.warn(line, "rpc");
      else log.info(line, "rpc");
    });
    handler(req, res);
  };
}
