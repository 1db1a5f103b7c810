import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { cpus, totalmem } from "node:os";
import { join } from "node:path";

// Shared bits of the benchmark scenarios: process memory readings, percentiles, the
// printed table and the JSON written under bench/results/.

/** Resident and peak resident memory of a process, from /proc (bytes). */
export function procMemory(pid: number): { rss: number; peak: number } {
  const status = readFileSync(`/proc/${pid}/status`, "utf8");
  const kb = (field: string) => Number(new RegExp(`^${field}:\\s+(\\d+) kB`, "m").exec(status)?.[1] ?? 0) * 1024;
  return { rss: kb("VmRSS"), peak: kb("VmHWM") };
}

export function percentile(values: readonly number[], p: number): number {
  if (values.length === 0) return Number.NaN;
  const sorted = [...values].sort((a, b) => a - b);
  const idx = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[idx] as number;
}

export const MB = 1024 * 1024;

export function fmt(n: number, digits = 1): string {
  return Number.isFinite(n) ? n.toFixed(digits) : "n/a";
}

export interface Row {
  scenario: string;
  metric: string;
  value: string;
  target?: string;
  ok?: boolean;
}

export function printTable(rows: readonly Row[]): void {
  const head = ["scenario", "metric", "value", "target", "met"];
  const cells = rows.map((r) => [r.scenario, r.metric, r.value, r.target ?? "", r.ok === undefined ? "" : r.ok ? "yes" : "NO"]);
  const widths = head.map((h, i) => Math.max(h.length, ...cells.map((c) => (c[i] ?? "").length)));
  const line = (c: string[]) => `| ${c.map((s, i) => s.padEnd(widths[i] ?? 0)).join(" | ")} |`;
  process.stdout.write(`${line(head)}\n|${widths.map((w) => "-".repeat(w + 2)).join("|")}|\n`);
  for (const c of cells) process.stdout.write(`${line(c)}\n`);
}

export function writeResults(name: string, data: unknown): string {
  const dir = join(process.cwd(), "bench", "results");
  mkdirSync(dir, { recursive: true });
  const file = join(dir, `${name}-${new Date().toISOString().replace(/[:.]/g, "-")}.json`);
  const machine = { cpus: cpus().length, cpuModel: cpus()[0]?.model, memBytes: totalmem(), node: process.version };
  writeFileSync(file, `${JSON.stringify({ name, at: new Date().toISOString(), machine, data }, null, 2)}\n`);
  return file;
}
