import cliProgress from "cli-progress";
import { FileState, type Job, JobState } from "../../gen/downloads/v1/download_service_pb.js";
import { formatBytes, formatSeconds, jobJson, progressLine, stateName } from "./format.js";

// Shows a job while it is watched: live bars on a terminal, plain lines in a pipe or a
// log, one JSON object per line for scripts.

export interface JobView {
  show(job: Job): void;
  /** Out-of-band news (reconnecting, polling): never on stdout, which belongs to the job. */
  note(text: string): void;
  /** Removes the live display (before the summary or an error is printed). */
  stop(): void;
}

type Out = NodeJS.WritableStream & { isTTY?: boolean };

export function createView(mode: "tty" | "plain" | "json", out: Out, err: Out): JobView {
  if (mode === "json") {
    return {
      show: (job) => out.write(`${jobJson(job)}\n`),
      note: (text) => err.write(`${text}\n`),
      stop: () => undefined,
    };
  }
  if (mode === "plain") return plainView(out, err);
  return barsView(err);
}

/** A line per state change, per finished file, and at most one a second in between. */
function plainView(out: Out, err: Out): JobView {
  let lastState: JobState | undefined;
  let lastFiles = -1;
  let lastPosition = -1;
  let lastAt = 0;
  return {
    show(job) {
      const files = job.progress?.filesDone ?? 0;
      const now = Date.now();
      const terminal = job.state !== JobState.QUEUED && job.state !== JobState.PROCESSING;
      const position = job.estimate?.position ?? 0;
      if (
        job.state === lastState &&
        files === lastFiles &&
        position === lastPosition &&
        now - lastAt < 1000 &&
        !terminal
      )
        return;
      lastState = job.state;
      lastFiles = files;
      lastPosition = position;
      lastAt = now;
      out.write(`${progressLine(job)}\n`);
    },
    note: (text) => err.write(`${text}\n`),
    stop: () => undefined,
  };
}

/** Most per-file bars drawn; a job of hundreds of files shows only its overall bar. */
const MAX_FILE_BARS = 12;

function barsView(err: Out): JobView {
  const multi = new cliProgress.MultiBar(
    {
      stream: err,
      hideCursor: true,
      clearOnComplete: false,
      barsize: 20,
      format: "{bar} {percentage}% | {state} | {files} files | {bytes} | {rate} | ETA {eta_text}",
      // Redraw at a steady pace even between updates (the rate text stays fresh).
      fps: 8,
    },
    cliProgress.Presets.shades_classic,
  );
  const overall = multi.create(100, 0, {
    state: "",
    files: "",
    bytes: "",
    rate: "",
    eta_text: "-",
  });
  const fileBars = new Map<number, cliProgress.SingleBar>();
  const fileFormat = "  {bar} {percentage}% | {name} | {size}";
  let stopped = false;
  return {
    show(job) {
      if (stopped) return;
      const p = job.progress;
      const processing = job.state === JobState.PROCESSING;
      overall.update(p?.percent ?? 0, {
        state:
          job.state === JobState.QUEUED && (job.estimate?.position ?? 0) > 0
            ? `${stateName(job.state)} #${job.estimate?.position}`
            : stateName(job.state),
        files: `${p?.filesDone ?? 0}/${p?.filesTotal ?? job.fileIds.length}`,
        bytes:
          p !== undefined && p.bytesTotal > 0n
            ? `${formatBytes(p.bytesDone)}/${formatBytes(p.bytesTotal)}`
            : "-",
        rate:
          processing && p !== undefined && p.bytesPerSecond > 0n
            ? `${formatBytes(p.bytesPerSecond)}/s`
            : "-",
        eta_text: processing && p?.etaSeconds !== undefined ? formatSeconds(p.etaSeconds) : "-",
      });
      for (const f of job.files.slice(0, MAX_FILE_BARS)) {
        if (f.sizeBytes === 0n && f.state === FileState.PENDING) continue;
        const total = Math.max(1, Number(f.sizeBytes));
        const done = f.state === FileState.DONE ? total : Number(f.bytesDone);
        const payload = { name: f.entryName || `file ${f.fileId}`, size: formatBytes(f.sizeBytes) };
        let bar = fileBars.get(f.fileId);
        if (bar === undefined) {
          bar = multi.create(total, done, payload, { format: fileFormat });
          fileBars.set(f.fileId, bar);
        } else {
          bar.setTotal(total);
          bar.update(done, payload);
        }
      }
    },
    note(text) {
      if (stopped) err.write(`${text}\n`);
      else multi.log(`${text}\n`);
    },
    stop() {
      if (stopped) return;
      stopped = true;
      multi.stop();
    },
  };
}
