// What the page keeps in localStorage: the job being watched (so a reload resumes it),
// recent jobs with their last known state, and the access token. Storage can be full or
// switched off (private windows, policies): the page then works without memory.

const PREFIX = "download-jobs.";
const KEYS = {
  current: `${PREFIX}current-job`,
  recent: `${PREFIX}recent-jobs`,
  token: `${PREFIX}token`,
} as const;
export const MAX_RECENT = 10;

export interface RecentJob {
  jobId: string;
  fileIds: number[];
  /** JobState name ("JOB_STATE_COMPLETED"), or "GONE" once the server no longer knows it. */
  state: string;
  percent: number;
  createdAt: number;
  updatedAt: number;
}

function read(key: string): string | undefined {
  try {
    return localStorage.getItem(key) ?? undefined;
  } catch {
    return undefined;
  }
}

function write(key: string, value: string | undefined): void {
  try {
    if (value === undefined) localStorage.removeItem(key);
    else localStorage.setItem(key, value);
  } catch {
    // Full or disabled: the page still works, it only forgets on reload.
  }
}

export function loadCurrentJob(): string | undefined {
  return read(KEYS.current);
}

export function saveCurrentJob(jobId: string | undefined): void {
  write(KEYS.current, jobId);
}

export function loadToken(): string {
  return read(KEYS.token) ?? "";
}

export function saveToken(token: string): void {
  write(KEYS.token, token === "" ? undefined : token);
}

export function loadRecent(): RecentJob[] {
  const raw = read(KEYS.recent);
  if (raw === undefined) return [];
  try {
    const list: unknown = JSON.parse(raw);
    return Array.isArray(list) ? list.filter(isRecentJob).slice(0, MAX_RECENT) : [];
  } catch {
    return [];
  }
}

export function saveRecent(list: readonly RecentJob[]): void {
  write(KEYS.recent, JSON.stringify(list.slice(0, MAX_RECENT)));
}

/** Puts `entry` first (replacing an older entry of the same job), keeping MAX_RECENT. */
export function upsertRecent(list: readonly RecentJob[], entry: RecentJob): RecentJob[] {
  return [entry, ...list.filter((j) => j.jobId !== entry.jobId)].slice(0, MAX_RECENT);
}

/** Updates an entry in place (the order stays: the list is by creation). */
export function patchRecent(
  list: readonly RecentJob[],
  jobId: string,
  patch: Partial<RecentJob>,
): RecentJob[] {
  return list.map((j) => (j.jobId === jobId ? { ...j, ...patch } : j));
}

function isRecentJob(v: unknown): v is RecentJob {
  if (typeof v !== "object" || v === null) return false;
  const o = v as Record<string, unknown>;
  return (
    typeof o.jobId === "string" &&
    Array.isArray(o.fileIds) &&
    typeof o.state === "string" &&
    typeof o.percent === "number" &&
    typeof o.createdAt === "number" &&
    typeof o.updatedAt === "number"
  );
}
