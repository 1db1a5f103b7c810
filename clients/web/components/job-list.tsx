import { timestampMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import { useEffect, useId, useMemo, useState } from "react";
import { type Job, JobState } from "../../../gen/downloads/v1/download_service_pb.js";
import type { DownloadClient } from "../../lib/client.js";
import { useJobs } from "../../react/use-jobs.js";
import { formatTime, shortId } from "../format.js";
import { describeError, stateLabel } from "../messages.js";

// "Your jobs": the caller's jobs from ListJobs (newest first, a page at a time, filtered
// by state), whichever browser or device started them. A finished job can be deleted, a
// failed or cancelled one run again; choosing a job watches it in the job panel.

const PAGE_SIZE = 10;

const FILTERS: [string, JobState[]][] = [
  ["All", []],
  [stateLabel(JobState.QUEUED), [JobState.QUEUED]],
  [stateLabel(JobState.PROCESSING), [JobState.PROCESSING]],
  [stateLabel(JobState.COMPLETED), [JobState.COMPLETED]],
  [stateLabel(JobState.FAILED), [JobState.FAILED]],
  [stateLabel(JobState.CANCELLED), [JobState.CANCELLED]],
];

const finished = (s: JobState) =>
  s === JobState.COMPLETED || s === JobState.FAILED || s === JobState.CANCELLED;

export interface JobListProps {
  client: DownloadClient;
  currentJobId: string | undefined;
  /** The watched job as the page sees it live: its row shows it rather than the list's copy. */
  current: Job | undefined;
  /** Changes whenever the list is worth reading again (a job started, or changed state). */
  refreshKey: string;
  onSelect(jobId: string): void;
  /** A job was deleted (the page stops showing it if it was the current one). */
  onDeleted(jobId: string): void;
}

export function JobList({
  client,
  currentJobId,
  current,
  refreshKey,
  onSelect,
  onDeleted,
}: JobListProps) {
  const headingId = useId();
  const filterId = useId();
  const [filter, setFilter] = useState(0);
  const states = FILTERS[filter]?.[1] ?? [];
  const query = useMemo(() => ({ pageSize: PAGE_SIZE, states }), [states]);
  const list = useJobs(client, query);
  const [busy, setBusy] = useState<string | undefined>(undefined);
  const [actionError, setActionError] = useState<string | undefined>(undefined);
  const { refresh } = list;

  // biome-ignore lint/correctness/useExhaustiveDependencies: refreshKey is the reason to read the list again
  useEffect(() => {
    void refresh();
  }, [refreshKey, refresh]);

  const act = async (jobId: string, what: "delete" | "retry") => {
    setBusy(jobId);
    setActionError(undefined);
    try {
      if (what === "delete") {
        await list.deleteJob(jobId);
        onDeleted(jobId);
      } else {
        await list.retryJob(jobId);
        onSelect(jobId);
      }
    } catch (err) {
      const e = ConnectError.from(err);
      setActionError(
        what === "delete"
          ? `Could not delete the job: ${describeError(e, "cancel", false)}`
          : `Could not run the job again: ${describeError(e, "start", false)}`,
      );
    } finally {
      setBusy(undefined);
    }
  };

  // A list that cannot be read is said in place, quietly: the start form and the job
  // panel already alert about the same cause (no token, service away).
  const listError =
    list.error === undefined
      ? undefined
      : list.error.code === Code.Unauthenticated
        ? "Enter your access token to see your jobs."
        : describeError(list.error, "watch", false);
  return (
    <section className="card" aria-labelledby={headingId}>
      <div className="list-head">
        <h2 id={headingId}>Your jobs</h2>
        <label htmlFor={filterId}>
          Show{" "}
          <select
            id={filterId}
            value={filter}
            onChange={(e) => setFilter(Number(e.currentTarget.value))}
          >
            {FILTERS.map(([label], i) => (
              <option key={label} value={i}>
                {label}
              </option>
            ))}
          </select>
        </label>
      </div>
      {actionError !== undefined && (
        <p role="alert" className="error">
          {actionError}
        </p>
      )}
      {listError !== undefined && <p className="error">{listError}</p>}
      {list.jobs.length === 0 ? (
        <p className="muted">
          {list.loading
            ? "Loading…"
            : states.length === 0
              ? "Jobs you start appear here."
              : "None."}
        </p>
      ) : (
        <ul className="recent" aria-busy={list.loading}>
          {list.jobs.map((listed) => {
            const j = current !== undefined && current.jobId === listed.jobId ? current : listed;
            const files = `${j.fileIds.length} ${j.fileIds.length === 1 ? "file" : "files"}`;
            const created = j.createTime !== undefined ? formatTime(timestampMs(j.createTime)) : "";
            const percent = j.state === JobState.PROCESSING ? ` ${j.progress?.percent ?? 0}%` : "";
            const label = JobState[j.state]?.toLowerCase() ?? "unspecified";
            return (
              <li key={j.jobId} className="job-row" data-job-id={j.jobId}>
                <button
                  type="button"
                  className="recent-item"
                  aria-current={j.jobId === currentJobId ? "true" : undefined}
                  onClick={() => onSelect(j.jobId)}
                  title={j.jobId}
                >
                  <code>{shortId(j.jobId)}</code>
                  <span>{files}</span>
                  <span className={`state state-${label}`}>
                    {stateLabel(j.state)}
                    {percent}
                  </span>
                  <span className="muted">{created}</span>
                </button>
                {(j.state === JobState.FAILED || j.state === JobState.CANCELLED) && (
                  <button
                    type="button"
                    className="link"
                    disabled={busy === j.jobId}
                    onClick={() => void act(j.jobId, "retry")}
                  >
                    Retry
                  </button>
                )}
                {finished(j.state) && (
                  <button
                    type="button"
                    className="link"
                    disabled={busy === j.jobId}
                    onClick={() => void act(j.jobId, "delete")}
                  >
                    Delete
                  </button>
                )}
              </li>
            );
          })}
        </ul>
      )}
      {list.hasMore && (
        <button type="button" className="link" onClick={() => void list.loadMore()}>
          Show more
        </button>
      )}
    </section>
  );
}
