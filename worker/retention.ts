import type { JobStore } from "../core/job-store.js";
import { JobNotFoundError, type JobRecord, JobStateError } from "../core/jobs.js";
import type { Logger } from "../core/logger.js";
import type { Storage } from "../core/storage.js";

// Result retention. A worker registers each result object in a sorted set by the time
// it is to be deleted (RESULT_TTL_SECONDS after completion) before it marks the job
// COMPLETED; a BullMQ job scheduler runs this sweep in one worker at a time. Each entry
// is handled in an order that a crash at any point only repeats: delete the object,
// mark the job's result expired (the job stays COMPLETED, without a URL, and dedup no
// longer hands it out), then forget the entry.

const BATCH = 200;

export interface SweepResult {
  deleted: number;
}

export async function sweepExpiredResults(
  deps: { store: JobStore; storage: Pick<Storage, "deleteResult" | "resultKey">; log: Logger },
  now = Date.now(),
): Promise<SweepResult> {
  const { store, storage, log } = deps;
  let deleted = 0;
  for (;;) {
    const due = await store.dueResultExpiries(now, BATCH);
    for (const jobId of due) {
      let key = storage.resultKey(jobId);
      let rec: JobRecord | undefined;
      try {
        rec = await store.get(jobId);
        key = rec.result?.key ?? key;
      } catch (err) {
        // The record is gone (its own TTL): the object still has to go.
        if (!(err instanceof JobNotFoundError)) throw err;
      }
      await storage.deleteResult(key);
      if (rec?.state === "COMPLETED" && rec.result !== undefined && rec.result.expired !== true) {
        try {
          await store.update(
            jobId,
            { result: { ...rec.result, expired: true } },
            { from: ["COMPLETED"] },
          );
        } catch (err) {
          if (!(err instanceof JobNotFoundError || err instanceof JobStateError)) throw err;
        }
      }
      await store.forgetResultExpiry(jobId);
      deleted += 1;
    }
    if (due.length < BATCH) break;
  }
  if (deleted > 0) log.info({ deleted }, "expired results deleted");
  return { deleted };
}
