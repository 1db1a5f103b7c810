import { timestampMs } from "@bufbuild/protobuf/wkt";
import { useEffect, useState } from "react";
import { type Job, JobState } from "../../../gen/downloads/v1/download_service_pb.js";
import type { DownloadClient } from "../../lib/client.js";
import { formatDuration, formatTime } from "../format.js";

// A queued job's place in the queue and when it should start and be ready; a running
// job's predicted end (Job.estimate, core/forecast.ts). A queued job does not change, so
// its watch says nothing while the queue moves: this part asks GetStatus every few
// seconds for the estimate until the job starts.

/** How often a queued job's estimate is read again. */
const REFRESH_MS = 3000;

export function QueueEstimate({ job, client }: { job: Job; client: DownloadClient }) {
  const [fresh, setFresh] = useState<Job | undefined>(undefined);
  const queued = job.state === JobState.QUEUED;
  const jobId = job.jobId;

  useEffect(() => {
    if (!queued) return;
    let stopped = false;
    const timer = setInterval(() => {
      client
        .getStatus({ jobId })
        .then(({ job: j }) => {
          if (!stopped && j !== undefined) setFresh(j);
        })
        // The watch reports trouble; a missed refresh only leaves the older estimate.
        .catch(() => undefined);
    }, REFRESH_MS);
    return () => {
      stopped = true;
      clearInterval(timer);
    };
  }, [client, jobId, queued]);

  // The newer of the watched job and the one read here.
  const shown = fresh !== undefined && fresh.version >= job.version && queued ? fresh : job;
  const e = shown.estimate;
  if (e === undefined || (shown.state !== JobState.QUEUED && shown.state !== JobState.PROCESSING))
    return null;
  const now = Date.now();
  const when = (t: Parameters<typeof timestampMs>[0] | undefined) =>
    t === undefined
      ? undefined
      : `in about ${formatDuration((timestampMs(t) - now) / 1000)} (${formatTime(timestampMs(t))})`;
  const start = when(e.predictedStartTime);
  const end = when(e.predictedEndTime);
  const parts: string[] = [];
  if (shown.state === JobState.QUEUED) {
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
