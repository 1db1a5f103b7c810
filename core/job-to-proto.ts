import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import {
  FileState,
  InitiateOutcome,
  type Job,
  JobSchema,
  JobState,
  type WebhookDeliverySchema,
  WebhookState,
} from "../gen/downloads/v1/download_service_pb.js";
import type { AdmissionOutcome } from "./admission.js";
import type { JobEstimate } from "./forecast.js";
import type { FileStateName, JobRecord, JobStateName, WebhookStateName } from "./jobs.js";
import { percentOf } from "./jobs.js";
import type { PresignedResult } from "./storage.js";

// JobRecord (the domain model) -> the proto Job (the contract). Pure: the download URL
// is presigned by the caller, freshly on every read, and passed in. The API answers
// with it and the worker's webhooks post it, so both send the same JSON. The owner is
// never shown: callers only ever see their own jobs.

/** A record's state as the contract names it (also used by the history RPCs). */
export const JOB_STATE: Readonly<Record<JobStateName, JobState>> = {
  QUEUED: JobState.QUEUED,
  PROCESSING: JobState.PROCESSING,
  COMPLETED: JobState.COMPLETED,
  FAILED: JobState.FAILED,
  CANCELLED: JobState.CANCELLED,
};

/** How Initiate arrived at its job, as the contract names it. */
export const INITIATE_OUTCOME: Record<AdmissionOutcome, InitiateOutcome> = {
  created: InitiateOutcome.CREATED,
  replayed: InitiateOutcome.REPLAYED,
  in_flight: InitiateOutcome.IN_FLIGHT,
  reused_result: InitiateOutcome.REUSED_RESULT,
};

