import { hkdfSync, randomBytes } from "node:crypto";
import { decodeJob, type JobStore } from "./job-store.js";
import type { JobRecord } from "./jobs.js";
import type { Labels } from "./labels.js";
import { checkJobsFilter, type JobsFilter, PageTokens } from "./page-tokens.js";

// ListJobs: an owner's live jobs, newest first, read from the owner's index in Redis (a
// sorted set by creation time that Initiate and DeleteJob keep in the same steps as the
// record, core/lua/admit.lua and delete-job.lua). A page is one script call that looks
// at a bounded number of index members (core/lua/list-jobs.lua), so its cost does not
// grow with the owner's total; the next page starts from the position in its token.

export const DEFAULT_LIST_PAGE_SIZE = 50;
export const MAX_LIST_PAGE_SIZE = 200;

/** Index members one call may look at: the page, and room for a filter that skips some. */
export function listScanBudget(pageSize: number): number {
  return pageSize * 5 + 100;
}

export interface JobListQuery extends JobsFilter {
  pageToken: string;
  /** Every pair must be on the job (validated: core/labels.ts). */
  labels: Labels;
}

export interface JobListPage {
  jobs: JobRecord[];
  /** Empty on the last page. */
  nextPageToken: string;
}

/** Where a page ended: the last looked-at member's score (creation ms) and id. */
interface Cursor {
  s: number;
  i: string;
}

const isCursor = (c: unknown): c is Cursor =>
  Number.isFinite((c as Cursor | null)?.s) && typeof (c as Cursor | null)?.i === "string";

export class JobIndex {
  private tokens: Promise<PageTokens<Cursor>> | undefined;

  constructor(private readonly store: JobStore) {}

  async list(owner: string, q: JobListQuery): Promise<JobListPage> {
    const { size, states } = checkJobsFilter(q, {
      default: DEFAULT_LIST_PAGE_SIZE,
      max: MAX_LIST_PAGE_SIZE,
    });
    const filter = JSON.stringify([
      states,
      q.createdFrom ?? null,
      q.createdBefore ?? null,
      Object.entries(q.labels),
    ]);
    const tokens = await this.pageTokens();
    const cursor = q.pageToken === "" ? undefined : tokens.verify(owner, filter, q.pageToken);
    // The cursor is inside the range: it came from a page of this very filter.
    const max =
      cursor !== undefined
        ? String(cursor.s)
        : q.createdBefore !== undefined
          ? `(${q.createdBefore}`
          : "+inf";
    const reply = (await this.store.scripts.djListJobs(
      this.store.keys.ownerJobs(owner),
      this.store.keys.jobPrefix,
      owner,
      max,
      cursor?.i ?? "",
      q.createdFrom !== undefined ? String(q.createdFrom) : "-inf",
      String(size),
      String(listScanBudget(size)),
      states.join(","),
      Object.keys(q.labels).length > 0 ? JSON.stringify(q.labels) : "",
      this.store.keys.jobFilesPrefix,
    )) as string[];
    const [nextScore, nextId, ...jobs] = reply;
    return {
      jobs: jobs.map((json) => decodeJob(JSON.parse(json) as Record<string, string>)),
      nextPageToken:
        nextScore !== undefined && nextScore !== "" && nextId !== undefined
          ? tokens.sign(owner, filter, { s: Number(nextScore), i: nextId })
          : "",
    };
  }

  /**
   * The page tokens' key, derived from a random secret kept in Redis: the first API
   * process to list makes it (SET NX), every other one of the deployment reads the same,
   * so a token made by one instance is good on all. Whoever can read it can read the jobs.
   */
  private pageTokens(): Promise<PageTokens<Cursor>> {
    if (this.tokens === undefined) {
      const key = this.store.keys.listPageSecret;
      const redis = this.store.redis;
      const made = (async () => {
        await redis.set(key, randomBytes(32).toString("hex"), "NX");
        const secret = await redis.get(key);
        if (secret === null) throw new Error("the page token secret vanished from Redis");
        return new PageTokens<Cursor>(
          Buffer.from(hkdfSync("sha256", secret, "", "download-jobs list page tokens v1", 32)),
          "jobs-page-v1",
          "states, create_time range and labels",
          isCursor,
        );
      })();
      // A failed attempt (Redis down) is not kept: the next call tries again.
      made.catch(() => {
        if (this.tokens === made) this.tokens = undefined;
      });
      this.tokens = made;
    }
    return this.tokens;
  }
}
