import { useId } from "react";
import { formatTime, shortId } from "../format.js";
import { stateFromName, stateLabel } from "../messages.js";
import type { RecentJob } from "../saved.js";

export interface RecentJobsProps {
  jobs: readonly RecentJob[];
  currentJobId: string | undefined;
  onSelect(jobId: string): void;
  onClear(): void;
}

/** Jobs started from this browser, newest first; choosing one watches it again. */
export function RecentJobs({ jobs, currentJobId, onSelect, onClear }: RecentJobsProps) {
  const headingId = useId();
  return (
    <section className="card" aria-labelledby={headingId}>
      <h2 id={headingId}>Recent jobs</h2>
      {jobs.length === 0 ? (
        <p className="muted">Jobs you start appear here.</p>
      ) : (
        <>
          <ul className="recent">
            {jobs.map((j) => {
              const state = stateFromName(j.state);
              const label = state === undefined ? "No longer exists" : stateLabel(state);
              const files = `${j.fileIds.length} ${j.fileIds.length === 1 ? "file" : "files"}`;
              const current = j.jobId === currentJobId;
              return (
                <li key={j.jobId}>
                  <button
                    type="button"
                    className="recent-item"
                    aria-current={current ? "true" : undefined}
                    onClick={() => onSelect(j.jobId)}
                    title={j.jobId}
                  >
                    <code>{shortId(j.jobId)}</code>
                    <span>{files}</span>
                    <span className={`state state-${j.state.toLowerCase()}`}>
                      {label}
                      {state !== undefined && j.state === "JOB_STATE_PROCESSING"
                        ? ` ${j.percent}%`
                        : ""}
                    </span>
                    <span className="muted">{formatTime(j.createdAt)}</span>
                  </button>
                </li>
              );
            })}
          </ul>
          <button type="button" className="link" onClick={onClear}>
            Clear list
          </button>
        </>
      )}
    </section>
  );
}
