import { Code, type Interceptor } from "@connectrpc/connect";
import { codeToString } from "@connectrpc/connect/protocol-connect";
import type { Logger } from "pino";
import { ownerKey } from "../auth.js";
import { rpcFailure } from "../rpc/errors.js";
import { type RpcOutcome, rpcOutcomeKey } from "../rpc-log.js";

// The one interceptor every connect-node handler runs under: failures become what the
// caller is told (rpc/errors.ts rpcFailure, as on the lean transport), and the final
// code is handed to the RPC log line.

export function rpcInterceptor(log: Logger): Interceptor {
  return (next) => async (req) => {
    const outcome = req.contextValues.get(rpcOutcomeKey);
    const procedure = `/${req.service.typeName}/${req.method.name}`;
    const fail = (err: unknown): unknown => {
      const mapped = rpcFailure(err, log, procedure, req.requestMethod === "GET");
      record(outcome, mapped.code);
      return mapped;
    };
    try {
      const res = await next(req).finally(() => {
        // Set by the auth interceptor inside this one; the log line names the owner.
        const owner = req.contextValues.get(ownerKey);
        if (outcome !== undefined && owner !== undefined) outcome.owner = owner;
      });
      if (!res.stream) {
        record(outcome, undefined);
        return res;
      }
      return { ...res, message: mapStream(res.message, outcome, fail) };
    } catch (err) {
      throw fail(err);
    }
  };
}

function record(outcome: RpcOutcome | undefined, code: Code | undefined): void {
  if (outcome !== undefined) outcome.code = code === undefined ? "ok" : codeToString(code);
}

async function* mapStream<T>(
  source: AsyncIterable<T>,
  outcome: RpcOutcome | undefined,
  fail: (err: unknown) => unknown,
): AsyncGenerator<T> {
  let settled = false;
  try {
    yield* source;
    settled = true;
    record(outcome, undefined);
  } catch (err) {
    settled = true;
    throw fail(err);
  } finally {
    // Neither finished nor failed: the client went away and Connect stopped reading.
    if (!settled) record(outcome, Code.Canceled);
  }
}
