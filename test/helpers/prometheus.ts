import { spawn } from "node:child_process";
import { once } from "node:events";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { freePort, StopWaiting, waitUntil } from "../../local/ports.js";

// Reads Prometheus' text exposition format the way a scraper would, for assertions on
// /metrics: one sample per line, `name{label="value",...} number`.

export interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

export function parseMetrics(text: string): Sample[] {
  const out: Sample[] = [];
  for (const line of text.split("\n")) {
    if (line === "" || line.startsWith("#")) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
    if (m === null) throw new Error(`not a Prometheus sample: ${line}`);
    const labels: Record<string, string> = {};
    for (const l of (m[2] ?? "").matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) {
      labels[l[1] ?? ""] = (l[2] ?? "").replace(/\\(.)/g, "$1");
    }
    out.push({ name: m[1] ?? "", labels, value: Number(m[3]) });
  }
  return out;
}

/** Sum of the samples of `name` whose labels include `labels` (0 when there is none). */
export function metricValue(
  samples: Sample[],
  name: string,
  labels: Record<string, string> = {},
): number {
  return samples
    .filter((s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v))
    .reduce((n, s) => n + s.value, 0);
}

/** Whether any sample of `name` exists (a counter that never moved has none with labels). */
export function hasMetric(samples: Sample[], name: string): boolean {
  return samples.some((s) => s.name === name);
}

export async function scrape(url: string): Promise<Sample[]> {
  const res = await fetch(url);
  if (res.status !== 200) throw new Error(`${url} answered ${res.status}`);
  if (!(res.headers.get("content-type") ?? "").startsWith("text/plain")) {
    throw new Error(`${url} is not Prometheus text: ${res.headers.get("content-type") ?? ""}`);
  }
  return parseMetrics(await res.text());
}

/** A real Prometheus or Alertmanager (Debian's packages) on a free loopback port. */
export interface PrometheusServer {
  url: string;
  pid: number;
  /** The server's own output, for failure messages. */
  output(): string;
  stop(): Promise<void>;
}

export interface PrometheusAlert {
  labels: Record<string, string>;
  annotations: Record<string, string>;
  state: "pending" | "firing";
}

/**
 * Starts `prometheus` with `config` (YAML text) written into a fresh folder, next to
 * the `files` it names (rule files), and resolves once /-/ready answers.
 */
export function startPrometheus(
  config: string,
  files: Record<string, string> = {},
): Promise<PrometheusServer> {
  return startDaemon("prometheus", config, files, (dir, config, port) => [
    `--config.file=${config}`,
    `--storage.tsdb.path=${join(dir, "data")}`,
    `--web.listen-address=127.0.0.1:${port}`,
    "--log.level=warn",
  ]);
}

/** Starts Debian's Alertmanager with `config` (YAML text), its cluster port off. */
export function startAlertmanager(config: string): Promise<PrometheusServer> {
  return startDaemon("prometheus-alertmanager", config, {}, (dir, config, port) => [
    `--config.file=${config}`,
    `--storage.path=${join(dir, "data")}`,
    `--web.listen-address=127.0.0.1:${port}`,
    // Its default gossips on 0.0.0.0:9094; one instance needs no cluster.
    "--cluster.listen-address=",
    "--log.level=warn",
  ]);
}

async function startDaemon(
  bin: string,
  config: string,
  files: Record<string, string>,
  args: (dir: string, configFile: string, port: number) => string[],
): Promise<PrometheusServer> {
  const dir = mkdtempSync(join(tmpdir(), `dj-${bin}-`));
  const configFile = join(dir, "config.yml");
  writeFileSync(configFile, config);
  for (const [name, text] of Object.entries(files)) writeFileSync(join(dir, name), text);
  const port = await freePort();
  const child = spawn(bin, args(dir, configFile, port), { stdio: ["ignore", "pipe", "pipe"] });
  let out = "";
  child.stdout?.on("data", (d: Buffer) => (out += d.toString()));
  child.stderr?.on("data", (d: Buffer) => (out += d.toString()));
  const exited = once(child, "exit");
  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill("SIGTERM");
      const timer = setTimeout(() => child.kill("SIGKILL"), 5000);
      await exited;
      clearTimeout(timer);
    }
    rmSync(dir, { recursive: true, force: true });
  };
  const url = `http://127.0.0.1:${port}`;
  try {
    await waitUntil(bin, async () => {
      if (child.exitCode !== null) throw new StopWaiting(`${bin} exited: ${out}`);
      return (await fetch(`${url}/-/ready`)).ok;
    });
  } catch (err) {
    await stop();
    throw err;
  }
  return { url, pid: child.pid ?? 0, output: () => out, stop };
}

/** The alerts Prometheus holds right now, pending and firing (GET /api/v1/alerts). */
export async function prometheusAlerts(url: string): Promise<PrometheusAlert[]> {
  const res = await fetch(`${url}/api/v1/alerts`);
  const body = (await res.json()) as { data: { alerts: PrometheusAlert[] } };
  return body.data.alerts;
}

/** An instant query's samples (GET /api/v1/query): labels and value of each. */
export async function prometheusQuery(
  url: string,
  query: string,
): Promise<{ metric: Record<string, string>; value: number }[]> {
  const res = await fetch(`${url}/api/v1/query?query=${encodeURIComponent(query)}`);
  const body = (await res.json()) as {
    data: { result: { metric: Record<string, string>; value: [number, string] }[] };
  };
  return body.data.result.map((r) => ({ metric: r.metric, value: Number(r.value[1]) }));
}
