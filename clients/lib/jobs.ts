import type { MessageInitShape } from "@bufbuild/protobuf";
import type { Job, ListJobsRequestSchema } from "../../gen/downloads/v1/download_service_pb.js";
import type { DownloadClient } from "./client.js";

// The caller's jobs as a list: ListJobs pages, with what a caller must know about them
// done once here. A page may hold fewer jobs than asked while more follow (the server
// looks at a bounded number of jobs per call); only an empty next_page_token ends the
// list. The CLI's `list` and the React hook useJobs both page through this.

/** What ListJobs filters on (page_size included); the page token is this module's. */
export type JobsFilter = Omit<
  MessageInitShape<typeof ListJobsRequestSchema>,
  "pageToken" | "$typeName"
>;

export interface JobsPage {
  jobs: Job[];
  /** Where the next page starts; "" when the list has ended. */
  nextPageToken: string;
}

export interface JobsPageOptions {
  signal?: AbortSignal | undefined;
  /** Most ListJobs calls spent filling one page (default 10). */
  maxCalls?: number;
}

/**
 * The next page of the caller's jobs from `pageToken` ("" for the first): calls ListJobs
 * until it has filter.pageSize jobs (50 when unset), the list ends, or maxCalls is
 * spent, so a sparse filter still fills a page.
 */
export async function listJobsPage(
  client: DownloadClient,
  filter: JobsFilter,
  pageToken = "",
  opts: JobsPageOptions = {},
): Promise<JobsPage> {
  const want = filter.pageSize !== undefined && filter.pageSize > 0 ? filter.pageSize : 50;
  const jobs: Job[] = [];
  let token = pageToken;
  for (let calls = 0; calls < (opts.maxCalls ?? 10); calls++) {
    const page = await client.listJobs(
      { ...filter, pageSize: want - jobs.length, pageToken: token },
      opts.signal !== undefined ? { signal: opts.signal } : {},
    );
    jobs.push(...page.jobs);
    token = page.nextPageToken;
    if (token === "" || jobs.length >= want) break;
  }
  return { jobs, nextPageToken: token };
}

/** Every job of the caller that matches `filter`, newest first, page after page. */
export async function* listAllJobs(
  client: DownloadClient,
  filter: JobsFilter = {},
  opts: { signal?: AbortSignal } = {},
): AsyncGenerator<Job, void, undefined> {
  let token = "";
  do {
    const page = await listJobsPage(client, filter, token, opts);
    yield* page.jobs;
    token = page.nextPageToken;
  } while (token !== "");
}
