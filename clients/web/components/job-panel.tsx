import { timestampDate } from "@bufbuild/protobuf/wkt";
import { ConnectError } from "@connectrpc/connect";
import { type MouseEvent, type Ref, useId, useState } from "react";
import {
  FileState,
  type FileStatus,
  type Job,
  type JobResult,
  JobState,
} from "../../../gen/downloads/v1/download_service_pb.js";
import type { DownloadClient } from "../../lib/client.js";
import type { DownloadJob } from "../../react/use-download-job.js";
import { formatBytes, formatDuration, formatRate, percentOf, shortId } from "../format.js";
import { describeError, describeJobError, stateLabel } from "../messages.js";
import { ProgressBar } from "./progress-bar.js";
import { QueueEstimate } from "./queue-estimate.js";
import { StableLink } from "./stable-link.js";

export interface JobPanelProps {
  jobId: string;
  watch: DownloadJob;
  client: DownloadClient;
  headingRef: Ref<HTMLHeadingElement>;
  onClose(): void;
}

/** A URL this close to its expiry is refreshed before use: the download must still start. */
const EXPIRY_MARGIN_MS = 10_000;

const FILE_STATE_LABELS: Record<FileState, string> = {
  [FileState.UNSPECIFIED]: "",
  [FileState.PENDING]: "Waiting",
  [FileState.IN_PROGRESS]: "Adding",
  [FileState.DONE]: "Done",
  [FileState.FAILED]: "Missing",
};

/** The job being watched: state, progress overall and per file, cancel, download. */
export function JobPanel({ jobId, watch, client, headingRef, onClose }: JobPanelProps) {
  const { job, error, connection } = watch;
  const headingId = useId();
  const [cancelling, setCancelling] = useState(false);
  const [actionError, setActionError] = useState<string | undefined>(undefined);
  const terminal =
    job !== undefined &&
    (job.state === JobState.COMPLETED ||
      job.state === JobState.FAILED ||
      job.state === JobState.CANCELLED);
  // The watch has ended with an error (the job is gone, the token refused...).
  const watchFailed = error !== undefined && connection === "idle";

  const cancel = async () => {
    if (cancelling) return;
    setCancelling(true);
    setActionError(undefined);
    try {
      await watch.cancel();
    } catch (err) {
      setActionError(describeError(ConnectError.from(err), "cancel", false));
    } finally {
      setCancelling(false);
    }
  };

  let status: string;
  if (job !== undefined) status = stateLabel(job.state);
  else if (watchFailed) status = "Unavailable";
  else status = "Connecting…";

  return (
    <section className="card job" aria-labelledby={headingId}>
      <div className="job-head">
        <h2 id={headingId} ref={headingRef} tabIndex={-1}>
          Job{" "}
          <code data-testid="job-id" title={jobId}>
            {shortId(jobId)}
          </code>
        </h2>
        <p
          role="status"
          className={`state state-${job === undefined ? "none" : JobState[job.state].toLowerCase()}`}
        >
          {status}
        </p>
      </div>

      {error !== undefined && (
        <p role="alert" className={connection === "idle" ? "error" : "warning"}>
          {describeError(error, "watch", connection !== "idle")}
        </p>
      )}
      {error === undefined && connection === "polling" && !terminal && (
        <p className="muted">
          Live updates cannot get through here; checking for news every second.
        </p>
      )}

      {job !== undefined && <QueueEstimate job={job} />}
      {job !== undefined && <Progress job={job} />}

      {job?.state === JobState.COMPLETED && job.result !== undefined && (
        <DownloadLink jobId={jobId} result={job.result} client={client} onError={setActionError} />
      )}
      {job?.state === JobState.COMPLETED && job.result !== undefined && (
        <StableLink result={job.result} />
      )}
      {job?.state === JobState.FAILED && <p className="error">{describeJobError(job.error)}</p>}
      {job?.state === JobState.CANCELLED && <p>This job was cancelled; nothing was kept.</p>}

      {actionError !== undefined && (
        <p role="alert" className="error">
          {actionError}
        </p>
      )}

      <div className="row">
        {!terminal && !watchFailed && (
          <button type="button" onClick={() => void cancel()} aria-disabled={cancelling}>
            {cancelling ? "Cancelling…" : "Cancel job"}
          </button>
        )}
        <button type="button" className="link" onClick={onClose}>
          {terminal || watchFailed ? "Close" : "Stop watching"}
        </button>
      </div>
    </section>
  );
}

