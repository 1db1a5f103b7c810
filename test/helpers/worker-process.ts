import { type ChildProcess, spawn } from "node:child_process";
import { once } from "node:events";
import { createInterface } from "node:readline";
import { nodeArgsFor } from "../../local/service-process.js";
import { echoLine } from "./test-log.js";

/** A worker as a separate process (`worker/main.ts`), for crash and cross-process tests. */
export interface WorkerProcess {
  child: ChildProcess;
  output(): string;
  kill(signal?: NodeJS.Signals): Promise<number | null>;
}

export function spawnWorker(env: Record<string, string>): WorkerProcess {
  const child = spawn(process.execPath, nodeArgsFor("worker/main.ts"), {
    env: { ...process.env, ...env },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let out = "";
  const echo = echoLine(`worker ${child.pid}`);
  for (const stream of [child.stdout, child.stderr]) {
    if (stream === null) continue;
    stream.on("data", (d: Buffer) => (out += d.toString()));
    createInterface({ input: stream, crlfDelay: Infinity }).on("line", echo);
  }
  return {
    child,
    output: () => out,
    async kill(signal = "SIGTERM") {
      if (child.exitCode !== null || child.signalCode !== null) return child.exitCode;
      const exited = once(child, "exit");
      child.kill(signal);
      const [code] = (await exited) as [number | null];
      return code;
    },
  };
}
