import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import type { Command } from "commander";
import { type Job, JobState } from "../../gen/downloads/v1/download_service_pb.js";
import type { DownloadClient } from "../lib/client.js";
import { type JobsFilter, listJobsPage } from "../lib/jobs.js";
import { jobJson, listLine } from "./format.js";

// The CLI's commands for jobs as a collection: list (ListJobs, paged and filtered),
// delete (DeleteJob) and retry (RetryJob). main.ts owns the program, the client and the
// way a job is followed; it hands them in.

export interface JobCommandsContext<G> {
  /** Wraps an action so its resolved number becomes the exit code. */
  run(fn: (...args: never[]) => Promise<number>): (...args: unknown[]) => Promise<void>;
  globals(cmd: Command): G & { json: boolean };
  clientFor(g: G): DownloadClient;
  /** Prints a job (JSON line or summary). */
  report(job: Job, g: G): void;
  /** Follows a job to its end; resolves to the exit code. */
  follow(client: DownloadClient, job: Job, g: G): Promise<number>;
  /** A mistake in what the user typed (exit 2). */
  usage(message: string): Error;
  out(line?: string): void;
  err(line: string): void;
}

const STATES: Record<string, JobState> = {
  queued: JobState.QUEUED,
  processing: JobState.PROCESSING,
  completed: JobState.COMPLETED,
  failed: JobState.FAILED,
  cancelled: JobState.CANCELLED,
};

/** `key=value` pairs from --label options into a labels map (the server checks them). */
export function parseLabelArgs(raw: readonly string[], usage: (m: string) => Error) {
  const labels: Record<string, string> = {};
  for (const item of raw) {
    const eq = item.indexOf("=");
    if (eq <= 0) throw usage(`--label takes key=value (e.g. --label team=data), got "${item}"`);
    labels[item.slice(0, eq)] = item.slice(eq + 1);
  }
  return labels;
}

const collect = (value: string, previous: string[]) => [...previous, value];

function parseTime(raw: string | undefined, flag: string, usage: (m: string) => Error) {
  if (raw === undefined) return undefined;
  const ms = Date.parse(raw);
  if (Number.isNaN(ms))
    throw usage(
      `${flag} takes a date or time such as 2026-12-01 or 2026-12-01T10:00:00Z, got "${raw}"`,
    );
  return timestampFromMs(ms);
}

export function addJobCommands<G>(p: Command, c: JobCommandsContext<G>): void {
  p.command("list")
    .description("list your jobs, newest first")
    .option(
      "-s, --state <state>",
      "only jobs in this state (queued, processing, completed, failed, cancelled); repeat for several",
      collect,
      [],
    )
    .option("-l, --label <key=value>", "only jobs with this label; repeat for several", collect, [])
    .option("--since <time>", "only jobs created at or after this time")
    .option("--before <time>", "only jobs created before this time")
    .option("-n, --limit <count>", "at most this many jobs (0 = all)", "50")
    .action(
      c.run(
        async (
          o: { state: string[]; label: string[]; since?: string; before?: string; limit: string },
          cmd: Command,
        ) => {
          const g = c.globals(cmd);
          const states = o.state.map((s) => {
            const state = STATES[s.toLowerCase()];
            if (state === undefined)
              throw c.usage(`--state takes one of ${Object.keys(STATES).join(", ")}, got "${s}"`);
            return state;
          });
          const limit = Number(o.limit);
          if (!/^\d+$/.test(o.limit) || !Number.isSafeInteger(limit))
            throw c.usage(`--limit takes a whole number (0 = all), got "${o.limit}"`);
          const since = parseTime(o.since, "--since", c.usage);
          const before = parseTime(o.before, "--before", c.usage);
          const filter: JobsFilter = {
            states,
            labels: parseLabelArgs(o.label, c.usage),
            ...(since !== undefined ? { createTimeStart: since } : {}),
            ...(before !== undefined ? { createTimeEnd: before } : {}),
          };
          const client = c.clientFor(g);
          let shown = 0;
          let token = "";
          do {
            const pageSize = limit === 0 ? 200 : Math.min(200, limit - shown);
            const page = await listJobsPage(client, { ...filter, pageSize }, token);
            for (const job of page.jobs) c.out(g.json ? jobJson(job) : listLine(job));
            shown += page.jobs.length;
            token = page.nextPageToken;
          } while (token !== "" && (limit === 0 || shown < limit));
          if (!g.json) {
            if (shown === 0) c.err("no jobs");
            else if (token !== "") c.err(`(${shown} shown; more with --limit 0)`);
          }
          return 0;
        },
      ),
    );

  p.command("delete")
    .description("forget a finished job and delete its ZIP (cancel a running job first)")
    .argument("<jobId>")
    .action(
      c.run(async (jobId: string, _o: unknown, cmd: Command) => {
        const g = c.globals(cmd);
        await c.clientFor(g).deleteJob({ jobId });
        if (g.json) c.out(JSON.stringify({ jobId, deleted: true }));
        else c.out(`job ${jobId}: deleted`);
        return 0;
      }),
    );

  p.command("retry")
    .description("run a failed or cancelled job again under the same id")
    .argument("<jobId>")
    .option("-w, --watch", "follow the job until it ends", false)
    .option(
      "--request-id <key>",
      "idempotency key: a repeat with the same key does not queue the job again",
    )
    .action(
      c.run(async (jobId: string, o: { watch: boolean; requestId?: string }, cmd: Command) => {
        const g = c.globals(cmd);
        const client = c.clientFor(g);
        const { job, replayed } = await client.retryJob({
          jobId,
          ...(o.requestId !== undefined ? { requestId: o.requestId } : {}),
        });
        if (job === undefined)
          throw new ConnectError("the server answered without a job", Code.Internal);
        c.err(
          replayed
            ? `job ${jobId}: replayed (this request id was sent before; nothing queued again)`
            : `job ${jobId}: queued again (attempt ${job.attempts + 1} next)`,
        );
        if (!o.watch) {
          c.report(job, g);
          return 0;
        }
        return c.follow(client, job, g);
      }),
    );
}
