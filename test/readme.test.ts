import { readFileSync } from "node:fs";
import { resolve } from "node:path";
import { describe, expect, test } from "vitest";
import { loadConfig } from "../core/config.js";

// The README is the front door: its commands and its configuration table must match
// the code, or a newcomer is misled on the first day.

const ROOT = resolve(import.meta.dirname, "..");
const readme = readFileSync(resolve(ROOT, "README.md"), "utf8");
const configSource = readFileSync(resolve(ROOT, "core/config.ts"), "utf8");

/** The keys of the zod schema in core/config.ts, read from its source text. */
function configKeys(): string[] {
  const body = /const schema = z\.object\(\{([\s\S]*?)\n\}\);/.exec(configSource)?.[1] ?? "";
  return [...body.matchAll(/^ {2}([A-Z][A-Z0-9_]*):/gm)].map((m) => m[1] ?? "");
}

/** Rows of the README's configuration table: variable name -> default cell. */
function tableRows(): Map<string, string> {
  const rows = new Map<string, string>();
  for (const m of readme.matchAll(/^\| `([A-Z][A-Z0-9_]*)` \| ([^|]*) \|/gm)) {
    rows.set(m[1] ?? "", (m[2] ?? "").trim());
  }
  return rows;
}

describe("README", () => {
  test("starts with the two commands a newcomer runs", () => {
    expect(readme).toContain("npm ci && npm start");
    expect(readme).toContain("npm ci && npm test");
  });

  test("lists every configuration variable of core/config.ts in its table", () => {
    const keys = configKeys();
    expect(keys.length).toBeGreaterThan(10);
    const rows = tableRows();
    expect(keys.filter((k) => !rows.has(k))).toEqual([]);
    expect([...rows.keys()].filter((k) => !keys.includes(k))).toEqual([]);
  });

  test("gives each variable the default the code applies", () => {
    const defaults = loadConfig({}) as Record<string, unknown>;
    for (const [key, cell] of tableRows()) {
      const value = defaults[key];
      if (value === undefined) continue;
      // The cell may add words after the value ("`8080`", "`900` (15 min)").
      expect(/`([^`]*)`/.exec(cell)?.[1], key).toBe(String(value));
    }
  });
});
