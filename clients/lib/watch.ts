import { equals } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  type Job,
  JobState,
  type QueueEstimate,
  QueueEstimateSchema,
} from "../../gen/downloads/v1/download_service_pb.js";
import type { DownloadClient } from "./client.js";

// watchJob: every state of a job, through any proxy, with no gap and no duplicate.
//
// Streams are cut all the time in the real world (idle timeouts, hard request limits,
// deploys, a dead instance behind a load balancer). Each stream is opened with the last
// version seen as after_version, so the server sends only what is new, and the server
// answers at once (the snapshot, or a heartbeat when the caller is current): a stream
// that says nothing within a few seconds is being held back by a buffering proxy, and
// polling GetStatus is the only thing that will work there. The polls are long-polls:
// each names the version it has and asks the server to wait for the next one, so a
// buffering proxy costs about one request per change instead of one a second.

/** What happened on the way; for progress UIs, logs and tests. */
export type WatchEvent =
  /** A stream delivered its first message: streaming works. */
  | { type: "connected"; afterVersion: number }
  /** The server said the stream is alive; `version` is the job's version it knows. */
  | { type: "heartbeat"; version: number }
  /**
   * The stream ended or failed; the next one opens after `delayMs`. `error` is unset
   * when the server ended the stream cleanly (WATCH_MAX_STREAM_MS).
   */
  | { type: "reconnecting"; attempt: number; delayMs: number; error?: ConnectError }
  /** Streaming does not work here (for now): polling GetStatus instead. */
  | { type: "polling"; reason: ConnectError }
  /** One GetStatus answered while polling. */
  | { type: "poll"; version: number }
  /** Polling is over: trying a stream again. */
  | { type: "streaming" };

export interface WatchOptions {
  /** Stops the watch; the iterator then throws a ConnectError with Code.Canceled. */
  signal?: AbortSignal;
  /** The last version the caller has seen; only newer snapshots are yielded. */
  afterVersion?: number;
  /**
   * The snapshot the caller has (sets afterVersion to its version, and is the one
   * yielded again with a fresher estimate, see queueEstimates).
   */
  since?: Job;
  /**
   * While the job is queued, yield its last snapshot again (same version) each time its
   * queue estimate moves: the queue drains without the job changing. Off by default, so
   * that every snapshot yielded is a new version.
   */
  queueEstimates?: boolean;
  /**
   * How long a new stream may stay silent before it is taken for buffered by a proxy
   * and the watch falls back to polling. The server answers at once, so a few seconds.
   */
  firstMessageTimeoutMs?: number;
  /** An open stream silent this long (no job, no heartbeat) is taken for dead and reopened. */
  idleTimeoutMs?: number;
  /**
   * While polling, how long each GetStatus may wait for a change (a long-poll). The
   * server caps it (25 s by default); keep it below every proxy's idle timeout.
   * 0 polls plainly every pollIntervalMs.
   */
  longPollWaitMs?: number;
  /** Interval between two GetStatus calls while polling plainly (or with a server that does not wait). */
  pollIntervalMs?: number;
  /** While polling, how long before a stream is tried again (doubles while it keeps failing). */
  streamRetryMs?: number;
  /** First retry delay bound; doubles per failed attempt up to maxBackoffMs (full jitter). */
  baseBackoffMs?: number;
  maxBackoffMs?: number;
  /**
   * How long transient failures (UNAVAILABLE, connection refused or reset) may go on
   * without any answer from the server before the watch gives up with the last error.
   */
  maxRetryTimeMs?: number;
  onEvent?: (e: WatchEvent) => void;
}

const TERMINAL: ReadonlySet<JobState> = new Set([
  JobState.COMPLETED,
  JobState.FAILED,
  JobState.CANCELLED,
]);

export function isTerminalJob(job: Job): boolean {
  return TERMINAL.has(job.state);
}

/** Codes that retrying cannot fix: the caller has to act (fix the id, log in, ...). */
const FATAL: ReadonlySet<Code> = new Set([
  Code.NotFound,
  Code.InvalidArgument,
  Code.Unauthenticated,
  Code.PermissionDenied,
  Code.FailedPrecondition,
]);

