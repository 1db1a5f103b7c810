import { ConnectError } from "@connectrpc/connect";
import { useCallback, useEffect, useRef, useState } from "react";
import type { Job } from "../../gen/downloads/v1/download_service_pb.js";
import type { DownloadClient } from "../lib/client.js";
import { type JobsFilter, listJobsPage } from "../lib/jobs.js";

// useJobs: the caller's jobs as a React list, from ListJobs (newest first, page by page),
// with the two actions a list offers: delete a finished job, run a failed or cancelled
// one again. The filter is compared by value, so an object literal per render is fine.
// Nothing here knows about a page.

export interface JobList {
  /** The jobs loaded so far, newest first. */
  jobs: Job[];
  /** A page is being loaded. */
  loading: boolean;
  /** Why the last load or action failed; cleared by the next success. */
  error: ConnectError | undefined;
  /** More jobs follow the loaded ones: loadMore() fetches them. */
  hasMore: boolean;
  /** Appends the next page. */
  loadMore(): Promise<void>;
  /** Loads the list again from its first page (e.g. after a job changed). */
  refresh(): Promise<void>;
  /** DeleteJob, then drops the job from the list. Rejects with the ConnectError. */
  deleteJob(jobId: string): Promise<void>;
  /** RetryJob, then shows the job queued again. Rejects with the ConnectError. */
  retryJob(jobId: string): Promise<Job | undefined>;
}

interface ListState {
  key: string;
  jobs: Job[];
  nextPageToken: string;
  loading: boolean;
  error: ConnectError | undefined;
}

/**
 * The caller's jobs matching `filter` (ListJobs: states, create time range, labels,
 * pageSize per page). `client` undefined lists nothing (e.g. before sign-in).
 */
export function useJobs(client: DownloadClient | undefined, filter: JobsFilter = {}): JobList {
  const key = JSON.stringify(filter, (_k, v: unknown) =>
    typeof v === "bigint" ? v.toString() : v,
  );
  const filterRef = useRef(filter);
  filterRef.current = filter;
  const [state, setState] = useState<ListState>({
    key,
    jobs: [],
    nextPageToken: "",
    loading: false,
    error: undefined,
  });
  // Which load is current: an answer to an older one (another filter, client or a
  // refresh since) is dropped.
  const generation = useRef(0);
  const abort = useRef<AbortController | undefined>(undefined);

  const load = useCallback(
    async (token: string, append: boolean) => {
      if (client === undefined) return;
      const gen = append ? generation.current : ++generation.current;
      if (!append) abort.current?.abort();
      const ac = new AbortController();
      abort.current = ac;
      setState((s) => ({ ...s, key, loading: true }));
      try {
        const page = await listJobsPage(client, filterRef.current, token, { signal: ac.signal });
        if (gen !== generation.current) return;
        setState((s) => ({
          key,
          jobs: append ? [...s.jobs, ...page.jobs] : page.jobs,
          nextPageToken: page.nextPageToken,
          loading: false,
          error: undefined,
        }));
      } catch (err) {
        if (gen !== generation.current || ac.signal.aborted) return;
        setState((s) => ({ ...s, loading: false, error: ConnectError.from(err) }));
      }
    },
    [client, key],
  );

  useEffect(() => {
    setState({ key, jobs: [], nextPageToken: "", loading: false, error: undefined });
    void load("", false);
    return () => {
      generation.current += 1;
      abort.current?.abort();
    };
  }, [load, key]);

  const loadMore = useCallback(async () => {
    if (state.nextPageToken !== "" && !state.loading) await load(state.nextPageToken, true);
  }, [load, state.nextPageToken, state.loading]);

  const refresh = useCallback(() => load("", false), [load]);

  const deleteJob = useCallback(
    async (jobId: string) => {
      if (client === undefined) return;
      try {
        await client.deleteJob({ jobId });
      } catch (err) {
        const e = ConnectError.from(err);
        setState((s) => ({ ...s, error: e }));
        throw e;
      }
      setState((s) => ({ ...s, error: undefined, jobs: s.jobs.filter((j) => j.jobId !== jobId) }));
    },
    [client],
  );

  const retryJob = useCallback(
    async (jobId: string) => {
      if (client === undefined) return undefined;
      let job: Job | undefined;
      try {
        job = (await client.retryJob({ jobId })).job;
      } catch (err) {
        const e = ConnectError.from(err);
        setState((s) => ({ ...s, error: e }));
        throw e;
      }
      if (job !== undefined) {
        const queued = job;
        setState((s) => ({
          ...s,
          error: undefined,
          jobs: s.jobs.map((j) => (j.jobId === jobId ? queued : j)),
        }));
      }
      return job;
    },
    [client],
  );

  // Until the effect has run for a new filter, the old filter's jobs are not shown.
  const current = state.key === key;
  return {
    jobs: current ? state.jobs : [],
    loading: current ? state.loading : client !== undefined,
    error: current ? state.error : undefined,
    hasMore: current && state.nextPageToken !== "",
    loadMore,
    refresh,
    deleteJob,
    retryJob,
  };
}
