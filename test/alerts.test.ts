import { execFile } from "node:child_process";
import { readFileSync } from "node:fs";
import { resolve } from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { parse, stringify } from "yaml";
import { freePort, waitUntil } from "../local/ports.js";
import { type ApiStack, startApiStack } from "./helpers/api.js";
import {
  type PrometheusServer,
  prometheusAlerts,
  prometheusQuery,
  startAlertmanager,
  startPrometheus,
} from "./helpers/prometheus.js";
import { type Services, startServices } from "./helpers/services.js";
import { spawnWorker, type WorkerProcess } from "./helpers/worker-process.js";

// The alerting rules (deploy/prometheus/alerts.yml), checked three ways: promtool's own
// unit tests (alerts.test.yml: series that must and must not make each alert fire),
// every metric a rule reads is one the API or worker really exports, and a real
// Prometheus scraping a real API and worker sees an alert fire when S3 goes away.

const run = promisify(execFile);
const ROOT = resolve(import.meta.dirname, "..");
const read = (path: string) => readFileSync(resolve(ROOT, path), "utf8");

interface Rule {
  alert: string;
  expr: string;
  for?: string;
  annotations: Record<string, string>;
}
const rules = (parse(read("deploy/prometheus/alerts.yml")) as { groups: { rules: Rule[] }[] })
  .groups[0]?.rules as Rule[];

/** The metric names an expression reads (not functions, label names or durations). */
function metricsOf(expr: string): string[] {
  const bare = expr
    .replace(/"[^"]*"/g, "")
    .replace(/\{[^}]*\}/g, "")
    .replace(/\[[^\]]*\]/g, "")
    .replace(/\b(by|on|without|ignoring)\s*\([^)]*\)/g, "");
  const words = bare.match(/[a-zA-Z_:][a-zA-Z0-9_:]*/g) ?? [];
  const promql = new Set(
    "sum max min avg count and or unless vector rate delta increase histogram_quantile".split(" "),
  );
  return [...new Set(words.filter((w) => !promql.has(w)))];
}

describe("alert rules, offline", () => {
  test("every alert the issue asks for is there, with a runbook in docs/operations.md", () => {
    const names = rules.map((r) => r.alert);
    for (const want of [
      "QueueBacklogGrowing",
      "NoWorkerTakingJobs",
      "JobFailureRatioHigh",
      "JobStuckProcessing",
      "WebhookBacklog",
      "JobDurationP95High",
      "ApiServerErrorRatioHigh",
      "ReadinessFailing",
      "HistoryWriterLagging",
    ])
      expect(names).toContain(want);
    const operations = read("docs/operations.md");
    for (const r of rules) {
      expect(r.annotations.runbook, r.alert).toBe(`docs/operations.md#${r.alert.toLowerCase()}`);
      // A Markdown heading whose anchor is the alert's name in lower case.
      expect(operations, r.alert).toMatch(new RegExp(`^#{2,4} ${r.alert}$`, "m"));
    }
  });

  test("every alert has a promtool case where it fires and one where it must not", () => {
    const cases = (
      parse(read("deploy/prometheus/alerts.test.yml")) as {
        tests: { alert_rule_test: { alertname: string; exp_alerts: unknown[] }[] }[];
      }
    ).tests.flatMap((t) => t.alert_rule_test);
    for (const r of rules) {
      const mine = cases.filter((c) => c.alertname === r.alert);
      expect(
        mine.some((c) => c.exp_alerts.length > 0),
        `${r.alert} fires somewhere`,
      ).toBe(true);
      expect(
        mine.some((c) => c.exp_alerts.length === 0),
        `${r.alert} stays quiet somewhere`,
      ).toBe(true);
    }
  });

  test("promtool: the configuration and its rules load, and every rule test passes", async () => {
    const config = await run("promtool", ["check", "config", "deploy/prometheus/prometheus.yml"], {
      cwd: ROOT,
    });
    expect(config.stdout).toMatch(/SUCCESS: 1 rule files found/);
    expect(config.stdout).toMatch(new RegExp(`SUCCESS: ${rules.length} rules found`));
    // Exits non-zero (and execFile rejects, with promtool's diff) on any failed case.
    const tested = await run("promtool", ["test", "rules", "deploy/prometheus/alerts.test.yml"], {
      cwd: ROOT,
    });
    expect(tested.stdout).toMatch(/SUCCESS/);
  });

  test("amtool: Alertmanager's configuration loads", async () => {
    const checked = await run("amtool", ["check-config", "deploy/alertmanager/alertmanager.yml"], {
      cwd: ROOT,
    });
    expect(checked.stdout).toMatch(/SUCCESS/);
  });
});

