import { createLogger, type Logger } from "../../core/logger.js";

// Quiet tests: service logs go through console, which vitest holds back and prints only
// for a test that fails (`silent: "passed-only"` in vitest.config.ts). LOG_LEVEL shows
// them as they come, at that level, for the services in this process and the children.

/** The level for the services a test runs as child processes: LOG_LEVEL, or warn. */
export function testLogLevel(): string {
  return process.env.LOG_LEVEL || "warn";
}

const toConsole = { write: (line: string) => console.log(line.trimEnd()) };

/** A logger for a service running inside the test process. */
export function testLogger(
  name: string,
  level = process.env.LOG_LEVEL || process.env.TEST_LOG_LEVEL || "warn",
): Logger {
  return createLogger(level, name, { destination: toConsole });
}

/** Hands each line of a child process's output to the test's console, tagged `[name]`. */
export function echoLine(name: string): (line: string) => void {
  return (line) => console.log(`[${name}] ${line}`);
}
