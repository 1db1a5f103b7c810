import { S3ServiceException } from "@aws-sdk/client-s3";

// One classification of S3 failures, for every caller. Permanent ones (the object is
// gone, we may not read it, it is archived, it changed under us) fail the job at once:
// retrying cannot help and only delays the answer. Transient ones (throttling, server
// errors, resets, timeouts, stalls) are retried with backoff; `throttled` tells the
// reader to read fewer objects at once.

export interface S3Failure {
  permanent: boolean;
  /** S3 asked us to slow down (503 SlowDown and its relatives). */
  throttled: boolean;
  /** The job error code (a Connect code name in snake case) when permanent. */
  code: "not_found" | "permission_denied" | "failed_precondition" | "unavailable";
  /** What happened, for a message that names the file. */
  reason: string;
}

/** A body that sent nothing for the stall deadline (S3_STALL_MS). */
export class StallError extends Error {
  override name = "StallError";
}

/** The object's ETag differs from the one its first read (or its HEAD) saw. */
export class ChangedObjectError extends Error {
  override name = "ChangedObjectError";
}

/**
 * A source file could not be read. Carries the job error the processor records: a
 * permanent one fails the job at once; a transient one is retried by the queue.
 */
export class SourceError extends Error {
  override name = "SourceError";
  constructor(
    readonly fileId: number,
    readonly code: string,
    readonly retryable: boolean,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

const THROTTLED = new Set([
  "SlowDown",
  "Throttling",
  "ThrottlingException",
  "RequestLimitExceeded",
  "TooManyRequestsException",
]);
const DENIED = new Set([
  "AccessDenied",
  "InvalidAccessKeyId",
  "SignatureDoesNotMatch",
  "AllAccessDisabled",
  "AccountProblem",
  "ExpiredToken",
  "InvalidToken",
]);
const MISSING = new Set(["NoSuchKey", "NotFound", "NoSuchBucket"]);
const NETWORK = new Set([
  "ECONNRESET",
  "ECONNREFUSED",
  "EPIPE",
  "ETIMEDOUT",
  "ECONNABORTED",
  "EHOSTUNREACH",
  "ENETUNREACH",
  "EAI_AGAIN",
  "ERR_STREAM_PREMATURE_CLOSE",
  "UND_ERR_SOCKET",
]);

export function classifyS3Error(err: unknown): S3Failure {
  if (err instanceof ChangedObjectError) {
    return {
      permanent: true,
      throttled: false,
      code: "failed_precondition",
      reason: "changed while it was being read",
    };
  }
  if (err instanceof StallError) {
    return { permanent: false, throttled: false, code: "unavailable", reason: err.message };
  }
  if (err instanceof S3ServiceException) {
    const status = err.$metadata.httpStatusCode ?? 0;
    // A HEAD's error has no body to name it: the status says what happened.
    const name = err.name.startsWith("Unknown") ? `HTTP ${status}` : err.name;
    if (THROTTLED.has(name) || status === 429) {
      return {
        permanent: false,
        throttled: true,
        code: "unavailable",
        reason: `throttled by S3 (${name})`,
      };
    }
    if (name === "InvalidObjectState") {
      return {
        permanent: true,
        throttled: false,
        code: "failed_precondition",
        reason: "is archived (restore it from its storage class first)",
      };
    }
    if (MISSING.has(name) || status === 404) {
      return {
        permanent: true,
        throttled: false,
        code: "not_found",
        reason: "does not exist in the source bucket",
      };
    }
    if (DENIED.has(name) || status === 403) {
      return {
        permanent: true,
        throttled: false,
        code: "permission_denied",
        reason: `may not be read with the service's credentials (${name})`,
      };
    }
    if (
      name === "PreconditionFailed" ||
      status === 412 ||
      name === "InvalidRange" ||
      status === 416
    ) {
      return {
        permanent: true,
        throttled: false,
        code: "failed_precondition",
        reason: "changed while it was being read",
      };
    }
    if (status === 503) {
      // 503 without SlowDown is still S3 shedding load.
      return {
        permanent: false,
        throttled: true,
        code: "unavailable",
        reason: `S3 unavailable (${name})`,
      };
    }
    if (status >= 500 || status === 408 || status === 0) {
      return {
        permanent: false,
        throttled: false,
        code: "unavailable",
        reason: `S3 error ${status} (${name})`,
      };
    }
    return {
      permanent: true,
      throttled: false,
      code: "failed_precondition",
      reason: `refused by S3 (${status} ${name})`,
    };
  }
  const e = err as { name?: string; code?: string; message?: string } | undefined;
  if (e?.name === "TimeoutError" || (e?.code !== undefined && NETWORK.has(e.code))) {
    return {
      permanent: false,
      throttled: false,
      code: "unavailable",
      reason: e.message ?? e.code ?? "network error",
    };
  }
  // Anything else (socket hang up, aborted bodies, unknown errors): worth another try.
  return {
    permanent: false,
    throttled: false,
    code: "unavailable",
    reason: e?.message ?? String(err),
  };
}