/**
 * Codes that say "this endpoint does not stream": Unimplemented (HTTP 404 from a proxy
 * or a server without the method) and Internal (HTTP 400, or a body that is not Connect).
 */
const STREAM_REFUSED: ReadonlySet<Code> = new Set([Code.Unimplemented, Code.Internal]);

/** Streams in a row that fail before their first message, after which polling is tried. */
const SILENT_STREAMS_BEFORE_POLLING = 3;
/** While polling because streams kept failing for no clear reason, retry streaming soon. */
const UNCLEAR_FALLBACK_RETRY_MS = 5_000;
const MAX_STREAM_RETRY_MS = 5 * 60_000;

/**
 * Yields the job's snapshots with strictly increasing versions, ending with the
 * terminal one (COMPLETED, FAILED or CANCELLED); with `queueEstimates`, a queued job's
 * snapshot also comes again (same version) each time its queue estimate moves. Throws a ConnectError: at once for
 * NotFound, InvalidArgument, Unauthenticated, PermissionDenied; for transient trouble
 * only after maxRetryTimeMs without an answer; Canceled when `signal` aborts.
 */
export async function* watchJob(
  client: DownloadClient,
  jobId: string,
  opts: WatchOptions = {},
): AsyncGenerator<Job, void, undefined> {
  const signal = opts.signal;
  const firstMessageTimeoutMs = opts.firstMessageTimeoutMs ?? 5_000;
  const idleTimeoutMs = opts.idleTimeoutMs ?? 60_000;
  const pollIntervalMs = opts.pollIntervalMs ?? 1_000;
  const longPollWaitMs = opts.longPollWaitMs ?? 20_000;
  const streamRetryMs = opts.streamRetryMs ?? 30_000;
  const baseBackoffMs = opts.baseBackoffMs ?? 500;
  const maxBackoffMs = opts.maxBackoffMs ?? 10_000;
  const maxRetryTimeMs = opts.maxRetryTimeMs ?? 120_000;
  const emit = (e: WatchEvent) => opts.onEvent?.(e);

  /** Highest version the caller has (yielded here, or given as afterVersion). */
  let last = opts.since?.version ?? opts.afterVersion ?? 0;
  let yielded = false;
  /** The last snapshot yielded (or given), for a queued job's fresher estimate. */
  let lastJob: Job | undefined = opts.since;
  let mode = "stream" as "stream" | "poll";
  /** Failed attempts in a row, for the backoff. */
  let failures = 0;
  /** When the current run of failures began; undefined while things work. */
  let troubleSince: number | undefined;
  let silentStreams = 0;
  let pollUntil = 0;
  let nextStreamRetryMs = streamRetryMs;

  const aborted = () =>
    new ConnectError("watch aborted", Code.Canceled, undefined, undefined, signal?.reason);

  /** Whether to hand `job` to the caller: newer than what it has, or the end it must see. */
  const isNews = (job: Job) =>
    job.version > last || (!yielded && isTerminalJob(job) && job.version === last);

  /** The last snapshot with `estimate`, if the job is still queued there and it moved. */
  const reestimated = (version: number, estimate: QueueEstimate | undefined): Job | undefined => {
    if (opts.queueEstimates !== true) return undefined;
    if (lastJob === undefined || estimate === undefined) return undefined;
    if (lastJob.version !== version || lastJob.state !== JobState.QUEUED) return undefined;
    if (lastJob.estimate !== undefined && equals(QueueEstimateSchema, lastJob.estimate, estimate))
      return undefined;
    return { ...lastJob, estimate };
  };

  const healthy = () => {
    failures = 0;
    troubleSince = undefined;
  };

  /** Records a transient failure; throws once they have gone on too long. Returns the delay. */
  const backoff = (err: ConnectError): number => {
    const now = Date.now();
    troubleSince ??= now;
    if (now - troubleSince > maxRetryTimeMs) throw err;
    failures += 1;
    const bound = Math.min(maxBackoffMs, baseBackoffMs * 2 ** (failures - 1));
    return Math.round(Math.random() * bound);
  };

  const fallBackToPolling = (reason: ConnectError, clear: boolean) => {
    mode = "poll";
    pollUntil =
      Date.now() +
      (clear ? nextStreamRetryMs : Math.min(nextStreamRetryMs, UNCLEAR_FALLBACK_RETRY_MS));
    if (clear) nextStreamRetryMs = Math.min(MAX_STREAM_RETRY_MS, nextStreamRetryMs * 2);
    emit({ type: "polling", reason });
  };

  for (;;) {
    if (signal?.aborted) throw aborted();

    if (mode === "poll") {
      // Less than a second of the polling period left: a long-poll would not wait, so
      // try the stream now rather than spend a plain poll.
      if (longPollWaitMs > 0 && last > 0 && pollUntil - Date.now() < 1000) {
        mode = "stream";
        emit({ type: "streaming" });
        continue;
      }
      let job: Job | undefined;
      /** Whether the server waited for a change (a server before long-poll answers at once). */
      let waited = false;
      try {
        // Until the stream retry is due, at most: the poll then ends in time for it.
        // Without a version of our own there is nothing to wait past.
        const waitMs = last > 0 ? Math.max(0, Math.min(longPollWaitMs, pollUntil - Date.now())) : 0;
        const res = await client.getStatus(
          {
            jobId,
            afterVersion: last,
            ...(waitMs >= 1000 ? { wait: { seconds: BigInt(Math.floor(waitMs / 1000)) } } : {}),
          },
          signal !== undefined ? { signal } : {},
        );
        job = res.job;
        waited = res.wait !== undefined && (res.wait.seconds > 0n || res.wait.nanos > 0);
      } catch (e) {
        if (signal?.aborted) throw aborted();
        const err = ConnectError.from(e);
        // Polling is the last resort: a refusal here means nothing will work.
        if (FATAL.has(err.code) || err.code === Code.Unimplemented) throw err;
        await sleep(backoff(err), signal).catch(() => undefined);
        continue;
      }
      healthy();
      if (job === undefined)
        throw new ConnectError("GetStatus answered without a job", Code.Internal);
      emit({ type: "poll", version: job.version });
      if (isNews(job)) {
        last = job.version;
        yielded = true;
        lastJob = job;
        yield job;
      } else {
        const again = reestimated(job.version, job.estimate);
        if (again !== undefined) {
          lastJob = again;
          yield again;
        }
      }
      if (isTerminalJob(job) && job.version >= last) return;
      if (Date.now() >= pollUntil) {
        mode = "stream";
        emit({ type: "streaming" });
        continue;
      }
      // A long-poll answered because the job changed or the wait ended: ask again at once.
      if (!waited) await sleep(pollIntervalMs, signal).catch(() => undefined);
      continue;
    }

    // One stream: opened with after_version, ended by the server (terminal state, or
    // WATCH_MAX_STREAM_MS), by a failure, or by our own first-message / idle timer.
    const ctl = new AbortController();
    const onAbort = () => ctl.abort();
    signal?.addEventListener("abort", onAbort, { once: true });
    let timedOut: "first" | "idle" | undefined;
    let timer: ReturnType<typeof setTimeout> | undefined;
    const arm = (kind: "first" | "idle") => {
      clearTimeout(timer);
      timer = setTimeout(
        () => {
          timedOut = kind;
          ctl.abort();
        },
        kind === "first" ? firstMessageTimeoutMs : idleTimeoutMs,
      );
    };
    const openedAt = Date.now();
    let messages = 0;
    let jobsOnStream = 0;
    let resync = false;
    let failure: ConnectError | undefined;
    try {
      arm("first");
      for await (const msg of client.watchJob(
        { jobId, afterVersion: last },
        { signal: ctl.signal },
      )) {
        arm("idle");
        messages += 1;
        if (messages === 1) {
          healthy();
          silentStreams = 0;
          nextStreamRetryMs = streamRetryMs;
          emit({ type: "connected", afterVersion: last });
        }
        if (msg.event.case === "job") {
          const job = msg.event.value;
          jobsOnStream += 1;
          if (isNews(job)) {
            last = job.version;
            yielded = true;
            lastJob = job;
            yield job;
          }
          if (isTerminalJob(job) && job.version >= last) return;
        } else if (msg.event.case === "heartbeat") {
          emit({ type: "heartbeat", version: msg.event.value.version });
          const again = reestimated(msg.event.value.version, msg.event.value.estimate);
          if (again !== undefined) {
            lastJob = again;
            yield again;
          }
          // The server knows a version this stream never delivered: start over from ours.
          if (msg.event.value.version > last) {
            resync = true;
            break;
          }
        }
      }
    } catch (e) {
      if (signal?.aborted) throw aborted();
      failure =
        timedOut === "first"
          ? new ConnectError(
              `no message within ${firstMessageTimeoutMs} ms: a proxy may be buffering the stream`,
              Code.DeadlineExceeded,
            )
          : timedOut === "idle"
            ? new ConnectError(`stream silent for ${idleTimeoutMs} ms`, Code.DeadlineExceeded)
            : ConnectError.from(e);
      if (FATAL.has(failure.code)) throw failure;
    } finally {
      clearTimeout(timer);
      signal?.removeEventListener("abort", onAbort);
    }

    if (failure === undefined && messages > 0) {
      // A clean end without the terminal job: the server's WATCH_MAX_STREAM_MS, or a
      // stream that had nothing new for us because after_version was already the end.
      // Only GetStatus can tell the two apart when no job came on the stream.
      if (jobsOnStream === 0 && !resync) {
        let job: Job | undefined;
        try {
          job = (await client.getStatus({ jobId }, signal !== undefined ? { signal } : {})).job;
        } catch (e) {
          if (signal?.aborted) throw aborted();
          const err = ConnectError.from(e);
          if (FATAL.has(err.code)) throw err;
        }
        if (job !== undefined && isTerminalJob(job)) {
          if (isNews(job)) {
            last = job.version;
            yielded = true;
            yield job;
          }
          return;
        }
      }
      // Ending streams at once, again and again, is not a server's WATCH_MAX_STREAM_MS
      // but something in the way: do not spin on it.
      const delayMs =
        Date.now() - openedAt < 1_000
          ? backoff(new ConnectError("streams end at once", Code.Unavailable))
          : 0;
      emit({ type: "reconnecting", attempt: 0, delayMs });
      await sleep(delayMs, signal).catch(() => undefined);
      continue;
    }

    const err =
      failure ?? new ConnectError("stream ended before its first message", Code.Unavailable);
    if (messages === 0) {
      silentStreams += 1;
      if (timedOut === "first" || STREAM_REFUSED.has(err.code)) {
        fallBackToPolling(err, true);
        continue;
      }
      if (silentStreams >= SILENT_STREAMS_BEFORE_POLLING) {
        silentStreams = 0;
        fallBackToPolling(err, false);
        continue;
      }
    }
    // A stream that delivered something has proved the path works: come back at once
    // (the first retry is quick), later ones back off with full jitter.
    const delayMs = backoff(err);
    emit({ type: "reconnecting", attempt: failures, delayMs, error: err });
    await sleep(delayMs, signal).catch(() => undefined);
  }
}

/** Watches until the job ends and returns the terminal job (COMPLETED, FAILED or CANCELLED). */
export async function waitForJob(
  client: DownloadClient,
  jobId: string,
  opts: WatchOptions = {},
): Promise<Job> {
  let final: Job | undefined;
  for await (const job of watchJob(client, jobId, opts)) final = job;
  if (final === undefined || !isTerminalJob(final)) {
    throw new ConnectError("watch ended without a terminal job", Code.Internal);
  }
  return final;
}

function sleep(ms: number, signal: AbortSignal | undefined): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(signal.reason);
      return;
    }
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal?.reason);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}
