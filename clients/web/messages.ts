import { Code, type ConnectError } from "@connectrpc/connect";
import { type JobError, JobState } from "../../gen/downloads/v1/download_service_pb.js";

// What the page says when something goes wrong, in words for the person using it. Codes
// decide the words; the server's own message is shown only where it says what to fix
// (invalid input), never a stack of transport details.

export type ErrorContext = "start" | "watch" | "cancel" | "download";

/** fetch rejects with a TypeError when nothing answers; Connect reports that as Unknown. */
export function isNetworkError(err: ConnectError): boolean {
  return err.code === Code.Unknown && err.cause instanceof TypeError;
}

/** Whether retrying can fix it, so the page keeps trying rather than giving up. */
export function isTransient(err: ConnectError): boolean {
  return err.code === Code.Unavailable || err.code === Code.DeadlineExceeded || isNetworkError(err);
}

export function describeError(err: ConnectError, ctx: ErrorContext, retrying: boolean): string {
  if (isNetworkError(err) || err.code === Code.Unavailable) {
    return retrying
      ? "The service is unreachable; retrying…"
      : "The service is unreachable. Check your connection and try again.";
  }
  switch (err.code) {
    case Code.NotFound:
      return ctx === "start"
        ? "Some of the files no longer exist."
        : "This job no longer exists. Finished jobs are kept for a limited time.";
    case Code.Unauthenticated:
      return "This service needs an access token. Enter it under “Access token” and press “Use token”.";
    case Code.PermissionDenied:
      return "Your access token does not allow this. Check the token under “Access token”.";
    case Code.ResourceExhausted:
      return ctx === "start"
        ? "Too many downloads at once. Wait a moment, or pick fewer files, and try again."
        : "The service is busy. Wait a moment and try again.";
    case Code.InvalidArgument:
      // The server's messages for bad input say what to change ("at most 100 files").
      return `The request was not accepted: ${err.rawMessage}`;
    case Code.FailedPrecondition:
      return ctx === "cancel"
        ? "The job had already finished, so there was nothing to cancel."
        : "That is not possible for this job any more.";
    case Code.DeadlineExceeded:
      return retrying
        ? "The service is slow to answer; retrying…"
        : "The service took too long to answer. Try again.";
    case Code.Canceled:
      return "Stopped.";
    default:
      return "Something went wrong on the server. Try again in a moment.";
  }
}

/** Why a job failed (its JobError), for the job panel. */
export function describeJobError(error: JobError | undefined): string {
  if (error === undefined) return "The job failed.";
  if (error.code === "not_found") {
    const ids = error.missingFileIds.join(", ");
    return ids === "" ? "Some files do not exist." : `These files do not exist: ${ids}.`;
  }
  if (error.code === "unavailable") {
    return "Storage was unavailable while preparing the download. Starting it again may work.";
  }
  return error.retryable ? `${error.message} Starting it again may work.` : error.message;
}

const STATE_LABELS: Record<JobState, string> = {
  [JobState.UNSPECIFIED]: "Unknown",
  [JobState.QUEUED]: "Queued",
  [JobState.PROCESSING]: "Preparing",
  [JobState.COMPLETED]: "Ready",
  [JobState.FAILED]: "Failed",
  [JobState.CANCELLED]: "Cancelled",
};

export function stateLabel(state: JobState): string {
  return STATE_LABELS[state];
}

/** Names as stored in localStorage: stable across contract renumbering. */
export function stateName(state: JobState): string {
  return JobState[state];
}

export function stateFromName(name: string): JobState | undefined {
  const v = (JobState as unknown as Record<string, JobState | undefined>)[name];
  return typeof v === "number" ? v : undefined;
}
