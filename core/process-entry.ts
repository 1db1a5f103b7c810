import { type Config, ConfigError, loadConfig } from "./config.js";
import type { Logger } from "./logger.js";

// What every process entry (API, worker) does around its real work: read the config
// once or exit 2 naming the bad variables, and stop once on SIGTERM/SIGINT with a hard
// deadline so an orchestrator's kill never has to.

export function loadConfigOrExit(): Config {
  try {
    return loadConfig();
  } catch (err) {
    if (err instanceof ConfigError) {
      process.stderr.write(`${err.message}\n`);
      process.exit(2);
    }
    throw err;
  }
}

export interface StopOptions {
  log: Logger;
  /** Exit after this long even if `stop` has not finished. */
  graceMs: number;
  /** Exit code when the deadline passes first. */
  timeoutExitCode: number;
  /** Logged with the signal, e.g. the jobs still running. */
  context?: () => Record<string, unknown>;
}

/** Runs `stop` once on the first SIGTERM or SIGINT, then exits 0 (1 if it failed). */
export function exitOnStopSignals(stop: () => Promise<void>, opts: StopOptions): void {
  let stopping = false;
  const onSignal = (signal: NodeJS.Signals) => {
    if (stopping) return;
    stopping = true;
    opts.log.info({ signal, ...opts.context?.() }, "stopping");
    const hard = setTimeout(() => {
      opts.log.warn({ graceMs: opts.graceMs }, "shutdown took too long, exiting");
      process.exit(opts.timeoutExitCode);
    }, opts.graceMs);
    hard.unref();
    stop().then(
      () => process.exit(0),
      (err: unknown) => {
        opts.log.error({ err }, "shutdown failed");
        process.exit(1);
      },
    );
  };
  process.on("SIGTERM", onSignal);
  process.on("SIGINT", onSignal);
}
