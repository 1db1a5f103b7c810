import { readFileSync } from "node:fs";
import { basename, resolve } from "node:path";
import { Code, ConnectError } from "@connectrpc/connect";
import cliProgress from "cli-progress";
import { Command, CommanderError, Option } from "commander";
import { type Job, JobState } from "../../gen/downloads/v1/download_service_pb.js";
import type { DownloadClient } from "../lib/client.js";
import { createDownloadClient } from "../lib/node.js";
import { isTerminalJob, type WatchEvent, watchJob } from "../lib/watch.js";
import { DownloadError, downloadToFile, FileExistsError } from "./download-file.js";
import { formatBytes, jobJson, outcomeLine, stateName, summary } from "./format.js";
import { addJobCommands, parseLabelArgs } from "./job-commands.js";
import { createView } from "./view.js";

// download-jobs: start, follow, cancel and fetch download jobs from a terminal or a
// script. Exit codes: 0 completed (or the command did what it said), 1 failed or an
// error, 2 usage error, 3 cancelled, 130 detached by Ctrl-C.

const { version } = JSON.parse(
  readFileSync(new URL("../../package.json", import.meta.url), "utf8"),
) as { version: string };

const EXIT = { ok: 0, failed: 1, usage: 2, cancelled: 3, interrupted: 130 } as const;

/** A mistake in what the user typed: exit 2 with a message saying what to fix. */
class UsageError extends Error {
  override name = "UsageError";
}

interface Globals {
  url: string;
  protocol: "connect" | "grpc-web" | "grpc";
  token?: string;
  json: boolean;
}

const out = (line = "") => process.stdout.write(`${line}\n`);
const err = (line: string) => process.stderr.write(`${line}\n`);

function clientFor(g: Globals): DownloadClient {
  let url: URL;
  try {
    url = new URL(g.url);
  } catch {
    throw new UsageError(`--url must be a URL such as http://127.0.0.1:8080, got "${g.url}"`);
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") {
    throw new UsageError(`--url must start with http:// or https://, got "${g.url}"`);
  }
  return createDownloadClient({
    baseUrl: g.url,
    protocol: g.protocol,
    ...(g.token !== undefined && g.token !== "" ? { token: g.token } : {}),
  });
}

function parseFileIds(raw: string[]): number[] {
  return raw.map((s) => {
    const n = Number(s);
    if (!/^\d+$/.test(s) || !Number.isSafeInteger(n) || n < 1 || n > 2_147_483_647) {
      throw new UsageError(
        `file ids are positive whole numbers (e.g. 70000 70001): "${s}" is not one`,
      );
    }
    return n;
  });
}

function exitFor(job: Job | undefined): number {
  switch (job?.state) {
    case JobState.COMPLETED:
      return EXIT.ok;
    case JobState.CANCELLED:
      return EXIT.cancelled;
    default:
      return EXIT.failed;
  }
}

function displayMode(g: Globals): "tty" | "plain" | "json" {
  if (g.json) return "json";
  return process.stdout.isTTY === true && process.stderr.isTTY === true ? "tty" : "plain";
}

function describeEvent(e: WatchEvent): string | undefined {
  switch (e.type) {
    case "reconnecting":
      // A clean end (the server's stream age limit) is routine: say nothing.
      return e.error === undefined
        ? undefined
        : `connection lost (${e.error.rawMessage}); reconnecting in ${(e.delayMs / 1000).toFixed(1)} s`;
    case "polling":
      return `live updates do not get through (${e.reason.rawMessage}); checking every second instead`;
    case "streaming":
      return "trying live updates again";
    default:
      return undefined;
  }
}

/**
 * Follows a job to its end on the terminal. Ctrl-C detaches (the job keeps running on
 * the server) unless cancelOnInterrupt; a second Ctrl-C exits at once.
 */
