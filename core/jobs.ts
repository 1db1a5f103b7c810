import { randomUUID } from "node:crypto";

// The job model shared by the API and the worker. A job lives in Redis as a hash of
// string fields (see job-store.ts); this file owns its shape, the legal states and the
// domain errors, and knows nothing of Redis, BullMQ, S3 or protobuf.

export const JOB_STATES = ["QUEUED", "PROCESSING", "COMPLETED", "FAILED", "CANCELLED"] as const;
export type JobStateName = (typeof JOB_STATES)[number];
export const TERMINAL_STATES: readonly JobStateName[] = ["COMPLETED", "FAILED", "CANCELLED"];

export function isTerminal(state: JobStateName): boolean {
  return TERMINAL_STATES.includes(state);
}

export type FileStateName = "PENDING" | "IN_PROGRESS" | "DONE" | "FAILED";

export interface FileProgress {
  fileId: number;
  state: FileStateName;
  sizeBytes: number;
  bytesDone: number;
  entryName: string;
  /** The entry's CRC-32 once it is in the ZIP (kept for a run that resumes the upload). */
  crc32?: number;
}

/**
 * A running job's multipart upload as far as it is safe (worker/stored-bundle.ts): the
 * parts uploaded, one after another from the first, and what a run that takes over needs
 * to produce the rest of a stored ZIP byte for byte from their end.
 */
export interface UploadState {
  key: string;
  uploadId: string;
  partSize: number;
  /** ETags of parts 1..n. */
  parts: string[];
  /** CRC-32 of the data of the entry at the parts' end, up to it. */
  crc: number;
  /** Digest of the archive's layout: names, sizes, times and versions of the sources. */
  layout: string;
}

export interface JobProgress {
  filesDone: number;
  filesTotal: number;
  bytesDone: number;
  bytesTotal: number;
  bytesPerSecond: number;
  etaSeconds?: number;
}

/** What a completed job produced. The object key is stored, never a URL. */
export interface JobResultRecord {
  key: string;
  fileName: string;
  sizeBytes: number;
  sha256: string;
  /** When retention deletes the object (ms since the epoch). */
  expiresAt?: number;
  /** Set once retention has deleted the object: the job keeps its record, not its ZIP. */
  expired?: boolean;
}

export type WebhookStateName = "PENDING" | "DELIVERED" | "FAILED";

/** Delivery of the terminal-state callback, as the job shows it. */
export interface WebhookRecord {
  state: WebhookStateName;
  attempts: number;
  /** HTTP status of the last attempt; 0 when it got no answer. */
  lastStatus: number;
  /** Why the last attempt failed, if it did. */
  lastError?: string;
  lastAttemptAt?: number;
  deliveredAt?: number;
}

export interface JobErrorRecord {
  /** A Connect code name in snake case, e.g. "not_found". */
  code: string;
  message: string;
  retryable: boolean;
  missingFileIds?: number[];
}

export interface JobRecord {
  id: string;
  /** Who initiated the job; everyone else is told it does not exist. */
  owner: string;
  state: JobStateName;
  fileIds: number[];
  version: number;
  /** Runs that took the job so far; a run's number names its result object. */
  attempts: number;
  /**
   * The fencing token of the run that owns the job (BullMQ's lock token when it took the
   * job): every write a run makes checks it, so a run that lost the job changes nothing.
   */
  lease?: string;
  createdAt: number;
  updatedAt: number;
  startedAt?: number;
  endedAt?: number;
  progress: JobProgress;
  files: FileProgress[];
  result?: JobResultRecord;
  error?: JobErrorRecord;
  /** Who cancelled the job, when it was cancelled. */
  cancelledBy?: string;
  /** Where the terminal state is POSTed, if the caller asked for it. */
  callbackUrl?: string;
  /** Initiate's priority, 0-9 (higher starts sooner); absent means 0. */
  priority?: number;
  webhook?: WebhookRecord;
  /** The caller's labels from Initiate (core/labels.ts), keys sorted; absent when none. */
  labels?: Record<string, string>;
  /** The run's multipart upload so far, while it runs (crash-resume). */
  upload?: UploadState;
}

// Domain errors: handlers map them to Connect codes in one place (server/errors.ts).
export class InvalidInputError extends Error {
  override name = "InvalidInputError";
}
export class JobNotFoundError extends Error {
  override name = "JobNotFoundError";
  constructor(readonly jobId: string) {
    super(`job ${jobId} not found`);
  }
}
export class JobStateError extends Error {
  override name = "JobStateError";
  constructor(
    readonly jobId: string,
    readonly state: JobStateName,
    message: string,
  ) {
    super(message);
  }
}
/**
 * A run wrote to a job that another run has taken since (its lock was lost: a stall, a
 * partition, a failover). The run must stop and leave the other run's objects alone.
 */
