import { execFile } from "node:child_process";
import { lstat, mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { promisify } from "node:util";
import { build } from "esbuild";
import { type Browser, chromium } from "playwright-core";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { buildPackages } from "../scripts/build-packages.js";
import { type ApiStack, startApiStack, TEST_TOKEN } from "./helpers/api.js";
import { spawnWorker, type WorkerProcess } from "./helpers/worker-process.js";
import { readZip } from "./helpers/zip.js";

// The client packages as another app gets them: built, packed with `npm pack`, installed
// from the tarballs into a throw-away project outside this repository, and used from
// there by a Node program (type-checked against the packages' declarations, run by
// Node's type stripping) and by a React page bundled with esbuild and opened in Chromium,
// both against the real API and a worker. The peer dependencies come from this
// repository's node_modules, packed the same way, so the install needs no network.

const ROOT = resolve(import.meta.dirname, "..");
const TSC = join(ROOT, "node_modules/.bin/tsc");
const run = promisify(execFile);

/** What the app installs next to our packages: their peers, and types to check with. */
const APP_DEPENDENCIES = [
  "@bufbuild/protobuf",
  "@connectrpc/connect",
  "@connectrpc/connect-node",
  "@connectrpc/connect-web",
  "react",
  "react-dom",
  "@types/node",
  "@types/react",
  "@types/react-dom",
];

const FILES: [number, number, string][] = [
  [801, 1_500_000, "first.bin"],
  [802, 700_000, "second.bin"],
];

let tmp: string;
let app: string;
let st: ApiStack;
let worker: WorkerProcess;
let browser: Browser | undefined;
const sources = new Map<string, Buffer>();
const packed = new Map<string, string[]>();

/** npm in the app, with nothing of the `npm test` that runs us (its npm_* settings). */
async function npm(args: string[], cwd: string): Promise<string> {
  const env = Object.fromEntries(
    Object.entries(process.env).filter(([k]) => !k.toLowerCase().startsWith("npm_")),
  );
  try {
    return (await run("npm", args, { cwd, env, maxBuffer: 64 * 1024 * 1024 })).stdout;
  } catch (err) {
    const e = err as { stdout?: string; stderr?: string };
    throw new Error(`npm ${args.join(" ")} failed:\n${e.stdout ?? ""}${e.stderr ?? ""}`);
  }
}

/** `names` and everything they depend on, as installed in this repository. */
async function withDependencies(names: string[]): Promise<string[]> {
  const seen = new Set<string>();
  const visit = async (name: string) => {
    if (seen.has(name)) return;
    seen.add(name);
    const pkg = JSON.parse(
      await readFile(join(ROOT, "node_modules", name, "package.json"), "utf8"),
    );
    for (const dep of Object.keys(pkg.dependencies ?? {})) await visit(dep);
  };
  for (const n of names) await visit(n);
  return [...seen];
}

const NODE_PROGRAM = `import { JobState, watchJob } from "@download-jobs/client";
import { createDownloadClient } from "@download-jobs/client/node";

const [baseUrl = "", token = "", ...ids] = process.argv.slice(2);
// gRPC over h2c: what only the package's Node entry can do.
const client = createDownloadClient({ baseUrl, token, protocol: "grpc" });
const { job } = await client.initiate({ fileIds: ids.map(Number) });
if (job === undefined) throw new Error("Initiate answered without a job");
const states: string[] = [JobState[job.state]];
let url = "";
for await (const j of watchJob(client, job.jobId, { afterVersion: job.version })) {
  states.push(JobState[j.state]);
  url = j.result?.downloadUrl ?? url;
}
console.log(JSON.stringify({ jobId: job.jobId, states, url }));
`;

const PAGE = `import { Code } from "@connectrpc/connect";
import { createDownloadClient, JobState } from "@download-jobs/client";
import { useDownloadJob, useJobs } from "@download-jobs/react";
import { useEffect, useMemo, useState } from "react";
import { createRoot } from "react-dom/client";

const params = new URLSearchParams(location.hash.slice(1));

function App() {
  const client = useMemo(
    () => createDownloadClient({ baseUrl: location.origin, token: params.get("token") ?? "" }),
    [],
  );
  const [jobId, setJobId] = useState<string>();
  useEffect(() => {
    const fileIds = (params.get("files") ?? "").split(",").map(Number);
    void client.initiate({ fileIds }).then((res) => setJobId(res.job?.jobId));
  }, [client]);
  const [completedId, setCompletedId] = useState("");
  const { job, state, error } = useDownloadJob(client, jobId, {
    onComplete: (j) => setCompletedId(j.jobId),
  });
  // The caller's completed jobs, listed again once this one has completed.
  const completed = useJobs(client, { states: [JobState.COMPLETED] });
  const { refresh } = completed;
  useEffect(() => {
    if (state === JobState.COMPLETED) void refresh();
  }, [state, refresh]);
  return (
    <main>
      <output id="state">{state === undefined ? "" : JobState[state]}</output>
      <output id="job">{jobId}</output>
      <ul id="completed">
        {completed.jobs.map((j) => (
          <li key={j.jobId}>{j.jobId}</li>
        ))}
      </ul>
      {job?.result !== undefined && (
        <a id="download" href={job.result.downloadUrl}>
          {job.result.fileName}
        </a>
      )}
      <p id="error">{error?.message}</p>
      <output id="on-complete">{completedId}</output>
      <Failing client={client} />
    </main>
  );
}

/** A job of a file that does not exist: it fails, and onError says so. */
function Failing({ client }: { client: ReturnType<typeof createDownloadClient> }) {
  const [jobId, setJobId] = useState<string>();
  const [failure, setFailure] = useState("");
  useEffect(() => {
    void client.initiate({ fileIds: [999_999] }).then((res) => setJobId(res.job?.jobId));
  }, [client]);
  useDownloadJob(client, jobId, {
    onError: (e, j) =>
      setFailure(Code[e.code] + (j?.state === JobState.FAILED ? ": job failed" : ": watch")),
  });
  return <output id="on-error">{failure}</output>;
}

const root = document.getElementById("root");
if (root === null) throw new Error("no #root");
createRoot(root).render(<App />);
`;

const TSCONFIG = {
  compilerOptions: {
    target: "ES2022",
    module: "NodeNext",
    moduleResolution: "NodeNext",
    lib: ["ES2023", "DOM"],
    types: ["node"],
    jsx: "react-jsx",
    strict: true,
    exactOptionalPropertyTypes: true,
    noUncheckedIndexedAccess: true,
    verbatimModuleSyntax: true,
    noEmit: true,
  },
  files: ["main.ts", "page.tsx"],
};

async function expectZipOfSources(url: string): Promise<void> {
  const res = await fetch(url);
  expect(res.status).toBe(200);
  const entries = await readZip(Buffer.from(await res.arrayBuffer()));
  expect([...entries.keys()].sort()).toEqual([...sources.keys()].sort());
  for (const [name, bytes] of sources) expect(entries.get(name)?.equals(bytes), name).toBe(true);
}

beforeAll(async () => {
  tmp = await mkdtemp(join(tmpdir(), "download-jobs-app-"));
  app = join(tmp, "app");
  const tarballs = join(tmp, "tarballs");
  await mkdir(app);
  await mkdir(tarballs);

  const ours = await buildPackages();
  const peers = (await withDependencies(APP_DEPENDENCIES)).map((n) =>
    join(ROOT, "node_modules", n),
  );
  const report = JSON.parse(
    await npm(["pack", "--json", "--pack-destination", tarballs, ...ours, ...peers], ROOT),
  ) as { name: string; filename: string; files: { path: string }[] }[];
  for (const r of report) packed.set(r.name, r.files.map((f) => f.path).sort());

  await writeFile(
    join(app, "package.json"),
    `${JSON.stringify({ name: "some-app", private: true, type: "module" }, null, 2)}\n`,
  );
  // Our own cache, offline: everything comes from the tarballs, nothing from a registry.
  await npm(
    [
      "install",
      "--offline",
      "--cache",
      join(tmp, "npm-cache"),
      "--no-audit",
      "--no-fund",
      ...report.map((r) => join(tarballs, r.filename)),
    ],
    app,
  );
  await writeFile(join(app, "main.ts"), NODE_PROGRAM);
  await writeFile(join(app, "page.tsx"), PAGE);
  await writeFile(join(app, "tsconfig.json"), JSON.stringify(TSCONFIG, null, 2));

  st = await startApiStack({ WEB_ROOT: join(app, "dist"), WATCH_HEARTBEAT_MS: "1000" });
  for (const [id, size, name] of FILES) sources.set(name, await st.svc.putSource(id, size, name));
  worker = spawnWorker({
    ...st.svc.env,
    QUEUE_PREFIX: st.cfg.QUEUE_PREFIX,
    THROTTLE_BYTES_PER_SECOND: String(2 * 1024 * 1024),
    PROGRESS_INTERVAL_MS: "100",
  });
});

afterAll(async () => {
  await browser?.close();
  await worker?.kill("SIGTERM");
  await st?.stop();
  if (tmp !== undefined) await rm(tmp, { recursive: true, force: true });
});

describe("the client packages installed in another project", () => {
  test("npm pack ships built JavaScript with declarations, and no TypeScript source", () => {
    const client = packed.get("@download-jobs/client") ?? [];
    const react = packed.get("@download-jobs/react") ?? [];
    for (const entry of [
      "clients/lib/index",
      "clients/lib/node",
      "gen/downloads/v1/download_service_pb",
    ]) {
      expect(client).toContain(`dist/${entry}.js`);
      expect(client).toContain(`dist/${entry}.d.ts`);
    }
    expect(react).toEqual([
      "dist/index.d.ts",
      "dist/index.js",
      "dist/use-download-job.d.ts",
      "dist/use-download-job.js",
      "dist/use-jobs.d.ts",
      "dist/use-jobs.js",
      "package.json",
    ]);
    expect([...client, ...react].filter((f) => f.endsWith(".ts") && !f.endsWith(".d.ts"))).toEqual(
      [],
    );
  });

  test("are copies in the project, not links into this repository", async () => {
    for (const name of ["@download-jobs/client", "@download-jobs/react"]) {
      const dir = join(app, "node_modules", name);
      expect((await lstat(dir)).isSymbolicLink(), name).toBe(false);
      expect(JSON.parse(await readFile(join(dir, "package.json"), "utf8")).version).toBe("0.1.0");
    }
  });

  test("a Node program and a React page type-check against the packages' declarations", async () => {
    const { stdout } = await run(TSC, ["-p", "tsconfig.json"], { cwd: app }).catch(
      (e: { stdout?: string }) => ({ stdout: e.stdout ?? "tsc failed" }),
    );
    expect(stdout).toBe("");
  });

  test("a Node program starts a job over gRPC and watches it to COMPLETED", async () => {
    const ids = FILES.map(([id]) => String(id));
    const { stdout } = await run(process.execPath, ["main.ts", st.server.url, TEST_TOKEN, ...ids], {
      cwd: app,
    });
    const out = JSON.parse(stdout.trim().split("\n").at(-1) ?? "{}") as {
      states: string[];
      url: string;
    };
    expect(out.states[0]).toBe("QUEUED");
    expect(out.states.at(-1)).toBe("COMPLETED");
    await expectZipOfSources(out.url);
  });

  test("a page bundled from the project follows a job with useDownloadJob to COMPLETED and lists it with useJobs in Chromium", async () => {
    const dist = join(app, "dist");
    await build({
      absWorkingDir: app,
      entryPoints: [join(app, "page.tsx")],
      outfile: join(dist, "assets", "page.js"),
      bundle: true,
      format: "esm",
      platform: "browser",
      jsx: "automatic",
      define: { "process.env.NODE_ENV": '"production"' },
      logLevel: "silent",
    });
    await writeFile(
      join(dist, "index.html"),
      '<!doctype html><html><head><meta charset="utf-8"><title>app</title>' +
        '<script type="module" src="/assets/page.js"></script></head>' +
        '<body><div id="root"></div></body></html>\n',
    );
    browser = await chromium.launch({
      executablePath: "/usr/bin/chromium",
      args: [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
      ],
      headless: true,
    });
    const page = await browser.newPage();
    const errors: string[] = [];
    page.on("pageerror", (e) => errors.push(e.message));
    const files = FILES.map(([id]) => id).join(",");
    await page.goto(`${st.server.url}/#token=${TEST_TOKEN}&files=${files}`);
    await expect
      .poll(async () => `${await page.textContent("#state")}${await page.textContent("#error")}`)
      .toBe("COMPLETED");
    // useJobs lists it among the caller's completed jobs.
    const jobId = (await page.textContent("#job")) ?? "";
    await expect
      .poll(async () => page.$$eval("#completed li", (li) => li.map((l) => l.textContent)))
      .toContain(jobId);
    // onComplete named the job once it completed; onError told of the job that failed.
    expect(await page.textContent("#on-complete")).toBe(jobId);
    await expect.poll(() => page.textContent("#on-error")).toBe("NotFound: job failed");
    expect(errors).toEqual([]);
    await expectZipOfSources((await page.getAttribute("#download", "href")) ?? "");
  });
});