async function follow(
  client: DownloadClient,
  initial: Job,
  g: Globals,
  cancelOnInterrupt: boolean,
): Promise<{ code: number; job?: Job }> {
  const jobId = initial.jobId;
  // Ctrl-C is ours before anything is shown: a user (or a script) reacting to the first
  // line must not hit the default handler, which kills the process without a word.
  const abort = new AbortController();
  let interrupted = false;
  const onSigint = () => {
    if (interrupted) process.exit(EXIT.interrupted);
    interrupted = true;
    abort.abort();
  };
  process.on("SIGINT", onSigint);
  const view = createView(displayMode(g), process.stdout, process.stderr);
  // The job as the caller already has it is the first thing shown; the watch resumes
  // after its version, so a state that passed in between is not lost.
  view.show(initial);
  if (isTerminalJob(initial)) {
    process.off("SIGINT", onSigint);
    view.stop();
    if (!g.json) {
      out();
      for (const line of summary(initial)) out(line);
    }
    return { code: exitFor(initial), job: initial };
  }
  let last: Job = initial;
  let lost = false;
  try {
    for await (const job of watchJob(client, jobId, {
      signal: abort.signal,
      // While the job waits, it comes again with each fresher place in the queue.
      since: initial,
      queueEstimates: true,
      onEvent: (e) => {
        const text = describeEvent(e);
        if (text !== undefined) {
          lost = lost || e.type === "reconnecting";
          view.note(text);
        } else if (e.type === "connected" && lost) {
          lost = false;
          view.note("reconnected");
        }
      },
    })) {
      // With --json each line is a new version of the job; a fresher queue estimate alone
      // is not one.
      const repeat = job.version === last.version;
      last = job;
      if (!(g.json && repeat)) view.show(job);
    }
  } catch (e) {
    view.stop();
    if (!interrupted) throw e;
    if (cancelOnInterrupt) {
      const { job } = await client.cancel({ jobId }).catch((c: unknown) => {
        const ce = ConnectError.from(c);
        // Finished meanwhile: nothing to cancel, report how it ended.
        if (ce.code === Code.FailedPrecondition) return client.getStatus({ jobId });
        throw ce;
      });
      if (job !== undefined) report(job, g);
      return job?.state === JobState.CANCELLED
        ? { code: EXIT.cancelled, job }
        : { code: exitFor(job), ...(job ? { job } : {}) };
    }
    err(`\ndetached: job ${jobId} keeps running on the server.`);
    err(`resume with: download-jobs watch ${jobId}`);
    return { code: EXIT.interrupted };
  } finally {
    process.off("SIGINT", onSigint);
    view.stop();
  }
  if (!g.json) {
    out();
    for (const line of summary(last)) out(line);
  }
  return { code: exitFor(last), job: last };
}

function report(job: Job, g: Globals): void {
  if (g.json) out(jobJson(job));
  else for (const line of summary(job)) out(line);
}

async function download(
  client: DownloadClient,
  jobId: string,
  g: Globals,
  o: { output?: string; force: boolean },
): Promise<number> {
  let job = (await client.getStatus({ jobId })).job;
  if (job !== undefined && !isTerminalJob(job)) {
    if (!g.json) err(`job ${jobId} is ${stateName(job.state)}: waiting for it to finish`);
    const followed = await follow(client, job, g, false);
    if (followed.job === undefined) return followed.code;
    job = followed.job;
  }
  if (job === undefined) throw new ConnectError("the server answered without a job", Code.Internal);
  if (job.state !== JobState.COMPLETED || job.result === undefined) {
    err(`job ${jobId} is ${stateName(job.state)}: there is nothing to download`);
    if (!g.json) for (const line of summary(job)) err(line);
    return exitFor(job);
  }
  const result = job.result;
  const path = resolve(o.output ?? basename(result.fileName));
  const tty = displayMode(g) === "tty";
  const bar = tty
    ? new cliProgress.SingleBar(
        {
          stream: process.stderr,
          hideCursor: true,
          format: "{bar} {percentage}% | {done} of {size} | ETA {eta_formatted}",
        },
        cliProgress.Presets.shades_classic,
      )
    : undefined;
  bar?.start(Number(result.sizeBytes), 0, {
    done: formatBytes(0),
    size: formatBytes(result.sizeBytes),
  });
  const abort = new AbortController();
  const onSigint = () => abort.abort();
  process.on("SIGINT", onSigint);
  let saved: { bytes: number; sha256: string; resumedFrom: number };
  try {
    saved = await downloadToFile(result.downloadUrl, path, {
      expectedSha256: result.sha256,
      expectedBytes: Number(result.sizeBytes),
      force: o.force,
      signal: abort.signal,
      onProgress: (done) => bar?.update(done, { done: formatBytes(done) }),
      // The URL in hand expired (a long transfer, a resume much later): read the job again.
      freshUrl: async () => {
        const url = (await client.getStatus({ jobId })).job?.result?.downloadUrl ?? "";
        if (url === "")
          throw new DownloadError(`job ${jobId} has no ZIP to download any more (it expired)`);
        return url;
      },
      onNote: (text) => {
        if (!tty) err(text);
      },
    });
  } finally {
    process.off("SIGINT", onSigint);
    bar?.stop();
  }
  if (g.json) out(JSON.stringify({ jobId, path, sizeBytes: saved.bytes, sha256: saved.sha256 }));
  else out(`saved ${path} (${formatBytes(saved.bytes)}, sha256 ${saved.sha256} verified)`);
  return EXIT.ok;
}

