import { Code, ConnectError } from "@connectrpc/connect";
import { useCallback, useEffect, useRef, useState } from "react";
import { type Job, JobState, type Progress } from "../../gen/downloads/v1/download_service_pb.js";
import type { DownloadClient } from "../lib/client.js";
import { type WatchEvent, type WatchOptions, watchJob } from "../lib/watch.js";

// useDownloadJob: a React view of watchJob. One watch per mounted (client, jobId): the
// effect's AbortController ends it on unmount or when either changes, so StrictMode's
// mount-unmount-mount leaves exactly one stream open. Nothing here knows about a page.

/**
 * How the hook is getting updates: over a stream, by polling GetStatus (a proxy that
 * buffers streams), (re)opening a stream (at first, or after a failure; `error` says why
 * when there was one), or not at all (no job id, or the watch has ended).
 */
export type Connection = "streaming" | "polling" | "reconnecting" | "idle";

export interface UseDownloadJobOptions
  extends Pick<
    WatchOptions,
    | "firstMessageTimeoutMs"
    | "idleTimeoutMs"
    | "pollIntervalMs"
    | "baseBackoffMs"
    | "maxBackoffMs"
    | "maxRetryTimeMs"
  > {
  /** Every WatchEvent, e.g. for logging. */
  onEvent?: (e: WatchEvent) => void;
  /** Called once when the job reaches COMPLETED, with that job (its result is set). */
  onComplete?: (job: Job) => void;
  /**
   * Called once when the job fails (FAILED: the error carries JobError's code and
   * message, and `job` is set), or when the watch gives up for good (the job is gone, the
   * token is refused, the service stayed unreachable). Not for a cancelled job, and not
   * for problems the watch is still retrying.
   */
  onError?: (error: ConnectError, job?: Job) => void;
}

/** JobError.code ("not_found", snake case) as a Connect code; Unknown for others. */
function codeOf(name: string): Code {
  const key = name.replace(/_([a-z])/g, (_m, c: string) => c.toUpperCase());
  const k = `${key.charAt(0).toUpperCase()}${key.slice(1)}` as keyof typeof Code;
  return typeof Code[k] === "number" ? (Code[k] as Code) : Code.Unknown;
}

export interface DownloadJob {
  /** The latest snapshot; undefined until the first arrives. */
  job: Job | undefined;
  state: JobState | undefined;
  progress: Progress | undefined;
  /**
   * The latest problem. While `connection` is not "idle" the watch is still retrying it
   * (cleared by the next answer); once "idle", it is final (the job is gone, the token
   * is refused, or the service stayed unreachable for maxRetryTimeMs).
   */
  error: ConnectError | undefined;
  connection: Connection;
  /** Cancels the job; rejects with a ConnectError (FailedPrecondition once it has ended). */
  cancel(): Promise<void>;
}

interface WatchState {
  /** Which watch this state belongs to, so a new job id or client never shows the old job. */
  client: DownloadClient | undefined;
  jobId: string | undefined;
  job: Job | undefined;
  error: ConnectError | undefined;
  connection: Connection;
}

const NONE: Omit<WatchState, "client" | "jobId"> = {
  job: undefined,
  error: undefined,
  connection: "idle",
};

export function useDownloadJob(
  client: DownloadClient,
  jobId: string | undefined,
  opts: UseDownloadJobOptions = {},
): DownloadJob {
  const id = jobId === "" ? undefined : jobId;
  const [watch, setWatch] = useState<WatchState>({ client: undefined, jobId: undefined, ...NONE });
  // Options are read when a watch starts; a new object on every render must not restart it.
  const optsRef = useRef(opts);
  useEffect(() => {
    optsRef.current = opts;
  });

  useEffect(() => {
    if (id === undefined) return;
    const ctl = new AbortController();
    const { onEvent, onComplete: _c, onError: _e, ...watchOpts } = optsRef.current;
    // The callbacks are read when called, so the latest render's are used; each fires once.
    let ended = false;
    const finish = (job: Job | undefined, error?: ConnectError) => {
      if (ended) return;
      ended = true;
      const o = optsRef.current;
      if (job?.state === JobState.COMPLETED) o.onComplete?.(job);
      else if (job?.state === JobState.FAILED)
        o.onError?.(
          new ConnectError(job.error?.message ?? "the job failed", codeOf(job.error?.code ?? "")),
          job,
        );
      else if (error !== undefined) o.onError?.(error);
    };
    const update = (f: (s: WatchState) => Partial<WatchState>) =>
      setWatch((prev) => {
        if (ctl.signal.aborted) return prev;
        const s: WatchState =
          prev.client === client && prev.jobId === id
            ? prev
            : { client, jobId: id, ...NONE, connection: "reconnecting" };
        return { ...s, ...f(s) };
      });

    const onWatchEvent = (e: WatchEvent) => {
      onEvent?.(e);
      switch (e.type) {
        case "connected":
        case "heartbeat":
          update(() => ({ connection: "streaming", error: undefined }));
          break;
        case "poll":
          update(() => ({ connection: "polling", error: undefined }));
          break;
        case "polling":
          // A proxy holding the stream back is not the user's problem; an earlier
          // failure, if any, stays shown until an answer arrives.
          update(() => ({ connection: "polling" }));
          break;
        case "reconnecting":
          // A clean end (the server's stream limit) is routine: stay "streaming".
          if (e.error !== undefined) update(() => ({ connection: "reconnecting", error: e.error }));
          break;
        case "streaming":
          break;
      }
    };

    void (async () => {
      try {
        for await (const job of watchJob(client, id, {
          // A queued job's place in the queue moves without a new version: show it.
          queueEstimates: true,
          ...watchOpts,
          signal: ctl.signal,
          onEvent: onWatchEvent,
        })) {
          update((s) => ({
            // cancel() may already have shown a newer version.
            job: s.job !== undefined && s.job.version > job.version ? s.job : job,
            error: undefined,
            connection: s.connection === "polling" ? "polling" : "streaming",
          }));
          if (job.state === JobState.COMPLETED || job.state === JobState.FAILED) finish(job);
        }
        update(() => ({ connection: "idle" }));
      } catch (err) {
        if (ctl.signal.aborted) return;
        const error = ConnectError.from(err);
        update(() => ({ connection: "idle", error }));
        finish(undefined, error);
      }
    })();
    return () => ctl.abort();
  }, [client, id]);

  const cancel = useCallback(async () => {
    if (id === undefined) throw new ConnectError("no job to cancel", Code.FailedPrecondition);
    const job = (await client.cancel({ jobId: id })).job;
    // The watch delivers the same change; showing it now makes the button feel instant.
    if (job === undefined) return;
    setWatch((s) =>
      s.client === client && s.jobId === id && (s.job === undefined || s.job.version < job.version)
        ? { ...s, job }
        : s,
    );
  }, [client, id]);

  const current: Omit<WatchState, "client" | "jobId"> =
    id === undefined
      ? NONE
      : watch.client === client && watch.jobId === id
        ? watch
        : { ...NONE, connection: "reconnecting" };
  return {
    job: current.job,
    state: current.job?.state,
    progress: current.job?.progress,
    error: current.error,
    connection: current.connection,
    cancel,
  };
}
