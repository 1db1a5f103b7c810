import { existsSync, readdirSync, readFileSync, statSync } from "node:fs";
import { dirname, relative, resolve } from "node:path";
import { describe, expect, test } from "vitest";
import { loadConfig } from "../core/config.js";

// The README is the front door and docs/ the manual: their commands, links and the
// configuration table must match the repository, or a newcomer is misled on the first day.

const ROOT = resolve(import.meta.dirname, "..");
const read = (path: string) => readFileSync(resolve(ROOT, path), "utf8");
const readme = read("README.md");
const configuration = read("docs/configuration.md");
const configSource = read("core/config.ts");
const pages = [
  "README.md",
  ...readdirSync(resolve(ROOT, "docs"))
    .filter((f) => f.endsWith(".md"))
    .map((f) => `docs/${f}`),
];

/** The keys of the zod schema in core/config.ts, read from its source text. */
function configKeys(): string[] {
  const body = /const schema = z\.object\(\{([\s\S]*?)\n\}\);/.exec(configSource)?.[1] ?? "";
  return [...body.matchAll(/^ {2}([A-Z][A-Z0-9_]*):/gm)].map((m) => m[1] ?? "");
}

/** Rows of the configuration table: variable name -> default cell. */
function tableRows(): Map<string, string> {
  const rows = new Map<string, string>();
  for (const m of configuration.matchAll(/^\| `([A-Z][A-Z0-9_]*)` +\| ([^|]*) \|/gm)) {
    rows.set(m[1] ?? "", (m[2] ?? "").trim());
  }
  return rows;
}

/** The text of a Markdown page outside its fenced code blocks. */
function prose(text: string): string {
  return text.replace(/^```[\s\S]*?^```$/gm, "");
}

/** GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens. */
function slug(heading: string): string {
  return heading
    .trim()
    .toLowerCase()
    .replace(/[^\p{L}\p{N}\s_-]/gu, "")
    .replace(/\s/g, "-");
}

/** Every anchor a page offers: its headings' slugs (numbered when repeated) and ids. */
function anchors(text: string): Set<string> {
  const seen = new Map<string, number>();
  const found = new Set<string>();
  for (const m of prose(text).matchAll(/^#{1,6} (.+)$/gm)) {
    const base = slug(m[1] ?? "");
    const n = seen.get(base) ?? 0;
    seen.set(base, n + 1);
    found.add(n === 0 ? base : `${base}-${n}`);
  }
  for (const m of text.matchAll(/ id="([^"]+)"/g)) found.add(m[1] ?? "");
  return found;
}

/** Relative link targets of a page: `[text](target)` outside code, not URLs. */
function relativeLinks(text: string): string[] {
  return [...prose(text).matchAll(/\]\(([^)\s]+)\)/g)]
    .map((m) => m[1] ?? "")
    .filter((t) => !/^[a-z][a-z0-9+.-]*:/i.test(t));
}

describe("README", () => {
  test("starts with the two commands a newcomer runs", () => {
    expect(readme).toContain("npm ci && npm start");
    expect(readme).toContain("npm ci && npm test");
    const scripts = (JSON.parse(read("package.json")) as { scripts: Record<string, string> })
      .scripts;
    expect(scripts.start).toBeDefined();
    expect(scripts.test).toBeDefined();
  });

  test("stays a front door: at most 200 lines", () => {
    expect(readme.split("\n").length).toBeLessThanOrEqual(200);
  });

  test("every npm script it names exists", () => {
    const scripts = (JSON.parse(read("package.json")) as { scripts: Record<string, string> })
      .scripts;
    const named = [...readme.matchAll(/npm run (?:-s )?([a-z][a-z0-9:-]*)/g)].map((m) => m[1]);
    expect(named.length).toBeGreaterThan(0);
    expect(named.filter((n) => n === undefined || scripts[n] === undefined)).toEqual([]);
  });
});

describe("docs", () => {
  test("every relative link in README.md and docs/*.md reaches a file (and its anchor)", () => {
    const broken: string[] = [];
    for (const page of pages) {
      const text = read(page);
      for (const target of relativeLinks(text)) {
        const [path = "", anchor] = target.split("#");
        const file = path === "" ? resolve(ROOT, page) : resolve(ROOT, dirname(page), path);
        if (!existsSync(file)) {
          broken.push(`${page}: ${target} (no such file)`);
          continue;
        }
        if (anchor === undefined || !file.endsWith(".md") || !statSync(file).isFile()) continue;
        if (!anchors(readFileSync(file, "utf8")).has(anchor)) {
          broken.push(`${page}: ${target} (no heading #${anchor} in ${relative(ROOT, file)})`);
        }
      }
    }
    expect(broken).toEqual([]);
  });

  test("the README links every page of docs/", () => {
    const linked = new Set(relativeLinks(readme).map((t) => t.split("#")[0]));
    expect(pages.filter((p) => p !== "README.md" && !linked.has(p))).toEqual([]);
  });

  test("say each thing once: no prose line of the README is repeated in docs/", () => {
    const lines = (text: string) =>
      prose(text)
        .split("\n")
        .map((l) => l.trim())
        .filter((l) => l.length >= 60 && !l.startsWith("|"));
    const readmeLines = new Set(lines(readme));
    const repeated = pages
      .filter((p) => p !== "README.md")
      .flatMap((p) =>
        lines(read(p))
          .filter((l) => readmeLines.has(l))
          .map((l) => `${p}: ${l}`),
      );
    expect(repeated).toEqual([]);
  });
});

describe("docs/configuration.md", () => {
  test("lists every configuration variable of core/config.ts in its table", () => {
    const keys = configKeys();
    expect(keys.length).toBeGreaterThan(10);
    const rows = tableRows();
    expect(keys.filter((k) => !rows.has(k))).toEqual([]);
    expect([...rows.keys()].filter((k) => !keys.includes(k))).toEqual([]);
  });

  test("its index at the top links every subject's table", () => {
    const linked = new Set(relativeLinks(configuration).map((t) => t.replace(/^#/, "")));
    const subjects = [...prose(configuration).matchAll(/^## (.+)$/gm)].map((m) => slug(m[1] ?? ""));
    expect(subjects.length).toBeGreaterThan(5);
    expect(subjects.filter((s) => !linked.has(s))).toEqual([]);
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