/** Builds the command line; each action stores its exit code in `result`. */
function program(result: { code: number }): Command {
  const p = new Command("download-jobs")
    .description("Start, follow, cancel and download bundling jobs of a download-jobs API")
    // The runtime too: bin/download-jobs.js may have handed over to the pinned Node.
    .version(`${version} (Node ${process.version})`, "-V, --version")
    .addOption(
      new Option("--url <url>", "API base URL")
        .env("DOWNLOAD_JOBS_URL")
        .default("http://127.0.0.1:8080"),
    )
    .addOption(
      new Option("--protocol <protocol>", "wire protocol")
        .choices(["connect", "grpc-web", "grpc"])
        .default("connect"),
    )
    .addOption(
      new Option("--token <token>", "bearer token sent with every call").env("DOWNLOAD_JOBS_TOKEN"),
    )
    .option("--json", "machine-readable output: one JSON object per line", false)
    .showHelpAfterError("(run download-jobs --help for usage)")
    .exitOverride();
  p.configureHelp({ showGlobalOptions: true });
  const globals = (cmd: Command) => cmd.optsWithGlobals<Globals>();
  const run =
    (fn: (...args: never[]) => Promise<number>) =>
    async (...args: unknown[]) => {
      result.code = await (fn as (...a: unknown[]) => Promise<number>)(...args);
    };

  p.command("initiate")
    .description("start a job that bundles the given files into one ZIP")
    .argument("<fileIds...>", "source file ids, e.g. 70000 70001")
    .option("-w, --watch", "follow the job until it ends", false)
    .option(
      "--cancel-on-interrupt",
      "with --watch: Ctrl-C cancels the job instead of detaching",
      false,
    )
    .option(
      "--request-id <key>",
      "idempotency key (a UUID is best): a retry with the same key returns the same job",
    )
    .option(
      "-l, --label <key=value>",
      "a label of your own on the job (list --label finds it); repeat for several",
      (v: string, prev: string[]) => [...prev, v],
      [],
    )
    .option(
      "-p, --priority <0-9>",
      "how urgent the job is, 0 (default) to 9, up to what your token allows: higher starts sooner",
    )
    .action(
      run(
        async (
          raw: string[],
          o: {
            watch: boolean;
            cancelOnInterrupt: boolean;
            requestId?: string;
            label: string[];
            priority?: string;
          },
          cmd: Command,
        ) => {
          const g = globals(cmd);
          const fileIds = parseFileIds(raw);
          const labels = parseLabelArgs(o.label, (m) => new UsageError(m));
          const priority = o.priority === undefined ? 0 : Number(o.priority);
          if (!/^\d$/.test(o.priority ?? "0"))
            throw new UsageError(
              `--priority takes a whole number from 0 to 9, got "${o.priority}"`,
            );
          const client = clientFor(g);
          const { job, outcome } = await client.initiate({
            fileIds,
            labels,
            priority,
            ...(o.requestId !== undefined ? { requestId: o.requestId } : {}),
          });
          if (job === undefined)
            throw new ConnectError("the server answered without a job", Code.Internal);
          // A note, not data: on stderr, so --json output stays one job per line.
          err(outcomeLine(job.jobId, outcome));
          if (!o.watch) {
            report(job, g);
            return EXIT.ok;
          }
          return (await follow(client, job, g, o.cancelOnInterrupt)).code;
        },
      ),
    );

  p.command("status")
    .description("show a job as it is now")
    .argument("<jobId>")
    .action(
      run(async (jobId: string, _o: unknown, cmd: Command) => {
        const g = globals(cmd);
        const { job } = await clientFor(g).getStatus({ jobId });
        if (job !== undefined) report(job, g);
        return EXIT.ok;
      }),
    );

  p.command("watch")
    .description("follow a job until it ends (Ctrl-C detaches; the job keeps running)")
    .argument("<jobId>")
    .option("--cancel-on-interrupt", "Ctrl-C cancels the job instead of detaching", false)
    .action(
      run(async (jobId: string, o: { cancelOnInterrupt: boolean }, cmd: Command) => {
        const g = globals(cmd);
        const client = clientFor(g);
        // One plain call first: a wrong URL or id fails at once instead of being retried.
        const { job } = await client.getStatus({ jobId });
        if (job === undefined)
          throw new ConnectError("the server answered without a job", Code.Internal);
        return (await follow(client, job, g, o.cancelOnInterrupt)).code;
      }),
    );

  p.command("cancel")
    .description("stop a queued or running job")
    .argument("<jobId>")
    .action(
      run(async (jobId: string, _o: unknown, cmd: Command) => {
        const g = globals(cmd);
        const { job } = await clientFor(g).cancel({ jobId });
        if (job !== undefined) report(job, g);
        return EXIT.ok;
      }),
    );

  p.command("download")
    .description(
      "save a job's ZIP to a file and verify its SHA-256 (waits for the job if it is still running)",
    )
    .argument("<jobId>")
    .option("-o, --output <file>", "where to save it (default: the ZIP's name in this folder)")
    .option("-f, --force", "overwrite the file if it exists", false)
    .action(
      run(async (jobId: string, o: { output?: string; force: boolean }, cmd: Command) => {
        const g = globals(cmd);
        return download(clientFor(g), jobId, g, o);
      }),
    );

  addJobCommands(p, {
    run,
    globals,
    clientFor,
    report,
    follow: async (client, job, g) => (await follow(client, job, g, false)).code,
    usage: (m) => new UsageError(m),
    out,
    err,
  });

  return p;
}

