import { createHmac, createSecretKey, type KeyObject, timingSafeEqual } from "node:crypto";
import { InvalidInputError, JOB_STATES, type JobStateName } from "./jobs.js";

// AIP-158 page tokens for every list of ours (ListJobs, ListJobHistory): the cursor,
// readable but signed with HMAC-SHA256 over the purpose, the owner and the filter as
// well, so a token cannot be altered, nor replayed by another owner, with another filter
// or on another list (the cursor would mean nothing there).

export class PageTokens<Cursor> {
  // A KeyObject, made once: a raw Buffer key is imported again on every HMAC.
  private readonly key: KeyObject;

  constructor(
    secret: Buffer,
    /** Names the list and the token's version, e.g. "history-page-v1". */
    private readonly purpose: string,
    /** Says which request fields make the filter, for the error message. */
    private readonly filterFields: string,
    /** Whether a decoded cursor has the expected shape. */
    private readonly valid: (c: unknown) => c is Cursor,
  ) {
    this.key = createSecretKey(secret);
  }

  private mac(owner: string, filter: string, payload: string): Buffer {
    return createHmac("sha256", this.key)
      .update(`${this.purpose}\n${owner}\n${filter}\n${payload}`)
      .digest();
  }

  sign(owner: string, filter: string, cursor: Cursor): string {
    const payload = Buffer.from(JSON.stringify(cursor)).toString("base64url");
    return `${payload}.${this.mac(owner, filter, payload).toString("base64url")}`;
  }

  verify(owner: string, filter: string, token: string): Cursor {
    const refused = new InvalidInputError(
      "page_token is not a token this server gave for this filter and caller: " +
        `pass next_page_token unchanged, with the same ${this.filterFields}, ` +
        "or leave page_token empty for the first page",
    );
    const [payload, sig, extra] = token.split(".");
    if (payload === undefined || sig === undefined || extra !== undefined) throw refused;
    const want = this.mac(owner, filter, payload);
    const got = Buffer.from(sig, "base64url");
    if (got.length !== want.length || !timingSafeEqual(got, want)) throw refused;
    let cursor: unknown;
    try {
      cursor = JSON.parse(Buffer.from(payload, "base64url").toString("utf8"));
    } catch {
      throw refused;
    }
    if (!this.valid(cursor)) throw refused;
    return cursor;
  }
}

/** What every list of jobs takes: a page size, states and a creation time range. */
export interface JobsFilter {
  /** 0 for the default; clamped to the list's maximum. */
  pageSize: number;
  states: readonly JobStateName[];
  /** Inclusive, ms. */
  createdFrom?: number | undefined;
  /** Exclusive, ms. */
  createdBefore?: number | undefined;
}

/**
 * Checks the common part of a list request and returns the page size to use and the
 * states, distinct and sorted (as the token's filter binds them).
 */
export function checkJobsFilter(
  q: JobsFilter,
  sizes: { default: number; max: number },
): { size: number; states: JobStateName[] } {
  if (!Number.isInteger(q.pageSize) || q.pageSize < 0)
    throw new InvalidInputError(`page_size must be 0 (default) or positive, got ${q.pageSize}`);
  for (const s of q.states)
    if (!(JOB_STATES as readonly string[]).includes(s))
      throw new InvalidInputError(`states: unknown state ${s}`);
  if (
    q.createdFrom !== undefined &&
    q.createdBefore !== undefined &&
    q.createdBefore <= q.createdFrom
  )
    throw new InvalidInputError(
      "create_time_end must be after create_time_start (the range would hold no job)",
    );
  return {
    size: Math.min(q.pageSize === 0 ? sizes.default : q.pageSize, sizes.max),
    states: [...new Set(q.states)].sort(),
  };
}
