import { resolve } from "node:path";
import { StopWaiting, waitUntil } from "../../local/ports.js";
import { type ServiceProcess, startServiceProcess } from "../../local/service-process.js";
import { STARTUP_MS } from "./deadline.js";
import { echoLine } from "./test-log.js";

// An API or worker started from its real entry point as a process of its own, its JSON
// log lines kept for the test to read (LOG_FORMAT=json).

const ROOT = resolve(import.meta.dirname, "../..");

export interface EntryProcess {
  proc: ServiceProcess;
  lines: Record<string, unknown>[];
}

/** `entry` (server/main.ts, worker/main.ts) through tsx, or as compiled into `compiledIn`. */
export function startEntry(
  name: string,
  entry: string,
  env: Record<string, string>,
  compiledIn?: string,
): EntryProcess {
  const lines: Record<string, unknown>[] = [];
  const echo = echoLine(name);
  const proc = startServiceProcess({
    name,
    entry,
    ...(compiledIn !== undefined ? { compiledIn } : {}),
    cwd: ROOT,
    env: { ...process.env, ...env },
    onLine: (line) => {
      echo(line);
      if (line.startsWith("{")) lines.push(JSON.parse(line) as Record<string, unknown>);
    },
  });
  return { proc, lines };
}

/** Waits until the process logs `msg`; fails at once if it exits first. */
export function untilLogged(name: string, p: EntryProcess, msg: string): Promise<void> {
  return waitUntil(
    `${name}: ${msg}`,
    async () => {
      if (!p.proc.running())
        throw new StopWaiting(`${name} exited: ${JSON.stringify(p.lines.slice(-3))}`);
      return p.lines.some((l) => l.msg === msg);
    },
    STARTUP_MS,
  );
}
