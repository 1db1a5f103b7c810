import type { Duration } from "@bufbuild/protobuf/wkt";
import { InvalidInputError, isTerminal, type JobRecord } from "../../core/jobs.js";
import type { WatchHub } from "../watch-hub.js";

// GetStatus with a wait (AIP-151's WaitOperation, folded into the poll): the caller
// names the version it has, and the answer comes as soon as the job passes it, or with
// the job unchanged when the wait ends. The change is learnt from the watch hub (one
// Redis subscription per process, as WatchJob), never by polling Redis.

/** The wait a request asked for, as applied. */
export interface WaitPlan {
  /** What the server waits at most; 0 answers at once. */
  ms: number;
  /** Set when the asked wait was above the cap. */
  notice?: string;
}

function seconds(ms: number): string {
  return `${Number((ms / 1000).toFixed(3))} s`;
}

/**
 * Reads GetStatusRequest.wait: negative is the caller's error, above the cap is clamped.
 * `budgetMs` is the cap, or less when the caller's own deadline comes sooner.
 */
export function waitPlan(wait: Duration | undefined, budgetMs: number, capMs = budgetMs): WaitPlan {
  if (wait === undefined) return { ms: 0 };
  const ms = Number(wait.seconds) * 1000 + Math.floor(wait.nanos / 1_000_000);
  if (ms < 0 || wait.nanos < 0)
    throw new InvalidInputError(
      `wait must not be negative (got ${seconds(ms)}); leave it unset to answer at once`,
    );
  if (ms <= budgetMs) return { ms };
  const ms2 = Math.floor(budgetMs);
  return {
    ms: ms2,
    notice:
      ms > capMs
        ? `wait of ${seconds(ms)} is above the ${seconds(capMs)} cap; waited at most ${seconds(ms2)}`
        : `wait of ${seconds(ms)} would outlast the call's deadline; waited at most ${seconds(ms2)}`,
  };
}

/**
 * `rec` if it is already newer than `afterVersion` (or terminal), else the first record
 * of the job with a greater version, or the latest known one once `ms` have passed or
 * `signal` aborts (the caller went away). Errors of the hub (events connection down,
 * server shutting down) are the caller's: a long-poll that could see no change must not
 * pretend nothing changed.
 */
export async function waitForChange(
  hub: WatchHub,
  rec: JobRecord,
  afterVersion: number,
  ms: number,
  signal: AbortSignal,
  owner: string,
): Promise<JobRecord> {
  if (ms <= 0 || rec.version > afterVersion || isTerminal(rec.state) || signal.aborted) return rec;
  const stop = new AbortController();
  const onAbort = () => stop.abort();
  signal.addEventListener("abort", onAbort, { once: true });
  const timer = setTimeout(onAbort, ms);
  try {
    // The hub subscribes before reading its snapshot: a change made since `rec` was read
    // comes as the snapshot; one made later comes as an event.
    for await (const ev of hub.watch(rec.id, afterVersion, stop.signal, owner)) {
      if (ev.job !== undefined && ev.job.version > afterVersion) return ev.job;
    }
    return rec;
  } finally {
    clearTimeout(timer);
    signal.removeEventListener("abort", onAbort);
  }
}
