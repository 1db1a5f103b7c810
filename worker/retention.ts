import type { JobStore } from "../core/job-store.js";
import { markExpired } from "../core/job-transitions.js";
import { JobNotFoundError, type JobRecord, JobStateError } from "../core/jobs.js";
import { parseExpiryMember } from "../core/keys.js";
import type { Logger } from "../core/logger.js";
import type { Storage } from "../core/storage.js";

// Result retention. Every uploaded result object is registered in a sorted set by the
// time it is to be deleted (RESULT_TTL_SECONDS after completion), in the same step as the
// write that announces it (markCompleted), even when that write is refused: an object a
// cancel or another run overtook is deleted too. A BullMQ job scheduler runs this sweep
// in one worker at a time. Each entry is handled in an order that a crash at any point
// only repeats: delete the object, mark the job's result expired if the record names
// that object (the job stays COMPLETED, without a URL, and dedup no longer hands it
// out), then forget the entry.

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
    for (const member of due) {
      const { jobId, objectKey } = parseExpiryMember(member);
      let rec: JobRecord | undefined;
      try {
        rec = await store.get(jobId);
      } catch (err) {
        // The record is gone (its own TTL): the object still has to go.
        if (!(err instanceof JobNotFoundError)) throw err;
      }
      // An entry from before per-run objects names the job only: its object is the one
      // the record names, or the job's first-run key.
      const key = objectKey ?? rec?.result?.key ?? storage.resultKey(jobId);
      await storage.deleteResult(key);
      const result = rec?.result;
      if (rec?.state === "COMPLETED" && result?.key === key && result.expired !== true) {
        try {
          await markExpired(store, jobId, result);
        } catch (err) {
          if (!(err instanceof JobNotFoundError || err instanceof JobStateError)) throw err;
        }
      }
      await store.forgetResultExpiry(member);
      deleted += 1;
    }
    if (due.length < BATCH) break;
  }
  if (deleted > 0) log.info({ deleted }, "expired results deleted");
  return { deleted };
}