/** Turns what went wrong into a message that says what to do, and an exit code. */
function failure(e: unknown, url: string): { code: number; lines: string[] } {
  if (e instanceof CommanderError) {
    // Commander has printed the message (or the help) already.
    const help =
      e.code === "commander.helpDisplayed" ||
      e.code === "commander.help" ||
      e.code === "commander.version";
    return { code: help ? EXIT.ok : EXIT.usage, lines: [] };
  }
  if (e instanceof UsageError || e instanceof FileExistsError)
    return { code: EXIT.usage, lines: [`error: ${e.message}`] };
  if (e instanceof DownloadError) return { code: EXIT.failed, lines: [`error: ${e.message}`] };
  const ce = ConnectError.from(e);
  switch (ce.code) {
    case Code.InvalidArgument:
      return { code: EXIT.usage, lines: [`error: ${ce.rawMessage}`] };
    case Code.NotFound:
      return { code: EXIT.failed, lines: [`error: ${ce.rawMessage}`] };
    case Code.Unauthenticated:
      return {
        code: EXIT.failed,
        lines: [`error: ${ce.rawMessage}: pass --token or set DOWNLOAD_JOBS_TOKEN`],
      };
    case Code.PermissionDenied:
    case Code.FailedPrecondition:
    case Code.ResourceExhausted:
      return { code: EXIT.failed, lines: [`error: ${ce.rawMessage}`] };
    case Code.Unavailable:
    case Code.Unknown:
    case Code.DeadlineExceeded:
    case Code.Unimplemented:
      return {
        code: EXIT.failed,
        lines: [
          `error: cannot reach the download-jobs API at ${url} (${ce.rawMessage})`,
          "is it running there? point to it with --url or DOWNLOAD_JOBS_URL",
        ],
      };
    default:
      return {
        code: EXIT.failed,
        lines: [
          `error: ${ce.code === Code.Internal ? "the server failed" : Code[ce.code]}: ${ce.rawMessage}`,
        ],
      };
  }
}

async function main(argv: string[]): Promise<number> {
  const result = { code: EXIT.ok as number };
  const p = program(result);
  try {
    await p.parseAsync(argv);
    return result.code;
  } catch (e) {
    const url = (p.opts() as Partial<Globals>).url ?? "http://127.0.0.1:8080";
    const f = failure(e, url);
    for (const line of f.lines) err(line);
    return f.code;
  }
}

// stdout and stderr are synchronous for files, terminals and pipes on Linux, so
// exiting here loses no output; it also closes idle keep-alive connections at once.
process.exit(await main(process.argv));
