// Numbers as a person reads them: decimal units (what file managers and S3 consoles
// show), one decimal place below 10, whole numbers above.

const UNITS = ["B", "kB", "MB", "GB", "TB"] as const;

export function formatBytes(value: number | bigint): string {
  let n = Number(value);
  let unit = 0;
  while (n >= 1000 && unit < UNITS.length - 1) {
    n /= 1000;
    unit += 1;
  }
  const digits = unit === 0 || n >= 10 ? 0 : 1;
  return `${n.toFixed(digits)} ${UNITS[unit]}`;
}

export function formatRate(bytesPerSecond: number | bigint): string {
  return `${formatBytes(bytesPerSecond)}/s`;
}

export function formatDuration(seconds: number): string {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return s % 60 === 0 ? `${m} min` : `${m} min ${s % 60} s`;
  const h = Math.floor(m / 60);
  return m % 60 === 0 ? `${h} h` : `${h} h ${m % 60} min`;
}

/** Whole percent of done/total, 0 when the total is not known yet. */
export function percentOf(done: number | bigint, total: number | bigint): number {
  const t = Number(total);
  if (!(t > 0)) return 0;
  return Math.min(100, Math.max(0, Math.floor((Number(done) / t) * 100)));
}

export function shortId(jobId: string): string {
  return jobId.slice(0, 8);
}

export function formatTime(ms: number): string {
  const d = new Date(ms);
  const sameDay = new Date().toDateString() === d.toDateString();
  return sameDay
    ? d.toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit" })
    : d.toLocaleString(undefined, {
        month: "short",
        day: "numeric",
        hour: "2-digit",
        minute: "2-digit",
      });
}
