import { create } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import type { Logger } from "pino";
import { HistoryOffError, HistoryUnavailableError } from "../../core/history-reader.js";
import {
  InvalidInputError,
  JobNotFoundError,
  JobStateError,
  PermissionDeniedError,
  QuotaExceededError,
  RetryLaterError,
} from "../../core/jobs.js";
import { unavailableRetryAfterMs } from "../../core/redis-errors.js";
import { RetryInfoSchema } from "../../gen/google/rpc/error_details_pb.js";

// Domain error -> Connect code, in one place. connect-node's connectErrorFromNodeReason
// is the model: look at what the error is, never at its message where a type or code
// says the same.

/**
 * An error that tells the caller when to come back: a google.rpc.RetryInfo detail for
 * gRPC and Connect clients, and Retry-After (whole seconds, rounded up) for plain HTTP
 * callers, who see it on the 429 or 503 answer.
 */
function retryLater(
  message: string,
  code: Code,
  retryAfterMs: number,
  cause: unknown,
): ConnectError {
  const seconds = Math.max(1, Math.ceil(retryAfterMs / 1000));
  const ms = Math.max(0, Math.round(retryAfterMs));
  const detail = create(RetryInfoSchema, {
    retryDelay: { seconds: BigInt(Math.floor(ms / 1000)), nanos: (ms % 1000) * 1_000_000 },
  });
  return new ConnectError(
    message,
    code,
    new Headers({ "retry-after": String(seconds) }),
    [{ desc: RetryInfoSchema, value: detail }],
    cause,
  );
}

/**
 * Maps a domain error to the ConnectError the caller sees. Returns undefined for
 * anything unexpected: the caller rethrows it, Connect answers `internal error`, and the
 * cause stays in the server log.
 */
export function toConnectError(err: unknown): ConnectError | undefined {
  if (err instanceof ConnectError) return err;
  // The request itself is wrong; the message says what to fix.
  if (err instanceof InvalidInputError)
    return new ConnectError(err.message, Code.InvalidArgument, undefined, undefined, err);
  // Unknown, expired or foreign job ids look the same to the caller.
  if (err instanceof JobNotFoundError)
    return new ConnectError(err.message, Code.NotFound, undefined, undefined, err);
  // The job exists but its state forbids the call (cancel of a finished job): retrying
  // the same call cannot help, so not ABORTED or UNAVAILABLE.
  if (err instanceof JobStateError)
    return new ConnectError(err.message, Code.FailedPrecondition, undefined, undefined, err);
  // The owner's configuration forbids it (a priority above its maximum): no retry helps.
  if (err instanceof PermissionDeniedError)
    return new ConnectError(err.message, Code.PermissionDenied, undefined, undefined, err);
  // This owner's quota: the same call succeeds later, at the time RetryInfo says.
  if (err instanceof QuotaExceededError)
    return retryLater(err.message, Code.ResourceExhausted, err.retryAfterMs, err);
  // The whole service past capacity, or a job whose last run is still stopping: not the
  // caller's fault, and not for long.
  if (err instanceof RetryLaterError)
    return retryLater(err.message, Code.Unavailable, err.retryAfterMs, err);
  // The server runs without job history: no retry helps until an operator turns it on.
  if (err instanceof HistoryOffError)
    return new ConnectError(err.message, Code.FailedPrecondition, undefined, undefined, err);
  // PostgreSQL down or slow: only the history RPCs see it, and only for a while.
  if (err instanceof HistoryUnavailableError)
    return retryLater(err.message, Code.Unavailable, 1000, err);
  // Redis or S3 cannot serve it right now (down, failing over): the call may succeed
  // shortly or on another instance; core/redis-errors.ts says which errors those are.
  const retryAfterMs = unavailableRetryAfterMs(err);
  if (retryAfterMs !== undefined)
    return retryLater("storage is unavailable, retry shortly", Code.Unavailable, retryAfterMs, err);
  return undefined;
}

/**
 * What a caller is told when an RPC fails, on both ways in: domain errors mapped, the
 * unexpected logged with their cause and answered `internal error`. An error answer to
 * a Connect GET says `no-store`: the next poll may well succeed.
 */
export function rpcFailure(
  err: unknown,
  log: Logger,
  procedure: string,
  get = false,
): ConnectError {
  let mapped = toConnectError(err);
  if (mapped === undefined) {
    log.error({ rpc: procedure, err }, "unexpected error");
    mapped = new ConnectError("internal error", Code.Internal, undefined, undefined, err);
  } else if (
    mapped.code === Code.Unavailable &&
    mapped !== err &&
    !(err instanceof RetryLaterError)
  ) {
    // A ConnectError thrown on purpose (the shutdown) is not news, and neither is a full
    // queue turning callers away (it would flood the log).
    log.warn({ rpc: procedure, err: mapped.cause }, "backend unavailable");
  }
  if (!get) return mapped;
  const metadata = new Headers(mapped.metadata);
  metadata.set("cache-control", "no-store");
  const copy = new ConnectError(mapped.rawMessage, mapped.code, metadata, undefined, mapped.cause);
  copy.details = mapped.details;
  return copy;
}
