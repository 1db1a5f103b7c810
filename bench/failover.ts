import { Code } from "@connectrpc/connect";
import { JobState } from "../gen/downloads/v1/download_service_pb.js";
import {
  type DrillKind,
  type DrillReport,
  longestOutageMs,
  runFailoverDrill,
} from "../test/helpers/failover-drill.js";
import { fmt, percentile, type Row } from "./lib.js";

// What a Redis failover costs a caller: the primary holding the queue's hash slot is
// killed (kill -9) under Initiate load (20 calls a second, watchers on every other job,
// two workers), on a Redis Cluster of three masters and three replicas and on a
// primary with a replica and a Sentinel. The drill is the one test/failover.test.ts
// asserts on; here it is measured. Loopback only; each drill takes about 20 s.

function measure(kind: DrillKind, r: DrillReport): { rows: Row[]; data: unknown } {
  const scenario = `failover ${kind}`;
  const after = r.probes.filter((p) => p.at >= r.killedAt);
  const downAt = after.find((p) => p.api !== 200)?.at ?? r.killedAt;
  const readyAgainAt = after.find((p) => p.at > downAt && p.api === 200)?.at ?? Number.NaN;
  // The window: from the kill until the API reports ready again.
  const inWindow = r.calls.filter((c) => c.at >= r.killedAt && c.at <= readyAgainAt);
  const before = r.calls.filter((c) => c.at < r.killedAt && c.jobId !== undefined);
  const errors = r.calls.filter((c) => c.code !== undefined);
  const reruns = [...r.started.values()].filter((k) => k > 1).length;
  const lost = [...r.completed.values()].filter((t) => t.length > 1).length;
  const outage = longestOutageMs(r);
  const rows: Row[] = [
    {
      scenario,
      metric: "replica promoted after kill, ms",
      value: fmt(r.promotedAt - r.killedAt, 0),
    },
    { scenario, metric: "time without a successful Initiate, ms", value: fmt(outage, 0) },
    { scenario, metric: "API /readyz not ready, ms", value: fmt(readyAgainAt - downAt, 0) },
    {
      scenario,
      metric: "Initiate p99 before the kill, ms",
      value: fmt(
        percentile(
          before.map((c) => c.ms),
          99,
        ),
      ),
    },
    {
      scenario,
      metric: "Initiate p99 during the window, ms",
      value: fmt(
        percentile(
          inWindow.map((c) => c.ms),
          99,
        ),
      ),
    },
    {
      scenario,
      metric: "Initiate errors (all UNAVAILABLE + Retry-After)",
      value: `${errors.length} of ${r.calls.length}`,
      ok: errors.every(
        (c) => c.code === Code.Unavailable && c.retryAfter !== null && c.retryAfter !== undefined,
      ),
    },
    { scenario, metric: "jobs re-run (a second run started)", value: String(reruns) },
    { scenario, metric: "completions lost with the old primary", value: String(lost) },
    {
      scenario,
      metric: "acknowledged jobs not completed",
      value: String(
        [...r.finals.values()].filter((j) => j.state !== JobState.COMPLETED).length +
          (r.calls.filter((c) => c.jobId !== undefined).length - r.finals.size),
      ),
      target: "0",
    },
  ];
  const last = rows.at(-1) as Row;
  last.ok = last.value === "0";
  return {
    rows,
    data: {
      kind,
      promotedMs: r.promotedAt - r.killedAt,
      outageMs: outage,
      notReadyMs: readyAgainAt - downAt,
      calls: r.calls,
      reruns,
      lostCompletions: lost,
    },
  };
}

export async function benchFailover(opts: {
  quick: boolean;
}): Promise<{ rows: Row[]; data: unknown }> {
  const rows: Row[] = [];
  const data: unknown[] = [];
  // The workers' and the API's log lines go to the console in tests; not here.
  const log = console.log;
  console.log = () => undefined;
  try {
    for (const kind of opts.quick ? (["cluster"] as const) : (["cluster", "sentinel"] as const)) {
      const report = await runFailoverDrill({ kind, rate: 20, warmup: 30, after: 30 });
      const m = measure(kind, report);
      rows.push(...m.rows);
      data.push(m.data);
    }
  } finally {
    console.log = log;
  }
  return { rows, data };
}
