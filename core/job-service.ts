import type { Queue } from "bullmq";
import type { RedisClient } from "./redis.js";
import type { JobStore } from "./job-store.js";
import {
  type JobRecord,
  JobStateError,
  newJobId,
  parseFileIds,
  parseJobId,
} from "./jobs.js";
import type { BundleJobData } from "./queue.js";

// The domain operations behind the RPCs. Handlers parse nothing and know no Redis:
// they call these and map the domain errors to Connect codes.

export interface JobServiceDeps {
  store: JobStore;
  queue: Queue<BundleJobData>;
  /** Command connection used to publish cancel requests to workers. */
  redis: RedisClient;
  maxFilesPerJob: number;
}

export class JobService {
  constructor(private readonly deps: JobServiceDeps) {}

  get store(): JobStore {
    return this.deps.store;
  }

  async initiate(rawFileIds: readonly number[]): Promise<JobRecord> {
    const fileIds = parseFileIds(rawFileIds, this.deps.maxFilesPerJob);
    const id = newJobId();
    const rec = await this.deps.store.create(id, fileIds);
    await this.deps.queue.add("bundle", { jobId: id, fileIds }, { jobId: id });
    return rec;
  }

  async get(rawJobId: string): Promise<JobRecord> {
    return this.deps.store.get(parseJobId(rawJobId));
  }

  /**
   * Queued or running -> CANCELLED at once. A queued job is removed from the queue (and a
   * worker that races to it sees the state and skips it); a running one is told to stop
   * through Redis, whichever process runs it. Idempotent on a cancelled job.
   */
  async cancel(rawJobId: string): Promise<JobRecord> {
    const id = parseJobId(rawJobId);
    let rec: JobRecord;
    try {
      rec = await this.deps.store.update(
        id,
        { state: "CANCELLED", endedAt: Date.now() },
        { from: ["QUEUED", "PROCESSING"] },
      );
    } catch (err) {
      if (err instanceof JobStateError && err.state === "CANCELLED") return this.deps.store.get(id);
      if (err instanceof JobStateError) {
        throw new JobStateError(id, err.state, `job is already ${err.state.toLowerCase()}: only queued or running jobs can be cancelled`);
      }
      throw err;
    }
    await this.deps.redis.publish(this.deps.store.cancelChannel, id);
    // Removing a waiting job frees its slot; on an active job this is a no-op (the worker
    // handles that case through the cancel message and the state check).
    await this.deps.queue.remove(id).catch(() => 0);
    return rec;
  }
}
