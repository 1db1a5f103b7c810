import { Code, type Interceptor } from "@connectrpc/connect";
import { codeToString } from "@connectrpc/connect/protocol-connect";
import type { Logger } from "pino";
import { OverloadedError } from "../core/jobs.js";
import { ownerKey } from "./auth.js";
import { toConnectError } from "./errors.js";
import { type RpcOutcome, rpcOutcomeKey } from "./rpc-log.js";

// The one interceptor every handler runs under: domain errors become Connect codes
// (errors.ts), unexpected ones are logged with their cause and left for Connect to
// answer as `internal error`, and the final code is handed to the RPC log line.

export function rpcInterceptor(log: Logger): Interceptor {
  return (next) => async (req) => {
    const outcome = req.contextValues.get(rpcOutcomeKey);
    const procedure = `/${req.service.typeName}/${req.method.name}`;
    const fail = (err: unknown): unknown => {
      const mapped = toConnectError(err);
      if (mapped === undefined) {
        log.error({ rpc: procedure, err }, "unexpected error");
        record(outcome, Code.Internal);
        return err;
      }
      // A ConnectError thrown on purpose (the shutdown's UNAVAILABLE) is not news, and
      // neither is a full queue turning callers away (it would flood the log).
      if (mapped.code === Code.Unavailable && mapped !== err && !(err instanceof OverloadedError)) {
        log.warn({ rpc: procedure, err: mapped.cause }, "backend unavailable");
      }
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