function Progress({ job }: { job: Job }) {
  const p = job.progress;
  const bytesDone = p?.bytesDone ?? 0n;
  const bytesTotal = p?.bytesTotal ?? 0n;
  const known = bytesTotal > 0n || job.state !== JobState.QUEUED;
  const percent = job.state === JobState.COMPLETED ? 100 : (p?.percent ?? 0);
  const running = job.state === JobState.PROCESSING;
  const eta =
    running && p?.etaSeconds !== undefined
      ? `about ${formatDuration(p.etaSeconds)} left`
      : undefined;
  const rate =
    running && p !== undefined && p.bytesPerSecond > 0n ? formatRate(p.bytesPerSecond) : undefined;
  const amount =
    bytesTotal > 0n
      ? `${formatBytes(bytesDone)} of ${formatBytes(bytesTotal)}`
      : "size not known yet";
  const valueText = [`${percent}%`, amount, eta].filter((s) => s !== undefined).join(", ");

  return (
    <div className="progress">
      <ProgressBar
        label="Overall progress"
        percent={known ? percent : undefined}
        valueText={valueText}
      />
      <dl className="stats">
        <div>
          <dt>Done</dt>
          <dd>{percent}%</dd>
        </div>
        <div>
          <dt>Files</dt>
          <dd>
            {p?.filesDone ?? 0} of {p?.filesTotal ?? job.fileIds.length}
          </dd>
        </div>
        <div>
          <dt>Data</dt>
          <dd>{amount}</dd>
        </div>
        <div>
          <dt>Speed</dt>
          <dd>{rate ?? "–"}</dd>
        </div>
        <div>
          <dt>Time left</dt>
          <dd>{eta ?? (job.state === JobState.QUEUED ? "waiting to start" : "–")}</dd>
        </div>
      </dl>
      {job.files.length > 0 && (
        <ul className="files" aria-label="Files">
          {job.files.map((f) => (
            <FileRow key={f.fileId} file={f} />
          ))}
        </ul>
      )}
    </div>
  );
}

function FileRow({ file }: { file: FileStatus }) {
  const name = file.entryName !== "" ? file.entryName : `file ${file.fileId}`;
  const percent = file.state === FileState.DONE ? 100 : percentOf(file.bytesDone, file.sizeBytes);
  const amount =
    file.sizeBytes > 0n ? `${formatBytes(file.bytesDone)} of ${formatBytes(file.sizeBytes)}` : "";
  const label = FILE_STATE_LABELS[file.state];
  return (
    <li className="file-row">
      <span className="file-name">{name}</span>
      <ProgressBar
        label={name}
        percent={percent}
        valueText={`${percent}%${amount === "" ? "" : `, ${amount}`}`}
        small
      />
      <span className="muted">{amount}</span>
      <span className={`file-state file-${FileState[file.state].toLowerCase()}`}>{label}</span>
    </li>
  );
}

interface DownloadLinkProps {
  jobId: string;
  result: JobResult;
  client: DownloadClient;
  onError(message: string | undefined): void;
}

/**
 * The presigned ZIP URL. It expires (PRESIGN_EXPIRY_SECONDS); a page left open longer
 * asks GetStatus, which presigns afresh, before starting the download.
 */
function DownloadLink({ jobId, result, client, onError }: DownloadLinkProps) {
  const [fresh, setFresh] = useState<JobResult | undefined>(undefined);
  const [refreshing, setRefreshing] = useState(false);
  const current = fresh ?? result;
  const expiresAt =
    current.expireTime !== undefined ? timestampDate(current.expireTime).getTime() : Infinity;

  const onClick = (e: MouseEvent<HTMLAnchorElement>) => {
    if (Date.now() < expiresAt - EXPIRY_MARGIN_MS) return;
    e.preventDefault();
    if (refreshing) return;
    setRefreshing(true);
    onError(undefined);
    client
      .getStatus({ jobId })
      .then(({ job }) => {
        const r = job?.result;
        if (r === undefined) throw new Error("the job has no result");
        setFresh(r);
        // Same as following the link: the server names the file as an attachment.
        const a = document.createElement("a");
        a.href = r.downloadUrl;
        a.download = r.fileName;
        document.body.append(a);
        a.click();
        a.remove();
      })
      .catch((err: unknown) => onError(describeError(ConnectError.from(err), "download", false)))
      .finally(() => setRefreshing(false));
  };

  return (
    <p className="download">
      <a
        className="button primary"
        href={current.downloadUrl}
        download={current.fileName}
        onClick={onClick}
      >
        {refreshing ? "Preparing link…" : `Download ${current.fileName}`}
      </a>
      <span className="muted"> {formatBytes(current.sizeBytes)}</span>
      <br />
      <small className="muted">
        SHA-256 <code className="hash">{current.sha256}</code>
      </small>
    </p>
  );
}