/** The outcome's name in protobuf JSON ("INITIATE_OUTCOME_CREATED"). */
export function initiateOutcomeJson(outcome: AdmissionOutcome): string {
  return `INITIATE_OUTCOME_${InitiateOutcome[INITIATE_OUTCOME[outcome]]}`;
}

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
export function hasLiveResult<T extends Pick<JobRecord, "state" | "result">>(
  rec: T,
): rec is T & { result: NonNullable<JobRecord["result"]> } {
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

/**
 * Whether the job stopped without finishing (cancelled or failed): nothing is read any
 * more, so no file is in progress and there is no speed and no ETA, whatever the last
 * progress write of the run said (a run's writes after the cancel are refused, so the
 * record keeps the last one made before it).
 */
function stopped(rec: JobRecord): boolean {
  return rec.state === "CANCELLED" || rec.state === "FAILED";
}

/** A file's state as shown: one being read when the job stopped is not in any ZIP. */
function shownFileState(rec: JobRecord, state: FileStateName): FileStateName {
  return state === "IN_PROGRESS" && stopped(rec) ? "PENDING" : state;
}

/** The record's progress as shown: a stopped job has no speed and no ETA. */
function shownProgress(rec: JobRecord): JobRecord["progress"] {
  const p = rec.progress;
  if (!stopped(rec) || (p.bytesPerSecond === 0 && p.etaSeconds === undefined)) return p;
  const { etaSeconds: _eta, ...rest } = p;
  return { ...rest, bytesPerSecond: 0 };
}

/** What a job's answer carries beyond its record: made by the caller at each read. */
export interface JobExtras {
  /** The stable link of a completed job (core/download-link.ts). */
  linkUrl?: string | undefined;
  /** Queue position and predicted times of a queued or running job (core/forecast.ts). */
  estimate?: JobEstimate | undefined;
}

/** A job's estimate as the QueueEstimate message (in Job.estimate and Heartbeat.estimate). */
export function toProtoEstimate(e: JobEstimate) {
  return {
    position: e.position,
    ...(e.predictedStartAt !== undefined
      ? { predictedStartTime: timestampFromMs(e.predictedStartAt) }
      : {}),
    ...(e.predictedEndAt !== undefined
      ? { predictedEndTime: timestampFromMs(e.predictedEndAt) }
      : {}),
    runningJobs: e.runningJobs,
    bytesPerSecond: int64(e.bytesPerSecond),
    samples: e.samples,
  };
}

/** `download` is the presigned URL of a completed job's result; omitted otherwise. */
export function toProtoJob(
  rec: JobRecord,
  download?: PresignedResult,
  extras: JobExtras = {},
): Job {
  const p = shownProgress(rec);
  const webhook = webhookOf(rec);
  return create(JobSchema, {
    jobId: rec.id,
    state: JOB_STATE[rec.state] ?? JobState.UNSPECIFIED,
    fileIds: rec.fileIds,
    version: rec.version,
    attempts: rec.attempts,
    priority: rec.priority ?? 0,
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
      state: FILE_STATE[shownFileState(rec, f.state)] ?? FileState.UNSPECIFIED,
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
            ...(rec.result.expiresAt !== undefined
              ? { purgeTime: timestampFromMs(rec.result.expiresAt) }
              : {}),
            linkUrl: extras.linkUrl ?? "",
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
    ...(rec.labels !== undefined ? { labels: { ...rec.labels } } : {}),
    ...(extras.estimate !== undefined ? { estimate: toProtoEstimate(extras.estimate) } : {}),
  });
}

// The same Job as protobuf JSON (what toJsonString(JobSchema, toProtoJob(rec)) writes),
// built as a plain object for JSON.stringify: fields in declaration order, defaults
// left out, 64-bit integers as strings, enums by name, timestamps in RFC 3339. The
// reflective writer of protobuf-es (with create and toProtoJob before it) was the
// largest share of what a watched job's messages cost the API; test/job-json.test.ts
// checks both writers agree on every kind of record.

type Json = Record<string, unknown>;

/** Sets `key` unless `value` is its field's default (0, "", false, empty, undefined). */
function put(out: Json, key: string, value: unknown): void {
  if (value === undefined || value === 0 || value === "" || value === false) return;
  if (Array.isArray(value) && value.length === 0) return;
  out[key] = value;
}

/** An int64 as protobuf JSON writes it ("123"), or undefined for the default 0. */
function int64Json(n: number | undefined): string | undefined {
  const v = int64(n);
  return v === 0n ? undefined : v.toString();
}

/** Date and time of day ("2026-12-02T17:30:05") by whole second since the epoch. */
const secondTexts = new Map<number, string>();

/**
 * google.protobuf.Timestamp of a time in ms: fractional seconds only when there are any.
 * The text up to the second is kept: a job update writes three or four times, most of
 * them in seconds already written (its creation, its start, the other jobs' updates of
 * the same second), and `Date#toISOString` was 3 % of the API's time in the watch
 * fan-out.
 */
function timeJson(ms: number): string {
  const t = Math.trunc(ms);
  const second = Math.floor(t / 1000);
  let text = secondTexts.get(second);
  if (text === undefined) {
    if (secondTexts.size >= 4096) secondTexts.clear();
    text = new Date(second * 1000).toISOString().slice(0, 19);
    secondTexts.set(second, text);
  }
  const milli = t - second * 1000;
  return milli === 0 ? `${text}Z` : `${text}.${String(milli).padStart(3, "0")}Z`;
}

function enumName<T extends string>(
  prefix: string,
  value: T | undefined,
  known: Record<T, unknown>,
): string | undefined {
  return value !== undefined && value in known ? `${prefix}${value}` : undefined;
}

export function toJobJson(
  rec: JobRecord,
  download?: PresignedResult,
  extras: JobExtras = {},
): Json {
  const p = shownProgress(rec);
  const out: Json = {};
  put(out, "jobId", rec.id);
  put(out, "state", enumName("JOB_STATE_", rec.state, JOB_STATE));
  put(out, "fileIds", rec.fileIds);
  const progress: Json = {};
  put(progress, "percent", percentOf(p));
  put(progress, "filesDone", p.filesDone);
  put(progress, "filesTotal", p.filesTotal);
  put(progress, "bytesDone", int64Json(p.bytesDone));
  put(progress, "bytesTotal", int64Json(p.bytesTotal));
  // Optional in the contract: written when set, even as 0.
  if (p.etaSeconds !== undefined) progress.etaSeconds = Math.round(p.etaSeconds);
  put(progress, "bytesPerSecond", int64Json(p.bytesPerSecond));
  out.progress = progress;
  put(
    out,
    "files",
    rec.files.map((f) => {
      const file: Json = {};
      put(file, "fileId", f.fileId);
      put(file, "state", enumName("FILE_STATE_", shownFileState(rec, f.state), FILE_STATE));
      put(file, "sizeBytes", int64Json(f.sizeBytes));
      put(file, "bytesDone", int64Json(f.bytesDone));
      put(file, "entryName", f.entryName);
      return file;
    }),
  );
  put(out, "version", rec.version);
  put(out, "attempts", rec.attempts);
  out.createTime = timeJson(rec.createdAt);
  out.updateTime = timeJson(rec.updatedAt);
  if (rec.startedAt !== undefined) out.startTime = timeJson(rec.startedAt);
  if (rec.endedAt !== undefined) out.endTime = timeJson(rec.endedAt);
  if (rec.state === "COMPLETED" && rec.result !== undefined) {
    const result: Json = {};
    put(result, "downloadUrl", download?.url);
    if (download !== undefined) result.expireTime = timeJson(download.expiresAt);
    put(result, "fileName", rec.result.fileName);
    put(result, "sizeBytes", int64Json(rec.result.sizeBytes));
    put(result, "sha256", rec.result.sha256);
    put(result, "expired", rec.result.expired === true);
    if (rec.result.expiresAt !== undefined) result.purgeTime = timeJson(rec.result.expiresAt);
    put(result, "linkUrl", extras.linkUrl);
    out.result = result;
  }
  if (rec.state === "FAILED" && rec.error !== undefined) {
    const error: Json = {};
    put(error, "code", rec.error.code);
    put(error, "message", rec.error.message);
    put(error, "retryable", rec.error.retryable);
    put(error, "missingFileIds", rec.error.missingFileIds);
    out.error = error;
  }
  const w = rec.webhook;
  if (rec.callbackUrl !== undefined && w !== undefined) {
    const webhook: Json = {};
    put(webhook, "callbackUrl", rec.callbackUrl);
    put(webhook, "state", enumName("WEBHOOK_STATE_", w.state, WEBHOOK_STATE));
    put(webhook, "attempts", w.attempts);
    put(webhook, "lastStatusCode", w.lastStatus);
    put(webhook, "lastError", w.lastError);
    if (w.lastAttemptAt !== undefined) webhook.lastAttemptTime = timeJson(w.lastAttemptAt);
    if (w.deliveredAt !== undefined) webhook.deliveredTime = timeJson(w.deliveredAt);
    out.webhook = webhook;
  }
  // Keys are sorted when stored and start with a letter, so both writers keep this order.
  if (rec.labels !== undefined && Object.keys(rec.labels).length > 0)
    out.labels = { ...rec.labels };
  put(out, "priority", rec.priority);
  const e = extras.estimate;
  if (e !== undefined) {
    const estimate: Json = {};
    put(estimate, "position", e.position);
    if (e.predictedStartAt !== undefined)
      estimate.predictedStartTime = timeJson(e.predictedStartAt);
    if (e.predictedEndAt !== undefined) estimate.predictedEndTime = timeJson(e.predictedEndAt);
    put(estimate, "runningJobs", e.runningJobs);
    put(estimate, "bytesPerSecond", int64Json(e.bytesPerSecond));
    put(estimate, "samples", e.samples);
    out.estimate = estimate;
  }
  return out;
}
