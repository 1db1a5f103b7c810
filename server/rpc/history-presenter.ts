import { create } from "@bufbuild/protobuf";
import {
  type Duration,
  DurationSchema,
  type Timestamp,
  timestampFromMs,
  timestampMs,
} from "@bufbuild/protobuf/wkt";
import type { HistoryListQuery, HistoryPage, StatisticsBucket } from "../../core/history-reader.js";
import type { JobListQuery } from "../../core/job-index.js";
import { JOB_STATE } from "../../core/job-to-proto.js";
import { InvalidInputError, type JobStateName } from "../../core/jobs.js";
import { parseLabels } from "../../core/labels.js";
import {
  type GetJobStatisticsResponse,
  GetJobStatisticsResponseSchema,
  JobState,
  type ListJobHistoryRequest,
  type ListJobHistoryResponse,
  ListJobHistoryResponseSchema,
  type ListJobsRequest,
  StatisticsInterval,
} from "../../gen/downloads/v1/download_service_pb.js";

// The history RPCs' requests and answers <-> core/history-reader.ts's terms.

const STATE_NAME = new Map(
  Object.entries(JOB_STATE).map(([name, value]) => [value, name as JobStateName]),
);

const ms = (t: Timestamp | undefined) => (t === undefined ? undefined : timestampMs(t));

function stateNames(states: readonly JobState[]): JobStateName[] {
  return states.map((s) => {
    const name = STATE_NAME.get(s);
    if (name === undefined)
      throw new InvalidInputError(
        `states: ${s} is not a job state (QUEUED, PROCESSING, COMPLETED, FAILED or CANCELLED)`,
      );
    return name;
  });
}

export function listQuery(req: ListJobHistoryRequest): HistoryListQuery {
  const states = stateNames(req.states);
  const q: HistoryListQuery = { pageSize: req.pageSize, pageToken: req.pageToken, states };
  const from = ms(req.createTimeStart);
  const before = ms(req.createTimeEnd);
  if (from !== undefined) q.createdFrom = from;
  if (before !== undefined) q.createdBefore = before;
  return q;
}

/** ListJobs' request in core/job-index.ts's terms; labels validated as Initiate's are. */
export function jobListQuery(req: ListJobsRequest): JobListQuery {
  return {
    pageSize: req.pageSize,
    pageToken: req.pageToken,
    states: stateNames(req.states),
    createdFrom: ms(req.createTimeStart),
    createdBefore: ms(req.createTimeEnd),
    labels: parseLabels(req.labels, "labels filter"),
  };
}

export function listResponse(page: HistoryPage): ListJobHistoryResponse {
  return create(ListJobHistoryResponseSchema, {
    nextPageToken: page.nextPageToken,
    jobs: page.rows.map((r) => ({
      jobId: r.jobId,
      state: JOB_STATE[r.state] ?? JobState.UNSPECIFIED,
      fileIds: r.fileIds,
      totalSizeBytes: BigInt(r.totalBytes),
      ...(r.zipBytes !== undefined ? { zipSizeBytes: BigInt(r.zipBytes) } : {}),
      createTime: timestampFromMs(r.createdAt),
      ...(r.startedAt !== undefined ? { startTime: timestampFromMs(r.startedAt) } : {}),
      ...(r.endedAt !== undefined ? { endTime: timestampFromMs(r.endedAt) } : {}),
      updateTime: timestampFromMs(r.updatedAt),
      attempts: r.attempts,
      errorCode: r.errorCode ?? "",
      errorMessage: r.errorMessage ?? "",
      labels: r.labels ?? {},
    })),
  });
}

/** The request's interval and required range, in the reader's terms. */
export function statisticsRange(req: {
  interval: StatisticsInterval;
  startTime?: Timestamp | undefined;
  endTime?: Timestamp | undefined;
}): { interval: "hour" | "day"; from: number; to: number } {
  const interval =
    req.interval === StatisticsInterval.HOURLY
      ? "hour"
      : req.interval === StatisticsInterval.DAILY
        ? "day"
        : undefined;
  if (interval === undefined) throw new InvalidInputError("interval is required: HOURLY or DAILY");
  const from = ms(req.startTime);
  const to = ms(req.endTime);
  if (from === undefined || to === undefined)
    throw new InvalidInputError("start_time and end_time are both required");
  return { interval, from, to };
}

function duration(msValue: number | undefined): Duration | undefined {
  if (msValue === undefined) return undefined;
  const nanos = Math.round(msValue * 1_000_000);
  return create(DurationSchema, {
    seconds: BigInt(Math.floor(nanos / 1e9)),
    nanos: nanos % 1e9,
  });
}

export function statisticsResponse(buckets: StatisticsBucket[]): GetJobStatisticsResponse {
  return create(GetJobStatisticsResponseSchema, {
    buckets: buckets.map((b) => ({
      startTime: timestampFromMs(b.start),
      jobs: BigInt(b.jobs),
      completed: BigInt(b.completed),
      failed: BigInt(b.failed),
      cancelled: BigInt(b.cancelled),
      totalSizeBytes: BigInt(b.totalBytes),
      zipSizeBytes: BigInt(b.zipBytes),
      durationP50: duration(b.durationP50Ms),
      durationP95: duration(b.durationP95Ms),
      queueWaitP50: duration(b.queueWaitP50Ms),
      queueWaitP95: duration(b.queueWaitP95Ms),
      failures: b.failures.map((f) => ({ errorCode: f.errorCode, count: BigInt(f.count) })),
    })),
  });
}
