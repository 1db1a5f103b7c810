import { spawn } from "node:child_process";
import { resolve } from "node:path";
import { describe, expect, test } from "vitest";
import { logFormatFor } from "../core/logger.js";
import { nodeArgsFor } from "../local/service-process.js";

// Logs as people and log shippers read them: one JSON object per line by default when
// the output is not a terminal, readable lines with LOG_FORMAT=pretty. Each run is a
// real worker process that stops at once on its missing configuration.

const ROOT = resolve(import.meta.dirname, "..");

function runWorker(env: Record<string, string>): Promise<{ code: number | null; out: string }> {
  const child = spawn(process.execPath, nodeArgsFor("worker/main.ts"), {
    cwd: ROOT,
    // No REDIS_URL nor S3_ENDPOINT: the worker logs one fatal line and exits 2.
    env: { PATH: process.env.PATH ?? "", ...env },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let out = "";
  child.stdout.on("data", (d: Buffer) => (out += d.toString()));
  child.stderr.on("data", (d: Buffer) => (out += d.toString()));
  return new Promise((done) => child.once("close", (code) => done({ code, out })));
}

describe("logs", () => {
  test("are one JSON object per line when the output is not a terminal", async () => {
    const { code, out } = await runWorker({});
    expect(code).toBe(2);
    const line = JSON.parse(out.trim().split("\n")[0] ?? "") as Record<string, unknown>;
    expect(line).toMatchObject({ level: 60, name: "worker" });
    expect(String(line.msg)).toContain("REDIS_URL");
  });

  test("LOG_FORMAT=pretty prints readable lines instead", async () => {
    const { code, out } = await runWorker({ LOG_FORMAT: "pretty" });
    expect(code).toBe(2);
    expect(out).toContain("FATAL");
    expect(out).toContain("REDIS_URL");
    expect(() => JSON.parse(out.trim().split("\n")[0] ?? "")).toThrow();
  });

  test("LOG_FORMAT wins; unset, a pipe or production means JSON", () => {
    expect(logFormatFor({ LOG_FORMAT: "pretty", NODE_ENV: "production" })).toBe("pretty");
    expect(logFormatFor({ LOG_FORMAT: "json" })).toBe("json");
    // This test's output is a pipe to the test runner, not a terminal.
    expect(logFormatFor({})).toBe(process.stdout.isTTY === true ? "pretty" : "json");
    expect(logFormatFor({ NODE_ENV: "production" })).toBe("json");
  });
});
