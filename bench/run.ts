import { benchBundle } from "./bundle.js";
import { benchCancel } from "./cancel.js";
import { benchFailover } from "./failover.js";
import { benchFairness } from "./fairness.js";
import { benchForecast } from "./forecast.js";
import { benchHistory } from "./history.js";
import { benchJobFiles } from "./job-files.js";
import { benchJobs } from "./jobs.js";
import { printTable, type Row, writeResults } from "./lib.js";
import { benchListJobs } from "./list-jobs.js";
import { benchPolling } from "./polling.js";
import { benchSoak } from "./soak.js";
import { benchWatch } from "./watch.js";
import { benchFanoutJobs, benchWatch50k } from "./watch-many.js";

// npm run bench [-- scenario...] [--quick]. Each scenario runs alone or all in order;
// ratios are measured side by side in one run, since absolute figures drift.

type Scenario = (opts: { quick: boolean }) => Promise<{ rows: Row[]; data: unknown }>;

const scenarios: Record<string, Scenario> = {
  polling: benchPolling,
  watch: benchWatch,
  "watch-50k": benchWatch50k,
  "fanout-jobs": benchFanoutJobs,
  jobs: benchJobs,
  cancel: benchCancel,
  bundle: benchBundle,
  "job-files": benchJobFiles,
  soak: benchSoak,
  failover: benchFailover,
  history: benchHistory,
  fairness: benchFairness,
  "list-jobs": benchListJobs,
  forecast: benchForecast,
};

const args = process.argv.slice(2);
const quick = args.includes("--quick");
const names = args.filter((a) => !a.startsWith("--"));
const chosen = names.length > 0 ? names : Object.keys(scenarios);
const unknown = chosen.filter((n) => !(n in scenarios));
if (unknown.length > 0) {
  process.stderr.write(
    `unknown scenario(s): ${unknown.join(", ")}; choose from: ${Object.keys(scenarios).join(", ")}\n`,
  );
  process.exit(2);
}

const all: Row[] = [];
for (const name of chosen) {
  process.stderr.write(`running ${name}${quick ? " (quick)" : ""}...\n`);
  const { rows, data } = await (scenarios[name] as Scenario)({ quick });
  const file = writeResults(name, data);
  process.stderr.write(`  results: ${file}\n`);
  all.push(...rows);
}
printTable(all);
