import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import type { ServiceImpl } from "@connectrpc/connect";
import type { JobService } from "../core/job-service.js";
import { hasLiveResult, INITIATE_OUTCOME, toProtoJob } from "../core/job-to-proto.js";
import { type JobRecord, parseJobId } from "../core/jobs.js";
import type { PresignedResult } from "../core/storage.js";
import type { DownloadService, Job } from "../gen/downloads/v1/download_service_pb.js";
import { ownerOf } from "./auth.js";
import type { WatchHub } from "./watch-hub.js";

// The handlers: parse nothing, know no Redis, BullMQ or S3. Domain errors propagate and
// the interceptor (rpc-interceptor.ts) turns them into Connect codes.

export interface DownloadServiceDeps {
  jobs: JobService;
  hub: WatchHub;
  /** Presigns a result object for the public endpoint (core/storage.ts). */
  presigner: { presignResult(key: string, fileName: string): Promise<PresignedResult> };
}

export function createDownloadService(
  deps: DownloadServiceDeps,
): ServiceImpl<typeof DownloadService> {
  /** A completed job's URL is presigned on every read: stored URLs expire. */
  const present = async (rec: JobRecord): Promise<Job> => {
    if (!hasLiveResult(rec)) return toProtoJob(rec);
    return toProtoJob(rec, await deps.presigner.presignResult(rec.result.key, rec.result.fileName));
  };

  // One published record reaches every watcher of its job as the same object: convert
  // (and presign) it once, not once per stream.
  const shared = new WeakMap<JobRecord, Promise<Job>>();
  const presentShared = (rec: JobRecord): Promise<Job> => {
    let job = shared.get(rec);
    if (job === undefined) {
      job = present(rec);
      shared.set(rec, job);
    }
    return job;
  };

  return {
    async initiate(req, ctx) {
      const { job, outcome } = await deps.jobs.initiate(ownerOf(ctx), {
        fileIds: req.fileIds,
        requestId: req.requestId,
        idempotencyKey: ctx.requestHeader.get("idempotency-key"),
        callbackUrl: req.callbackUrl,
      });
      return { job: await present(job), outcome: INITIATE_OUTCOME[outcome] };
    },

    async getStatus(req, ctx) {
      return { job: await present(await deps.jobs.get(ownerOf(ctx), req.jobId)) };
    },

    async *watchJob(req, ctx) {
      const events = deps.hub.watch(
        parseJobId(req.jobId),
        req.afterVersion,
        ctx.signal,
        ownerOf(ctx),
      );
      for await (const ev of events) {
        if (ev.job !== undefined) {
          yield { event: { case: "job", value: await presentShared(ev.job) } };
        } else {
          yield {
            event: {
              case: "heartbeat",
              value: { time: timestampFromMs(ev.heartbeat.time), version: ev.heartbeat.version },
            },
          };
        }
      }
    },

    async cancel(req, ctx) {
      return { job: await present(await deps.jobs.cancel(ownerOf(ctx), req.jobId)) };
    },
  };
}
