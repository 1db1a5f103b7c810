import { toJson } from "@bufbuild/protobuf";
import {
  InitiateOutcome,
  type Job,
  JobSchema,
  JobState,
} from "../../gen/downloads/v1/download_service_pb.js";
import { estimateText } from "./estimate.js";

// How the CLI writes jobs for people and for scripts.

export function stateName(state: JobState): string {
  return JobState[state] ?? String(state);
}

/**
 * What Initiate did, in words: a new job, or which existing job of the caller it handed
 * back and why, so that a finished job returned at once does not look like a fast one.
 */
export function outcomeLine(jobId: string, outcome: InitiateOutcome): string {
  switch (outcome) {
    case InitiateOutcome.CREATED:
      return `job ${jobId}: created`;
    case InitiateOutcome.REPLAYED:
      return `job ${jobId}: replayed (this request id was sent before; it is that call's job)`;
    case InitiateOutcome.IN_FLIGHT:
      return `job ${jobId}: in flight (you already have a job for these files running; it is that job)`;
    case InitiateOutcome.REUSED_RESULT:
      return `job ${jobId}: reused result (these files were bundled before and the ZIP is still there; ask for other files for a new job)`;
    default:
      // A server older than the outcome field says nothing about it.
      return `job ${jobId}: started`;
  }
}

/** 1234567 → "1.2 MB" (decimal units, as download sizes are usually quoted). */
export function formatBytes(n: bigint | number): string {
  const v = Number(n);
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  let x = v;
  while (x >= 1000 && i < units.length - 1) {
    x /= 1000;
    i += 1;
  }
  return i === 0 ? `${v} B` : `${x.toFixed(1)} ${units[i]}`;
}

export function formatSeconds(s: number): string {
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(m / 60)}h${String(m % 60).padStart(2, "0")}m`;
}

/** One line: state, percent, files, bytes, rate, ETA. */
export function progressLine(job: Job): string {
  const p = job.progress;
  const parts = [stateName(job.state).padEnd(10), `${String(p?.percent ?? 0).padStart(3)}%`];
  parts.push(`${p?.filesDone ?? 0}/${p?.filesTotal ?? job.fileIds.length} files`);
  if (p !== undefined && p.bytesTotal > 0n)
    parts.push(`${formatBytes(p.bytesDone)}/${formatBytes(p.bytesTotal)}`);
  if (job.state === JobState.PROCESSING && p !== undefined && p.bytesPerSecond > 0n) {
    parts.push(`${formatBytes(p.bytesPerSecond)}/s`);
  }
  if (job.state === JobState.PROCESSING && p?.etaSeconds !== undefined)
    parts.push(`ETA ${formatSeconds(p.etaSeconds)}`);
  const estimate = estimateText(job);
  if (estimate !== undefined) parts.push(estimate);
  return parts.join("  ");
}

/** The job in the proto's JSON form, the same that curl sees. */
export function jobJson(job: Job): string {
  return JSON.stringify(toJson(JobSchema, job));
}

/** What a person needs to know about a job that is over (or where it stands). */
export function summary(job: Job): string[] {
  const lines = [`job ${job.jobId}: ${stateName(job.state)}`];
  if (job.state === JobState.COMPLETED && job.result !== undefined) {
    const r = job.result;
    lines.push(
      `  file:     ${r.fileName} (${formatBytes(r.sizeBytes)})`,
      `  sha256:   ${r.sha256}`,
    );
    lines.push(`  url:      ${r.downloadUrl}`, `  download: download-jobs download ${job.jobId}`);
    if (r.linkUrl !== "") lines.push(`  link:     ${r.linkUrl} (stable, for whoever has it)`);
  } else if (job.state === JobState.FAILED && job.error !== undefined) {
    const e = job.error;
    lines.push(
      `  error:    ${e.message} (${e.code}${e.retryable ? ", retryable: initiate again" : ""})`,
    );
  } else if (job.state === JobState.QUEUED || job.state === JobState.PROCESSING) {
    lines.push(`  ${progressLine(job).trim()}`, `  follow:   download-jobs watch ${job.jobId}`);
  }
  return lines;
}

/** One line of `list`: id, state, files, created, labels. */
export function listLine(job: Job): string {
  const created =
    job.createTime !== undefined
      ? new Date(Number(job.createTime.seconds) * 1000).toISOString().replace(".000Z", "Z")
      : "";
  const files = `${job.fileIds.length} ${job.fileIds.length === 1 ? "file" : "files"}`;
  const percent = job.state === JobState.PROCESSING ? ` ${job.progress?.percent ?? 0}%` : "";
  const labels = Object.entries(job.labels)
    .map(([k, v]) => `${k}=${v}`)
    .join(",");
  return [
    job.jobId,
    `${stateName(job.state)}${percent}`.padEnd(14),
    files.padEnd(9),
    created,
    labels,
  ]
    .join("  ")
    .trimEnd();
}
