import { execFileSync } from "node:child_process";
import { cpSync, rmSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

// `npm run build` (and the image's build stage): compiles the API and the worker
// (core, server, worker, gen) to JavaScript in dist/ with tsc, beside the files they
// read at run time (the Lua scripts, the history migrations). The image runs
// `node dist/server/main.js`: no TypeScript compiled at every start, and 20–50 MB less
// memory per process than under tsx (docs/deployment.md, "The image").
// `npm start` and the tests run the sources through tsx, with no build step.

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..");

/** Files the compiled code reads next to itself (new URL(..., import.meta.url)). */
export const RUNTIME_ASSETS = ["core/lua", "core/history-sql"];

/** Compiles into `outDir` (relative to the checkout; default dist), replacing what was there. */
export function buildServer(outDir = "dist"): string {
  const out = resolve(ROOT, outDir);
  rmSync(out, { recursive: true, force: true });
  // The package's exports do not name its bin; it sits beside package.json.
  const tsc = join(
    dirname(createRequire(import.meta.url).resolve("typescript/package.json")),
    "bin/tsc",
  );
  execFileSync(process.execPath, [tsc, "-p", "tsconfig.build.json", "--outDir", out], {
    cwd: ROOT,
    stdio: "inherit",
  });
  for (const dir of RUNTIME_ASSETS) cpSync(join(ROOT, dir), join(out, dir), { recursive: true });
  return out;
}

if (process.argv[1] !== undefined && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const out = buildServer(process.argv[2]);
  process.stdout.write(`compiled the API and the worker into ${out}\n`);
}
