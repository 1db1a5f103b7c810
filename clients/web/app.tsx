import { Code, ConnectError } from "@connectrpc/connect";
import { useEffect, useMemo, useRef, useState } from "react";
import { SAMPLE_FILES } from "../../local/sample-files.js";
import { createDownloadClient } from "../lib/client.js";
import { useDownloadJob } from "../react/use-download-job.js";
import { FilePicker } from "./components/file-picker.js";
import { JobPanel } from "./components/job-panel.js";
import { RecentJobs } from "./components/recent-jobs.js";
import { TokenForm } from "./components/token-form.js";
import { describeError, stateName } from "./messages.js";
import {
  loadCurrentJob,
  loadRecent,
  loadToken,
  patchRecent,
  type RecentJob,
  saveCurrentJob,
  saveRecent,
  saveToken,
  upsertRecent,
} from "./saved.js";

/** The page: pick files, start a job, watch it (resumed after a reload), download it. */
export function App() {
  const [token, setToken] = useState(loadToken);
  // The page is served by the API it calls: same origin, no CORS.
  const client = useMemo(
    () =>
      createDownloadClient({ baseUrl: window.location.origin, ...(token !== "" ? { token } : {}) }),
    [token],
  );
  const [jobId, setJobId] = useState<string | undefined>(loadCurrentJob);
  const [recent, setRecent] = useState<RecentJob[]>(loadRecent);
  const [starting, setStarting] = useState(false);
  const [startError, setStartError] = useState<string | undefined>(undefined);
  const watch = useDownloadJob(client, jobId);
  const heading = useRef<HTMLHeadingElement>(null);
  const focusJob = useRef(false);

  const select = (id: string | undefined, focus: boolean) => {
    focusJob.current = focus;
    setJobId(id);
    saveCurrentJob(id);
  };

  useEffect(() => {
    if (!focusJob.current || jobId === undefined) return;
    focusJob.current = false;
    heading.current?.focus();
  }, [jobId]);

  useEffect(() => saveRecent(recent), [recent]);

  // The recent list keeps each job's last known state for the next visit.
  const { job, error, connection } = watch;
  const percent = job?.progress?.percent ?? 0;
  // biome-ignore lint/correctness/useExhaustiveDependencies: a new job object arrives with every message; only its id, state and percent change the list
  useEffect(() => {
    if (job === undefined) return;
    const patch = { state: stateName(job.state), percent, updatedAt: Date.now() };
    setRecent((list) =>
      list.some((j) => j.jobId === job.jobId)
        ? patchRecent(list, job.jobId, patch)
        : upsertRecent(list, {
            jobId: job.jobId,
            fileIds: [...job.fileIds],
            createdAt: Date.now(),
            ...patch,
          }),
    );
  }, [job?.jobId, job?.state, percent]);
  const gone = error?.code === Code.NotFound && connection === "idle";
  useEffect(() => {
    if (gone && jobId !== undefined)
      setRecent((list) => patchRecent(list, jobId, { state: "GONE", updatedAt: Date.now() }));
  }, [gone, jobId]);

  const start = async (fileIds: number[]) => {
    setStarting(true);
    setStartError(undefined);
    try {
      const created = (await client.initiate({ fileIds })).job;
      if (created === undefined)
        throw new ConnectError("Initiate answered without a job", Code.Internal);
      const now = Date.now();
      setRecent((list) =>
        upsertRecent(list, {
          jobId: created.jobId,
          fileIds,
          state: stateName(created.state),
          percent: 0,
          createdAt: now,
          updatedAt: now,
        }),
      );
      select(created.jobId, true);
    } catch (err) {
      setStartError(describeError(ConnectError.from(err), "start", false));
    } finally {
      setStarting(false);
    }
  };

  return (
    <>
      <header className="page-head">
        <h1>Download jobs</h1>
        <TokenForm
          token={token}
          onApply={(t) => {
            saveToken(t);
            setToken(t);
          }}
        />
      </header>
      <main>
        <FilePicker
          files={SAMPLE_FILES}
          starting={starting}
          error={startError}
          onStart={(ids) => void start(ids)}
        />
        {jobId !== undefined && (
          <JobPanel
            key={jobId}
            jobId={jobId}
            watch={watch}
            client={client}
            headingRef={heading}
            onClose={() => select(undefined, false)}
          />
        )}
        <RecentJobs
          jobs={recent}
          currentJobId={jobId}
          onSelect={(id) => select(id, true)}
          onClear={() => setRecent([])}
        />
      </main>
    </>
  );
}