export class FencedError extends Error {
  override name = "FencedError";
  constructor(
    readonly jobId: string,
    /** Who owns the job now ("lock" when the run no longer holds BullMQ's lock). */
    readonly holder: string,
  ) {
    super(`job ${jobId} is owned by another run now`);
  }
}
/** Redis or S3 could not be reached; the caller may retry. */
export class BackendUnavailableError extends Error {
  override name = "BackendUnavailableError";
}
/** The same idempotency key came back with other parameters. */
export class IdempotencyMismatchError extends InvalidInputError {
  override name = "IdempotencyMismatchError";
}
/** An owner's quota (active jobs, Initiate rate) is used up for now. */
export class QuotaExceededError extends Error {
  override name = "QuotaExceededError";
  constructor(
    message: string,
    /** When trying again may succeed. */
    readonly retryAfterMs: number,
  ) {
    super(message);
  }
}
/** The caller's owner may not do this (a priority above its maximum): the message says the limit. */
export class PermissionDeniedError extends Error {
  override name = "PermissionDeniedError";
}
/**
 * Not now, but the same call will succeed shortly by itself (UNAVAILABLE with a retry
 * delay): the caller did nothing wrong, so it is not logged as a backend failure either.
 */
export class RetryLaterError extends Error {
  override name = "RetryLaterError";
  constructor(
    message: string,
    /** When trying again may succeed. */
    readonly retryAfterMs: number,
  ) {
    super(message);
  }
}
/**
 * The job cannot take this call yet: its last run is still stopping in a worker
 * (RetryJob right after a cancel).
 */
export class JobBusyError extends RetryLaterError {
  override name = "JobBusyError";
}
/** The service as a whole is past its capacity (queue depth): come back later. */
export class OverloadedError extends RetryLaterError {
  override name = "OverloadedError";
}

// UUID v4: 122 random bits, never all digits and never a ':' (BullMQ rejects both).
const JOB_ID = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;

export function newJobId(): string {
  return randomUUID();
}

/** Validates a job id from a request; throws InvalidInputError saying what is wrong. */
export function parseJobId(raw: string): string {
  if (raw === "") {
    throw new InvalidInputError("job_id is required: pass the job_id returned by Initiate");
  }
  const id = raw.toLowerCase();
  if (!JOB_ID.test(id)) {
    const shown = raw.length > 60 ? `${raw.slice(0, 60)}…` : raw;
    throw new InvalidInputError(
      `job_id "${shown}" is malformed: expected the UUID returned by Initiate`,
    );
  }
  return id;
}

/** Validates the file ids of an Initiate request against the configured limit. */
export function parseFileIds(ids: readonly number[], maxFiles: number): number[] {
  if (ids.length === 0) {
    throw new InvalidInputError("file_ids is empty: pass at least one file id");
  }
  if (ids.length > maxFiles) {
    throw new InvalidInputError(
      `file_ids has ${ids.length} entries: at most ${maxFiles} files fit in one job, split the request`,
    );
  }
  const seen = new Set<number>();
  for (const [i, id] of ids.entries()) {
    if (!Number.isInteger(id) || id <= 0) {
      throw new InvalidInputError(`file_ids[${i}] is ${id}: file ids are positive integers`);
    }
    if (seen.has(id)) {
      throw new InvalidInputError(`file_ids[${i}] repeats file id ${id}: list each file once`);
    }
    seen.add(id);
  }
  return [...ids];
}

export function entryNameFor(fileId: number): string {
  return `file-${fileId}`;
}

export function newJobRecord(
  id: string,
  owner: string,
  fileIds: number[],
  now: number,
  callbackUrl?: string,
  labels?: Readonly<Record<string, string>>,
): JobRecord {
  return {
    id,
    owner,
    ...(labels !== undefined && Object.keys(labels).length > 0 ? { labels: { ...labels } } : {}),
    ...(callbackUrl !== undefined
      ? { callbackUrl, webhook: { state: "PENDING", attempts: 0, lastStatus: 0 } }
      : {}),
    state: "QUEUED",
    fileIds,
    version: 1,
    attempts: 0,
    createdAt: now,
    updatedAt: now,
    progress: {
      filesDone: 0,
      filesTotal: fileIds.length,
      bytesDone: 0,
      bytesTotal: 0,
      bytesPerSecond: 0,
    },
    files: fileIds.map((fileId) => ({
      fileId,
      state: "PENDING",
      sizeBytes: 0,
      bytesDone: 0,
      entryName: entryNameFor(fileId),
    })),
  };
}

export function percentOf(p: JobProgress): number {
  if (p.bytesTotal > 0) return Math.min(100, Math.floor((p.bytesDone * 100) / p.bytesTotal));
  if (p.filesTotal > 0) return Math.floor((p.filesDone * 100) / p.filesTotal);
  return 0;
}
