import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import {
  FileState,
  type Job,
  JobSchema,
  JobState,
  type WebhookDeliverySchema,
  WebhookState,
} from "../gen/downloads/v1/download_service_pb.js";
import type { FileStateName, JobRecord, JobStateName, WebhookStateName } from "./jobs.js";
import { percentOf } from "./jobs.js";
import type { PresignedResult } from "./storage.js";

// JobRecord (the domain model) -> the proto Job (the contract). Pure: the download URL
// is presigned by the caller, freshly on every read, and passed in. The API answers
// with it and the worker's webhooks post it, so both send the same JSON. The owner is
// never shown: callers only ever see their own jobs.

const JOB_STATE: Record<JobStateName, JobState> = {
  QUEUED: JobState.QUEUED,
  PROCESSING: JobState.PROCESSING,
  COMPLETED: JobState.COMPLETED,
  FAILED: JobState.FAILED,
  CANCELLED: JobState.CANCELLED,
};

const WEBHOOK_STATE: Record<WebhookStateName, WebhookState> = {
  PENDING: WebhookState.PENDING,
  DELIVERED: WebhookState.DELIVERED,
  FAILED: WebhookState.FAILED,
};

const FILE_STATE: Record<FileStateName, FileState> = {
  PENDING: FileState.PENDING,
  IN_PROGRESS: FileState.IN_PROGRESS,
  DONE: FileState.DONE,
  FAILED: FileState.FAILED,
};

/** int64 fields are bigint in protobuf-es; records may hold rates as fractions. */
function int64(n: number | undefined): bigint {
  return n === undefined || !Number.isFinite(n) || n <= 0 ? 0n : BigInt(Math.round(n));
}

/** Whether a completed job's result can be presigned: retention has not deleted it. */
export function hasLiveResult(rec: JobRecord): rec is JobRecord & { result: NonNullable<JobRecord["result"]> } {
  return rec.state === "COMPLETED" && rec.result !== undefined && rec.result.expired !== true;
}

function webhookOf(rec: JobRecord): MessageInitShape<typeof WebhookDeliverySchema> | undefined {
  const w = rec.webhook;
  if (rec.callbackUrl === undefined || w === undefined) return undefined;
  return {
    callbackUrl: rec.callbackUrl,
    state: WEBHOOK_STATE[w.state] ?? WebhookState.UNSPECIFIED,
    attempts: w.attempts,
    lastStatusCode: w.lastStatus,
    lastError: w.lastError ?? "",
    ...(w.lastAttemptAt !== undefined ? { lastAttemptTime: timestampFromMs(w.lastAttemptAt) } : {}),
    ...(w.deliveredAt !== undefined ? { deliveredTime: timestampFromMs(w.deliveredAt) } : {}),
  };
}

/** `download` is the presigned URL of a completed job's result; omitted otherwise. */
export function toProtoJob(rec: JobRecord, download?: PresignedResult): Job {
  const p = rec.progress;
  const webhook = webhookOf(rec);
  return create(JobSchema, {
    jobId: rec.id,
    state: JOB_STATE[rec.state] ?? JobState.UNSPECIFIED,
    fileIds: rec.fileIds,
    version: rec.version,
    attempts: rec.attempts,
    progress: {
      percent: percentOf(p),
      filesDone: p.filesDone,
      filesTotal: p.filesTotal,
      bytesDone: int64(p.bytesDone),
      bytesTotal: int64(p.bytesTotal),
      bytesPerSecond: int64(p.bytesPerSecond),
      ...(p.etaSeconds !== undefined ? { etaSeconds: Math.round(p.etaSeconds) } : {}),
    },
    files: rec.files.map((f) => ({
      fileId: f.fileId,
      state: FILE_STATE[f.state] ?? FileState.UNSPECIFIED,
      sizeBytes: int64(f.sizeBytes),
      bytesDone: int64(f.bytesDone),
      entryName: f.entryName,
    })),
    createTime: timestampFromMs(rec.createdAt),
    updateTime: timestampFromMs(rec.updatedAt),
    ...(rec.startedAt !== undefined ? { startTime: timestampFromMs(rec.startedAt) } : {}),
    ...(rec.endedAt !== undefined ? { endTime: timestampFromMs(rec.endedAt) } : {}),
    ...(rec.state === "COMPLETED" && rec.result !== undefined
      ? {
          result: {
            downloadUrl: download?.url ?? "",
            ...(download !== undefined ? { expireTime: timestampFromMs(download.expiresAt) } : {}),
            fileName: rec.result.fileName,
            sizeBytes: int64(rec.result.sizeBytes),
            sha256: rec.result.sha256,
            expired: rec.result.expired === true,
            ...(rec.result.expiresAt !== undefined ? { purgeTime: timestampFromMs(rec.result.expiresAt) } : {}),
          },
        }
      : {}),
    ...(rec.state === "FAILED" && rec.error !== undefined
      ? {
          error: {
            code: rec.error.code,
            message: rec.error.message,
            retryable: rec.error.retryable,
            missingFileIds: rec.error.missingFileIds ?? [],
          },
        }
      : {}),
    ...(webhook !== undefined ? { webhook } : {}),
  });
}