describe("alert rules against a real Prometheus, API and worker", () => {
  let svc: Services;
  let st: ApiStack;
  let worker: WorkerProcess | undefined;
  let prom: PrometheusServer | undefined;
  let alertmanager: PrometheusServer | undefined;
  let workerUrl: string;

  beforeAll(async () => {
    svc = await startServices();
    st = await startApiStack({}, { services: svc });
    const workerPort = await freePort();
    workerUrl = `http://127.0.0.1:${workerPort}`;
    worker = spawnWorker({
      ...svc.env,
      QUEUE_PREFIX: st.cfg.QUEUE_PREFIX,
      WORKER_HEALTH_PORT: String(workerPort),
      READY_TIMEOUT_MS: "500",
      SHUTDOWN_GRACE_MS: "2000",
      // Turns on the webhook and history metrics. Nothing listens on port 9: the
      // writer retries quietly, which is what it does with PostgreSQL down.
      WEBHOOK_SECRET: "alerts-test-webhook-secret",
      HISTORY_DATABASE_URL: "postgres://nobody@127.0.0.1:9/none",
    });
    await waitUntil("worker ready", async () => (await fetch(`${workerUrl}/readyz`)).ok, 60_000);
  }, 90_000);

  afterAll(async () => {
    await prom?.stop();
    await alertmanager?.stop();
    await worker?.kill("SIGKILL");
    await st?.stop();
    await svc?.stop();
  });

  test("every metric a rule reads is one the API or the worker exports", async () => {
    const exported = new Set<string>(["up"]); // written by Prometheus for each target
    for (const url of [st.server.url, workerUrl]) {
      const text = await (await fetch(`${url}/metrics`)).text();
      for (const m of text.matchAll(/^# TYPE (\S+) (\S+)$/gm)) {
        const [, name = "", type] = m;
        exported.add(name);
        if (type === "histogram")
          for (const s of ["_bucket", "_count", "_sum"]) exported.add(name + s);
      }
    }
    for (const r of rules) {
      const used = metricsOf(r.expr);
      expect(used.length, r.alert).toBeGreaterThan(0);
      for (const name of used) expect(exported.has(name), `${r.alert} reads ${name}`).toBe(true);
    }
  });

  test("ReadinessFailing fires for the API and the worker once S3 stops answering", async () => {
    // The real rules, with each `for:` cut to 2 s: the test proves the expressions and
    // Prometheus' pending -> firing path, not the wait an operator chose.
    const fast = parse(read("deploy/prometheus/alerts.yml")) as { groups: { rules: Rule[] }[] };
    for (const g of fast.groups) for (const r of g.rules) if (r.for !== undefined) r.for = "2s";
    const target = (url: string) => new URL(url).host;
    // The compose stack's own Alertmanager configuration, unchanged.
    alertmanager = await startAlertmanager(read("deploy/alertmanager/alertmanager.yml"));
    prom = await startPrometheus(
      stringify({
        global: { scrape_interval: "1s", evaluation_interval: "1s", scrape_timeout: "900ms" },
        rule_files: ["alerts.yml"],
        alerting: {
          alertmanagers: [{ static_configs: [{ targets: [target(alertmanager.url)] }] }],
        },
        scrape_configs: [
          { job_name: "api", static_configs: [{ targets: [target(st.server.url)] }] },
          { job_name: "worker", static_configs: [{ targets: [target(workerUrl)] }] },
        ],
      }),
      { "alerts.yml": stringify(fast) },
    );
    const url = prom.url;

    // Both scraped and ready, and nothing about readiness pending or firing.
    await expect
      .poll(
        async () =>
          (await prometheusQuery(url, "readiness_ok"))
            .map((s) => `${s.metric.job}=${s.value}`)
            .sort(),
        { timeout: 60_000, interval: 250 },
      )
      .toEqual(["api=1", "worker=1"]);
    const before = await prometheusAlerts(url);
    expect(before.filter((a) => a.labels.alertname === "ReadinessFailing")).toEqual([]);

    await svc.s3.stop();

    await expect
      .poll(
        async () =>
          (await prometheusAlerts(url))
            .filter((a) => a.labels.alertname === "ReadinessFailing" && a.state === "firing")
            .map((a) => a.labels.job)
            .sort(),
        { timeout: 60_000, interval: 250 },
      )
      .toEqual(["api", "worker"]);
    // Why, in Prometheus' own data: the s3 check failed, Redis' did not.
    const checks = await prometheusQuery(url, "readiness_check_ok");
    const failed = checks
      .filter((s) => s.value === 0)
      .map((s) => `${s.metric.job}:${s.metric.check}`);
    expect(failed.sort()).toEqual(["api:s3", "worker:s3"]);
    const firing = (await prometheusAlerts(url)).find((a) => a.labels.job === "worker");
    expect(firing?.annotations.summary).toMatch(/^worker 127\.0\.0\.1:\d+ is not ready$/);
    expect(firing?.labels.severity).toBe("critical");

    // And Prometheus handed both to Alertmanager, which holds them for its receiver.
    const amUrl = alertmanager.url;
    await expect
      .poll(
        async () => {
          const res = await fetch(
            `${amUrl}/api/v2/alerts?filter=alertname%3D%22ReadinessFailing%22`,
          );
          const alerts = (await res.json()) as {
            labels: Record<string, string>;
            receivers: { name: string }[];
            status: { state: string };
          }[];
          return alerts
            .map(
              (a) => `${a.labels.job} ${a.status.state} ${a.receivers.map((r) => r.name).join()}`,
            )
            .sort();
        },
        { timeout: 60_000, interval: 250 },
      )
      .toEqual(["api active operators", "worker active operators"]);
  }, 120_000);
});
