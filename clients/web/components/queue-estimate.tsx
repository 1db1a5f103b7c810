import { timestampMs } from "@bufbuild/protobuf/wkt";
import { type Job, JobState } from "../../../gen/downloads/v1/download_service_pb.js";
import { formatDuration, formatTime } from "../format.js";

// A queued job's place in the queue and when it should start and be ready; a running
// job's predicted end (Job.estimate, core/forecast.ts). The watch brings a queued job
// again with each fresher estimate (WatchJob heartbeats carry it), so this only shows it.

export function QueueEstimate({ job }: { job: Job }) {
  const e = job.estimate;
  if (e === undefined || (job.state !== JobState.QUEUED && job.state !== JobState.PROCESSING))
    return null;
  const now = Date.now();
  const when = (t: Parameters<typeof timestampMs>[0] | undefined) =>
    t === undefined
      ? undefined
      : `in about ${formatDuration((timestampMs(t) - now) / 1000)} (${formatTime(timestampMs(t))})`;
  const start = when(e.predictedStartTime);
  const end = when(e.predictedEndTime);
  const parts: string[] = [];
  if (job.state === JobState.QUEUED) {
    parts.push(
      e.position === 1 ? "Next in the queue" : `Number ${e.position} in the queue`,
      `${e.runningJobs} ${e.runningJobs === 1 ? "job" : "jobs"} running`,
    );
    if (start !== undefined) parts.push(`starts ${start}`);
  }
  if (end !== undefined) parts.push(`ready ${end}`);
  else parts.push("no time estimate yet (nothing measured so far)");
  return (
    <p className="estimate" data-testid="queue-estimate">
      {parts.join(" · ")}
    </p>
  );
}
