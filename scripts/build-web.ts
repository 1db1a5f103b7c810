import { mkdir, readdir, readFile, rename, rm, writeFile } from "node:fs/promises";
import { basename, dirname, join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { build } from "esbuild";

// `npm run build:web` (and prestart/pretest): bundles the browser page in clients/web into
// clients/web/dist with esbuild. Assets get content hashes in their names, so the server
// can let browsers cache them for good while index.html is revalidated on every load.

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const SOURCE_DIR = join(ROOT, "clients/web");
/** Where the page's script and stylesheet tags go in clients/web/index.html. */
const ASSETS_MARKER = "<!-- assets -->";

export interface BuildWebOptions {
  /** Output folder; default clients/web/dist. */
  outDir?: string;
  /**
   * React's development build, unminified: StrictMode then mounts every component
   * twice, as in an app's dev server (the browser test checks the hook survives that).
   */
  development?: boolean;
}

export interface BuildWebResult {
  outDir: string;
  /** Output files relative to outDir, index.html included. */
  files: string[];
  bytes: number;
}

export async function buildWeb(opts: BuildWebOptions = {}): Promise<BuildWebResult> {
  const outDir = resolve(opts.outDir ?? join(SOURCE_DIR, "dist"));
  const assetsDir = join(outDir, "assets");
  await mkdir(assetsDir, { recursive: true });
  const result = await build({
    absWorkingDir: ROOT,
    entryPoints: [join(SOURCE_DIR, "main.tsx"), join(SOURCE_DIR, "styles.css")],
    bundle: true,
    format: "esm",
    platform: "browser",
    // Browsers whose fetch streams responses (Connect-Web's server streams need it).
    target: ["es2022", "chrome111", "firefox115", "safari16.4"],
    jsx: "automatic",
    minify: opts.development !== true,
    sourcemap: "linked",
    outdir: assetsDir,
    entryNames: "[name]-[hash]",
    assetNames: "[name]-[hash]",
    // React picks its production build from this; without it the page ships dev checks.
    define: {
      "process.env.NODE_ENV": opts.development === true ? '"development"' : '"production"',
    },
    legalComments: "linked",
    metafile: true,
    logLevel: "warning",
  });

  const outputs = Object.keys(result.metafile.outputs).map((p) => resolve(ROOT, p));
  const rel = (p: string) => relative(outDir, p).split("\\").join("/");
  const scripts = outputs.filter((p) => p.endsWith(".js")).map(rel);
  const styles = outputs.filter((p) => p.endsWith(".css")).map(rel);
  const tags = [
    ...styles.map((href) => `<link rel="stylesheet" href="/${href}">`),
    ...scripts.map((src) => `<script type="module" src="/${src}"></script>`),
  ].join("\n    ");

  const template = await readFile(join(SOURCE_DIR, "index.html"), "utf8");
  if (!template.includes(ASSETS_MARKER))
    throw new Error(`clients/web/index.html lacks ${ASSETS_MARKER}`);
  // Written to a temporary name and renamed, so a server reading it meanwhile never
  // sees half a file or a page naming assets that are not there yet.
  const indexPath = join(outDir, "index.html");
  const tmp = join(outDir, `.index-${process.pid}-${Date.now()}.html`);
  await writeFile(tmp, template.replace(ASSETS_MARKER, tags));
  await rename(tmp, indexPath);

  // Earlier builds' hashed assets are removed only now that nothing names them.
  const keep = new Set(outputs.map((p) => basename(p)));
  for (const name of await readdir(assetsDir)) {
    if (!keep.has(name)) await rm(join(assetsDir, name), { force: true });
  }

  const bytes = Object.values(result.metafile.outputs).reduce((n, o) => n + o.bytes, 0);
  return { outDir, files: ["index.html", ...outputs.map(rel)], bytes };
}

if (process.argv[1] !== undefined && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const started = performance.now();
  buildWeb().then(
    (r) => {
      const ms = Math.round(performance.now() - started);
      process.stdout.write(
        `[build:web] ${relative(ROOT, r.outDir)}: ${r.files.length} files, ${(r.bytes / 1024).toFixed(0)} KiB in ${ms} ms\n`,
      );
    },
    (err: unknown) => {
      process.stderr.write(
        `[build:web] failed: ${err instanceof Error ? err.message : String(err)}\n`,
      );
      process.exit(1);
    },
  );
}
