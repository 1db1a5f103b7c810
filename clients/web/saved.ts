// What the page keeps in localStorage: the job being watched (so a reload resumes it) and
// the access token (the job list comes from the server: ListJobs). Storage can be full or
// switched off (private windows, policies): the page then works without memory.

const PREFIX = "download-jobs.";
const KEYS = {
  current: `${PREFIX}current-job`,
  token: `${PREFIX}token`,
} as const;

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
