import { BackendUnavailableError } from "./jobs.js";

// Which failures mean "a backend (Redis or S3) cannot serve this right now, try again
// shortly" — in one place, so that connect-node and the lean transport answer
// the same code with the same retry delay. Redis trouble reaches us in many shapes: a
// socket error, an ioredis give-up, a reply of the server that is failing over, or all
// of those wrapped by the cluster client ("Too many Cluster redirections. Last error:
// ReplyError: CLUSTERDOWN ..."). Look at codes and names first; ioredis gives many of
// its errors only a fixed message.

/**
 * How long a caller should wait before retrying a call that failed this way. A Redis
 * Cluster promotes a replica in about cluster-node-timeout plus a second or two, a
 * Sentinel set-up in down-after-milliseconds plus the election: a second is short
 * enough not to keep a user waiting longer than the outage and long enough not to
 * hammer a backend that is busy recovering.
 */
export const BACKEND_RETRY_AFTER_MS = 1000;

/** Socket-level failures: the backend is unreachable right now. */
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

/**
 * Error replies of a Redis server that cannot take the command now but will once a
 * failover or a restart has finished: the cluster has no master for the slot
 * (CLUSTERDOWN), a slot is moving (TRYAGAIN, MOVED, ASK), the node was demoted
 * (READONLY), a replica lost its master (MASTERDOWN), min-replicas-to-write is not met
 * (NOREPLICAS), or the dataset is still loading from disk (LOADING).
 */
const TRANSIENT_REPLIES = [
  "CLUSTERDOWN",
  "TRYAGAIN",
  "MOVED",
  "ASK",
  "READONLY",
  "MASTERDOWN",
  "NOREPLICAS",
  "LOADING",
];
const TRANSIENT_REPLY = new RegExp(`^(?:${TRANSIENT_REPLIES.join("|")})\\b`);

/** ioredis errors that carry no code, only a fixed message (or its start). */
const CLIENT_DOWN_MESSAGES = [
  "Connection is closed.",
  "Stream isn't writeable and enableOfflineQueue options is false",
  "Command timed out",
  "Too many Cluster redirections.",
  "Cluster isn't ready and enableOfflineQueue options is false",
  "Cluster is disconnected.",
  "Cluster is disconnecting.",
  "None of startup nodes is available",
  "Failed to refresh slots cache.",
  "Node is disconnected",
  "Ready check failed",
  "All sentinels are unreachable",
  "Socket timeout.",
  "connect ETIMEDOUT",
  "Command aborted due to connection close",
];

/** Names of ioredis error classes that only ever mean the connection gave up. */
const CLIENT_DOWN_NAMES = new Set(["MaxRetriesPerRequestError", "ClusterAllFailedError"]);

/** True when `err` (or what it wraps) says Redis cannot serve the command right now. */
export function isRedisUnavailable(err: unknown, depth = 0): boolean {
  if (!(err instanceof Error) || depth > 4) return false;
  if (CLIENT_DOWN_NAMES.has(err.name)) return true;
  if (TRANSIENT_REPLY.test(err.message)) return true;
  if (CLIENT_DOWN_MESSAGES.some((m) => err.message.startsWith(m))) return true;
  const code = (err as { code?: unknown }).code;
  if (typeof code === "string" && NETWORK_CODES.has(code)) return true;
  // BullMQ and our own code wrap the client's error; Node wraps a failed
  // happy-eyeballs connect in an AggregateError.
  if (err instanceof AggregateError && err.errors.some((e) => isRedisUnavailable(e, depth + 1)))
    return true;
  return isRedisUnavailable(err.cause, depth + 1);
}

/** True when `err` is an answer of S3 (or the SDK's socket) that will likely pass. */
function isStorageUnavailable(err: unknown, depth = 0): boolean {
  if (!(err instanceof Error) || depth > 4) return false;
  // A 5xx or throttling answer, or a socket timeout of the SDK's own.
  const meta = (err as { $metadata?: { httpStatusCode?: number } }).$metadata;
  const status = meta?.httpStatusCode;
  if (status !== undefined && (status >= 500 || status === 429)) return true;
  if (err.name === "TimeoutError" || err.name === "RequestTimeout") return true;
  return isStorageUnavailable(err.cause, depth + 1);
}

/**
 * When `err` means a backend is unavailable for now: how long the caller should wait
 * before retrying (milliseconds). Undefined for anything else (a bug, bad input).
 */
export function unavailableRetryAfterMs(err: unknown): number | undefined {
  if (err instanceof BackendUnavailableError) return BACKEND_RETRY_AFTER_MS;
  if (isRedisUnavailable(err) || isStorageUnavailable(err)) return BACKEND_RETRY_AFTER_MS;
  return undefined;
}
