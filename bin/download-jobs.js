#!/usr/bin/env node
// The `download-jobs` command: runs the TypeScript CLI through tsx, so a checkout needs
// no build step (tsx is a runtime dependency of this package).
import { spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { constants } from "node:os";
import { dirname, join } from "node:path";

// The code runs on the Node that `npm ci` installs from the pinned `node` package; npm
// scripts and npx put it first on the PATH. Called straight from a shell (or linked with
// `npm link`), `node` may be the system's older one: hand the command over to the pinned
// runtime instead of running untested.
const require = createRequire(import.meta.url);
const pinned = JSON.parse(readFileSync(new URL("../package.json", import.meta.url), "utf8"))
  .dependencies.node;
const major = (version) => Number(version.replace(/^v/, "").split(".")[0]);

if (major(process.version) < major(pinned)) {
  let runtime;
  try {
    runtime = join(dirname(require.resolve("node/package.json")), "bin", "node");
  } catch {
    process.stderr.write(
      `download-jobs runs on Node ${pinned} (this is ${process.version}): run \`npm ci\` in its folder, which installs it\n`,
    );
    process.exit(1);
  }
  const child = spawn(runtime, process.argv.slice(1), { stdio: "inherit" });
  // Ctrl-C reaches both processes from the terminal; the CLI decides what it means.
  process.on("SIGINT", () => {});
  process.on("SIGTERM", () => child.kill("SIGTERM"));
  child.on("exit", (code, signal) => {
    process.exit(code ?? 128 + (constants.signals[signal] ?? 0));
  });
} else {
  const { register } = await import("tsx/esm/api");
  register();
  await import("../clients/cli/main.ts");
}
