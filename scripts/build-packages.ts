import { execFile } from "node:child_process";
import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";

// `npm run build:packages`: the installable packages in packages/ (npm workspaces), built
// from the sources where the app itself uses them, so nothing is copied by hand:
//   @download-jobs/client  clients/lib + gen/downloads (JavaScript and .d.ts, by tsc)
//   @download-jobs/react   clients/react (useDownloadJob, useJobs), importing the client as a package
// TypeScript 7 is the native compiler with no JS API: its CLI does the work.

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const TSC = join(ROOT, "node_modules/.bin/tsc");
const run = promisify(execFile);

/**
 * What the hook's relative imports become in the React package: the same modules, as
 * the client package exports them. A relative import not listed here fails the build.
 */
const CLIENT_MODULES = [
  "../lib/client.js",
  "../lib/jobs.js",
  "../lib/watch.js",
  "../../gen/downloads/v1/download_service_pb.js",
];

/** The React package's modules (clients/react/<name>.ts), all exported by its index. */
const REACT_HOOKS = ["use-download-job", "use-jobs"];

async function tsc(project: string, outDir?: string): Promise<void> {
  const args = ["-p", project, ...(outDir !== undefined ? ["--outDir", outDir] : [])];
  await run(TSC, args, { cwd: ROOT }).catch((err: { stdout?: string; stderr?: string }) => {
    throw new Error(`tsc -p ${project} failed:\n${err.stdout ?? ""}${err.stderr ?? ""}`);
  });
}

function importsOfClient(code: string, file: string): string {
  const out = code.replace(/(from\s+|import\s*\(\s*)"(\.{1,2}\/[^"]+)"/g, (_all, head, spec) => {
    if (!CLIENT_MODULES.includes(spec)) {
      throw new Error(`${file}: import "${spec}" is neither in this package nor in the client`);
    }
    return `${head}"@download-jobs/client"`;
  });
  if (/["']\.{1,2}\//.test(out)) throw new Error(`${file}: a relative import is left`);
  return out;
}

export async function buildPackages(): Promise<string[]> {
  const client = join(ROOT, "packages/client");
  await rm(join(client, "dist"), { recursive: true, force: true });
  await tsc("packages/client/tsconfig.json");

  const react = join(ROOT, "packages/react");
  const reactDist = join(react, "dist");
  await rm(reactDist, { recursive: true, force: true });
  // tsc emits the hook with everything it imports; only the hook's own files are kept.
  const scratch = await mkdtemp(join(tmpdir(), "download-jobs-react-"));
  try {
    await tsc("packages/react/tsconfig.json", scratch);
    await mkdir(reactDist, { recursive: true });
    for (const hook of REACT_HOOKS) {
      for (const ext of [".js", ".d.ts"]) {
        const from = join(scratch, `clients/react/${hook}${ext}`);
        const code = await readFile(from, "utf8");
        await writeFile(join(reactDist, `${hook}${ext}`), importsOfClient(code, from));
      }
    }
    const index = REACT_HOOKS.map((hook) => `export * from "./${hook}.js";\n`).join("");
    await writeFile(join(reactDist, "index.js"), index);
    await writeFile(join(reactDist, "index.d.ts"), index);
  } finally {
    await rm(scratch, { recursive: true, force: true });
  }

  const clientVersion = JSON.parse(await readFile(join(client, "package.json"), "utf8")).version;
  const reactPeer = JSON.parse(await readFile(join(react, "package.json"), "utf8"))
    .peerDependencies["@download-jobs/client"];
  if (reactPeer !== clientVersion) {
    throw new Error(
      `packages/react wants @download-jobs/client ${reactPeer}, packages/client is ${clientVersion}`,
    );
  }
  return [client, react];
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  for (const dir of await buildPackages()) console.log(`built ${dir}`);
}
