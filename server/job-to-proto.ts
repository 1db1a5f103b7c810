import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import type { JobRecord, JobStateName, FileStateName } from "../core/jobs.js";
import { percentOf } from "../core/jobs.js";
import type { PresignedResult } from "../core/storage.js";
import { FileState, type Job, JobSchema, JobState } from "../gen/downloads/v1/download_service_pb.js";

// JobRecord (the domain model) -> the proto Job (the contract). Pure: the download URL
// is presigned by the caller, freshly on every read, and passed in.

const JOB_STATE: Record<JobStateName, JobState> = {
  QUEUED: JobState.QUEUED,
  PROCESSING: JobState.PROCESSING,
  COMPLETED: JobState.COMPLETED,
  FAILED: JobState.FAILED,
  CANCELLED: JobState.CANCELLED,
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

/** `download` is the presigned URL of a completed job's result; omitted otherwise. */
export function toProtoJob(rec: JobRecord, download?: PresignedResult): Job {
  const p = rec.progress;
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
  });
}
