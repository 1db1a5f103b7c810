import { Code, ConnectError } from "@connectrpc/connect";
import { useEffect, useMemo, useRef, useState } from "react";
import { SAMPLE_FILES } from "../../local/sample-files.js";
import { createDownloadClient } from "../lib/client.js";
import { useDownloadJob } from "../react/use-download-job.js";
import { FilePicker } from "./components/file-picker.js";
import { JobList } from "./components/job-list.js";
import { JobPanel } from "./components/job-panel.js";
import { TokenForm } from "./components/token-form.js";
import { describeError } from "./messages.js";
import { loadCurrentJob, loadToken, saveCurrentJob, saveToken } from "./saved.js";

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
  // Bumped when a job starts: the job list reads its first page again.
  const [started, setStarted] = useState(0);
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

  const { job } = watch;
  // The list is read again when the watched job changes state, not on every progress tick.
  const listKey = `${started}:${job?.jobId ?? ""}:${job?.state ?? ""}`;

  const start = async (fileIds: number[]) => {
    setStarting(true);
    setStartError(undefined);
    try {
      const created = (await client.initiate({ fileIds })).job;
      if (created === undefined)
        throw new ConnectError("Initiate answered without a job", Code.Internal);
      setStarted((n) => n + 1);
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
        <JobList
          client={client}
          currentJobId={jobId}
          current={job}
          refreshKey={listKey}
          onSelect={(id) => select(id, true)}
          onDeleted={(id) => {
            if (id === jobId) select(undefined, false);
          }}
        />
      </main>
    </>
  );
}
