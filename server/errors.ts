import { create } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  BackendUnavailableError,
  InvalidInputError,
  JobNotFoundError,
  JobStateError,
  OverloadedError,
  QuotaExceededError,
} from "../core/jobs.js";
import { RetryInfoSchema } from "../gen/google/rpc/error_details_pb.js";

// Domain error -> Connect code, in one place. connect-node's connectErrorFromNodeReason
// is the model: look at what the error is, never at its message where a type or code
// says the same.

/** Socket-level failures of Redis or S3: the backend is unreachable right now. */
const NETWORK_CODES = new Set([
  "ECONNREFUSED",
  "ECONNRESET",
  "ETIMEDOUT",
  "EPIPE",
  "EHOSTUNREACH",
  "ENETUNREACH",
  "ENOTFOUND",
  "EAI_AGAIN",
  "ECONNABORTED",
]);

/** ioredis errors that carry no code, only these fixed messages. */
const REDIS_DOWN_MESSAGES = new Set([
  "Connection is closed.",
  "Stream isn't writeable and enableOfflineQueue options is false",
]);

function isBackendDown(err: unknown, depth = 0): boolean {
  if (!(err instanceof Error) || depth > 4) return false;
  if (err instanceof BackendUnavailableError) return true;
  // ioredis gave up on a command after its retries (the API fails fast while Redis is down).
  if (err.name === "MaxRetriesPerRequestError") return true;
  if (REDIS_DOWN_MESSAGES.has(err.message)) return true;
  // Redis restarting from its append-only file answers LOADING until the data is back.
  if (err.message.startsWith("LOADING ")) return true;
  const code = (err as { code?: unknown }).code;
  if (typeof code === "string" && NETWORK_CODES.has(code)) return true;
  // The AWS SDK: a 5xx or throttling answer from S3, or a socket timeout of its own.
  const meta = (err as { $metadata?: { httpStatusCode?: number } }).$metadata;
  if (
    meta?.httpStatusCode !== undefined &&
    (meta.httpStatusCode >= 500 || meta.httpStatusCode === 429)
  )
    return true;
  if (err.name === "TimeoutError" || err.name === "RequestTimeout") return true;
  // Node wraps a failed happy-eyeballs connect in an AggregateError; libraries wrap causes.
  if (err instanceof AggregateError && err.errors.some((e) => isBackendDown(e, depth + 1)))
    return true;
  return isBackendDown(err.cause, depth + 1);
}

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
  // This owner's quota: the same call succeeds later, at the time RetryInfo says.
  if (err instanceof QuotaExceededError)
    return retryLater(err.message, Code.ResourceExhausted, err.retryAfterMs, err);
  // The whole service is past capacity: not the caller's fault, and not for long.
  if (err instanceof OverloadedError)
    return retryLater(err.message, Code.Unavailable, err.retryAfterMs, err);
  // Redis or S3 is unreachable: the call may succeed later or on another instance.
  if (isBackendDown(err)) {
    return new ConnectError(
      "storage is unavailable, retry shortly",
      Code.Unavailable,
      undefined,
      undefined,
      err,
    );
  }
  return undefined;
}
