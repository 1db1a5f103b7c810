import { timestampMs } from "@bufbuild/protobuf/wkt";
import { type Job, JobState } from "../../gen/downloads/v1/download_service_pb.js";

// A queued job's place in the queue and its predicted times (Job.estimate), as a few
// words for a progress line: "#2 in queue, starts ~10:15:04, ready ~10:15:31".

function clock(ms: number): string {
  return new Date(ms).toTimeString().slice(0, 8);
}

export function estimateText(job: Job): string | undefined {
  const e = job.estimate;
  if (e === undefined) return undefined;
  const parts: string[] = [];
  if (job.state === JobState.QUEUED && e.position > 0) parts.push(`#${e.position} in queue`);
  if (job.state === JobState.QUEUED && e.predictedStartTime !== undefined)
    parts.push(`starts ~${clock(timestampMs(e.predictedStartTime))}`);
  if (e.predictedEndTime !== undefined)
    parts.push(`ready ~${clock(timestampMs(e.predictedEndTime))}`);
  return parts.length > 0 ? parts.join(", ") : undefined;
}
