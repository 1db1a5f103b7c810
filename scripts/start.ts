import { createHash, randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import { mkdir, readFile, writeFile } from "node:fs/promises";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { type Config, ConfigError, loadConfig } from "../core/config.js";
import { logFormatFor } from "../core/logger.js";
import { Storage, storageOptionsFrom } from "../core/storage.js";
import { canConnect, waitUntil } from "../local/ports.js";
import { findPostgresBin, startPostgres } from "../local/postgres-server.js";
import { startRealisticS3 } from "../local/realistic-s3.js";
import { startRedis } from "../local/redis-server.js";
import { LOCAL_S3_CREDENTIALS, startS3 } from "../local/s3-server.js";
import { exampleFileSets, SAMPLE_FILES, seedSamples } from "../local/samples.js";
import { type ServiceProcess, startServiceProcess } from "../local/service-process.js";

// `npm start`: the whole service on one machine. Redis and S3 come from the environment
// when REDIS_URL / S3_ENDPOINT are set, otherwise they are started here (Redis as a child
// process with an append-only file, so a restart loses no job; s3rver in this process).
// Then the API and one worker run as child processes. Ctrl-C stops everything, in order.

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..");
// Makes progress visible on the 1–50 MB samples: the 50 MB one takes about 6 s.
const DEMO_THROTTLE_BYTES_PER_SECOND = 8 * 1024 * 1024;
// A second Ctrl-C this long after the first kills the children instead of waiting.
const SECOND_SIGNAL_FORCES_AFTER_MS = 1500;
const SAMPLE_FILE_RANGE = `${SAMPLE_FILES[0]?.fileId}–${SAMPLE_FILES.at(-1)?.fileId}`;

function say(line: string): void {
  process.stdout.write(`[start]  ${line}\n`);
}

function warn(line: string): void {
  process.stderr.write(`[start]  ${line}\n`);
}

function rejectOnAbort(signal: AbortSignal): Promise<never> {
  return new Promise((_, reject) => {
    if (signal.aborted) reject(signal.reason);
    signal.addEventListener("abort", () => reject(signal.reason), { once: true });
  });
}

function hostForUrl(host: string): string {
  // A wildcard bind is reached on loopback; IPv6 literals need brackets in a URL.
  if (host === "0.0.0.0") return "127.0.0.1";
  if (host === "::") return "[::1]";
  return host.includes(":") ? `[${host}]` : host;
}

/**
 * The token the API accepts when AUTH_TOKENS is unset: made afresh at every start and
 * only ever printed here; the API gets its SHA-256. Jobs belong to the owner "dev", so a
 * restart's new token still sees the jobs of the last run.
 */
function developmentToken(): { token: string; authTokens: string } {
  const token = `dj_dev_${randomBytes(24).toString("base64url")}`;
  return { token, authTokens: `dev:${createHash("sha256").update(token).digest("hex")}` };
}

/**
 * The how-many-th start on this data folder this is (0 the first time), counted in a
 * file beside the data: the examples then ask for files no recent start asked for.
 */
async function countStart(dataDir: string): Promise<number> {
  const file = resolve(dataDir, "start-count");
  const run = Number.parseInt(await readFile(file, "utf8").catch(() => "0"), 10) || 0;
  // The count only varies the examples: a folder it cannot be written to must not stop
  // the service (the examples then repeat, and the printed note explains the outcome).
  await mkdir(dataDir, { recursive: true })
    .then(() => writeFile(file, `${run + 1}\n`))
    .catch(() => undefined);
  return run;
}

const DEFAULT_URL = "http://127.0.0.1:8080";

function examples(
  base: string,
  token: string | undefined,
  authDisabled: boolean,
  run: number,
): string {
  const svc = `${base}/downloads.v1.DownloadService`;
  const shown = token ?? "<your token>";
  const bearer = `Bearer ${shown}`;
  const auth = authDisabled ? "" : ` -H 'Authorization: ${bearer}'`;
  const callOptions = authDisabled ? "" : `, { headers: { authorization: "${bearer}" } }`;
  const [forCurl = [], forTs = [], forCli = []] = exampleFileSets(run);
  const cliEnv = [
    ...(authDisabled ? [] : [`DOWNLOAD_JOBS_TOKEN=${shown}`]),
    ...(base === DEFAULT_URL ? [] : [`DOWNLOAD_JOBS_URL=${base}`]),
  ].join(" ");
  return `
Try it (sample file ids ${SAMPLE_FILE_RANGE}; each example asks for other files, so each starts a job):

  # 1. curl: start a job, then poll it with the jobId the first call returns
  curl -s -X POST ${svc}/Initiate${auth} -H 'Content-Type: application/json' -d '{"fileIds":${JSON.stringify(forCurl)}}'
  curl -s -X POST ${svc}/GetStatus${auth} -H 'Content-Type: application/json' -d '{"jobId":"<jobId>"}'

  # 2. buf curl: stream every change of that job until it ends
  npx buf curl --schema proto${auth} --data '{"jobId":"<jobId>"}' ${svc}/WatchJob

  # 3. the generated TypeScript client (save as watch.ts here, run: npx tsx watch.ts)
  import { createClient } from "@connectrpc/connect";
  import { createConnectTransport } from "@connectrpc/connect-node";
  import { DownloadService, JobState } from "./gen/downloads/v1/download_service_pb.js";

  const client = createClient(DownloadService, createConnectTransport({ baseUrl: "${base}", httpVersion: "1.1" }));
  const { job } = await client.initiate({ fileIds: [${forTs.join(", ")}] }${callOptions});
  for await (const msg of client.watchJob({ jobId: job?.jobId ?? "" }${callOptions})) {
    if (msg.event.case === "job") console.log(JobState[msg.event.value.state], msg.event.value.progress?.percent, msg.event.value.result?.downloadUrl ?? "");
  }

  # 4. the CLI: start a job and follow it with progress bars
  ${cliEnv === "" ? "" : `${cliEnv} `}npm run -s cli -- initiate ${forCli.join(" ")} --watch

  # 5. the page: ${base}/${authDisabled ? "" : " (paste the token into Access token)"}

Asking again for the same files returns the same job: its outcome is then INITIATE_OUTCOME_IN_FLIGHT
while it runs and INITIATE_OUTCOME_REUSED_RESULT once its ZIP is ready. The next start prints other files.

Ctrl-C stops everything.
`;
}

/**
 * npm scripts run on the Node that `npm ci` installs (the pinned `node` package); run
 * any other way, this script and the API and worker it starts would run on whatever
 * `node` the shell finds, which may be older than anything tested.
 */
function wrongRuntimeMessage(): string | undefined {
  const pkg = JSON.parse(readFileSync(resolve(ROOT, "package.json"), "utf8")) as {
    dependencies: Record<string, string>;
  };
  const pinned = pkg.dependencies.node ?? "";
  const major = (v: string) => Number(v.replace(/^v/, "").split(".")[0]);
  if (major(process.version) >= major(pinned)) return undefined;
  return `this is Node ${process.version}, and download-jobs runs on Node ${pinned}: start it with \`npm start\`, which runs the Node that \`npm ci\` installed`;
}

async function main(): Promise<number> {
  const wrongRuntime = wrongRuntimeMessage();
  if (wrongRuntime !== undefined) {
    warn(wrongRuntime);
    return 1;
  }
  // Forwarded to the children as is; every value in it is parsed by core/config.ts.
  const inherited: NodeJS.ProcessEnv = { ...process.env };
  let cfg: Config;
  try {
    cfg = loadConfig(inherited);
  } catch (err) {
    if (err instanceof ConfigError) {
      warn(err.message);
      return 2;
    }
    throw err;
  }

  const abort = new AbortController();
  const children: ServiceProcess[] = [];
  // Stopped in reverse order of start, after the children: S3, then Redis.
  const services: { name: string; stop: () => Promise<void> }[] = [];
  let stopping: Promise<number> | undefined;
  let firstSignalAt = 0;
  let finish: (code: number) => void = () => {};
  const done = new Promise<number>((r) => {
    finish = r;
  });

  const shutdown = (reason: string, code: number): Promise<number> => {
    stopping ??= (async () => {
      say(`stopping (${reason})`);
      abort.abort(new Error(reason));
      let exitCode = code;
      // The children get the server's own grace and a little more to close cleanly.
      const graceMs = cfg.SHUTDOWN_GRACE_MS + 2000;
      const results = await Promise.all(
        children.map(async (c) => ({ c, exit: await c.stop(graceMs) })),
      );
      for (const { c, exit } of results) {
        if (exit.forced) {
          warn(`${c.name} (pid ${c.pid}) did not stop within ${graceMs} ms: killed`);
          exitCode ||= 1;
        } else if (exit.code !== 0 && exit.signal !== "SIGTERM" && code === 0) {
          warn(`${c.name} (pid ${c.pid}) exited with ${exit.code ?? exit.signal} while stopping`);
          exitCode = 1;
        }
      }
      for (const s of services.reverse()) {
        await s.stop().catch((err: unknown) => {
          warn(`stopping ${s.name} failed: ${String(err)}`);
          exitCode ||= 1;
        });
      }
      say(exitCode === 0 ? "stopped" : `stopped (exit code ${exitCode})`);
      return exitCode;
    })();
    void stopping.then(finish);
    return stopping;
  };

  const onSignal = (signal: NodeJS.Signals) => {
    if (stopping === undefined) {
      firstSignalAt = Date.now();
      void shutdown(`received ${signal}`, 0);
      return;
    }
    // npm, tsx and the terminal may each deliver the same Ctrl-C: only a later one counts.
    if (Date.now() - firstSignalAt > SECOND_SIGNAL_FORCES_AFTER_MS) {
      warn(`received ${signal} again: killing the API and worker now`);
      for (const c of children) c.kill();
    }
  };
  process.on("SIGINT", onSignal);
  process.on("SIGTERM", onSignal);

  try {
    const childEnv: NodeJS.ProcessEnv = { ...inherited, PORT: String(cfg.PORT) };
    let token: string | undefined;
    if (cfg.AUTH_TOKENS === undefined && !cfg.AUTH_DISABLED) {
      const dev = developmentToken();
      token = dev.token;
      childEnv.AUTH_TOKENS = dev.authTokens;
      say(`auth   development token (owner "dev", new at every start): ${token}`);
      say(
        `       send it as  Authorization: Bearer <token>; set AUTH_TOKENS for your own (see docs/security.md)`,
      );
    }
    // The children write to a pipe, not to this terminal: decide the log format here.
    childEnv.LOG_FORMAT = logFormatFor(cfg);

    if (cfg.REDIS_URL === undefined && cfg.REDIS_CLUSTER_NODES === undefined) {
      const dir = resolve(cfg.DATA_DIR, "redis");
      const redis = await startRedis({
        dir,
        appendonly: true,
        install: true,
        detached: true,
        log: say,
      });
      services.push({ name: "redis-server", stop: () => redis.stop() });
      childEnv.REDIS_URL = redis.url;
      say(`Redis  ${redis.url}  (redis-server pid ${redis.pid}, append-only data in ${dir})`);
    } else {
      say(
        cfg.REDIS_URL !== undefined
          ? "Redis  from REDIS_URL"
          : "Redis  Cluster from REDIS_CLUSTER_NODES",
      );
    }
    abort.signal.throwIfAborted();

    let seedEndpoint: string | undefined;
    if (cfg.S3_ENDPOINT === undefined) {
      const dir = resolve(cfg.DATA_DIR, "s3");
      const s3 = await startS3({ dir, buckets: [cfg.SOURCE_BUCKET, cfg.RESULT_BUCKET] });
      services.push({ name: "S3 server", stop: () => s3.stop() });
      childEnv.S3_ENDPOINT = s3.endpoint;
      childEnv.S3_ACCESS_KEY_ID = LOCAL_S3_CREDENTIALS.accessKeyId;
      childEnv.S3_SECRET_ACCESS_KEY = LOCAL_S3_CREDENTIALS.secretAccessKey;
      say(
        `S3     ${s3.endpoint}  (embedded s3rver, data in ${dir}, access key ${LOCAL_S3_CREDENTIALS.accessKeyId})`,
      );
      if (cfg.S3_PROFILE !== undefined && cfg.S3_PROFILE !== "loopback") {
        // The service reaches S3 through the realistic-S3 fixture; download URLs still
        // point at the embedded server, which the browser reaches without the faults.
        const fixture = await startRealisticS3(s3.endpoint, cfg.S3_PROFILE);
        services.push({ name: "S3 profile fixture", stop: () => fixture.close() });
        childEnv.S3_ENDPOINT = fixture.endpoint;
        childEnv.S3_PUBLIC_ENDPOINT ??= s3.endpoint;
        // Seeding goes straight to the server: its faults are for the service.
        seedEndpoint = s3.endpoint;
        say(`S3     profile ${cfg.S3_PROFILE}: the service reaches S3 at ${fixture.endpoint}`);
      }
      if ((inherited.THROTTLE_BYTES_PER_SECOND ?? "") === "") {
        childEnv.THROTTLE_BYTES_PER_SECOND = String(DEMO_THROTTLE_BYTES_PER_SECOND);
        say(
          `demo throttle THROTTLE_BYTES_PER_SECOND=${DEMO_THROTTLE_BYTES_PER_SECOND} so progress is visible (set it to change, 0 = off)`,
        );
      }
    } else {
      say(`S3     ${cfg.S3_ENDPOINT}  (from S3_ENDPOINT)`);
    }
    abort.signal.throwIfAborted();

    // History: Debian's PostgreSQL when it is installed (the same server production runs,
    // reachable by psql and Grafana), else off with how to turn it on. It never stops the
    // service from starting: jobs run without it.
    if (cfg.HISTORY_DATABASE_URL !== undefined) {
      say("history from HISTORY_DATABASE_URL");
    } else if (findPostgresBin() === undefined) {
      say(
        "history off: install Debian's postgresql (apt-get install -y postgresql) or set HISTORY_DATABASE_URL to keep job history (docs/operations.md)",
      );
    } else {
      const dir = resolve(cfg.DATA_DIR, "postgres");
      try {
        const db = await startPostgres({ dir, fast: false, detached: true });
        services.push({ name: "PostgreSQL", stop: () => db.stop() });
        childEnv.HISTORY_DATABASE_URL = db.url;
        say(`history ${db.url}  (PostgreSQL pid ${db.pid}, data in ${dir})`);
      } catch (err) {
        warn(`history off: PostgreSQL did not start: ${(err as Error).message.split("\n")[0]}`);
      }
    }
    abort.signal.throwIfAborted();

    // Parse again: the children will see exactly this, so it must be valid here too.
    const resolved = loadConfig(childEnv);
    const storage = new Storage(
      storageOptionsFrom(
        seedEndpoint !== undefined ? { ...resolved, S3_ENDPOINT: seedEndpoint } : resolved,
      ),
    );
    try {
      await storage.ensureBuckets();
      if (resolved.SEED_SAMPLES) {
        const seeded = await seedSamples(storage, { signal: abort.signal, log: say });
        say(
          `samples file ids ${SAMPLE_FILE_RANGE} in bucket ${resolved.SOURCE_BUCKET}: ` +
            `${seeded.uploaded.length} uploaded, ${seeded.skipped.length} already there`,
        );
      }
    } finally {
      storage.destroy();
    }
    abort.signal.throwIfAborted();

    const base = `http://${hostForUrl(resolved.HOST)}:${resolved.PORT}`;
    const probeHost = hostForUrl(resolved.HOST).replace(/^\[|\]$/g, "");
    // Readiness is "the port accepts connections": someone else's server there would pass.
    if (await canConnect(resolved.PORT, probeHost)) {
      throw new Error(`${base} is already in use: stop what listens there, or choose another PORT`);
    }

    for (const [name, entry] of [
      ["api", "server/main.ts"],
      ["worker", "worker/main.ts"],
    ] as const) {
      const child = startServiceProcess({
        name,
        entry,
        cwd: ROOT,
        env: childEnv,
        detached: true,
        onLine: (line, stream) => {
          const out = stream === "stdout" ? process.stdout : process.stderr;
          out.write(`[${name}]${" ".repeat(7 - name.length)}${line}\n`);
        },
      });
      children.push(child);
      say(`${name} pid ${child.pid} (${entry})`);
      void child.exited.then((exit) => {
        if (stopping !== undefined) return;
        warn(
          `${name} exited unexpectedly (${exit.signal ?? `code ${exit.code}`}): stopping everything`,
        );
        void shutdown(`${name} exited`, 1);
      });
    }

    await Promise.race([
      waitUntil(`the API on ${base}`, () => canConnect(resolved.PORT, probeHost), 60_000),
      rejectOnAbort(abort.signal),
    ]);
    say(
      `download-jobs is ready at ${base}  (Connect and gRPC-Web over HTTP/1.1, gRPC and Connect over h2c)`,
    );
    const run = await countStart(resolved.DATA_DIR);
    process.stdout.write(examples(base, token, resolved.AUTH_DISABLED, run));
  } catch (err) {
    if (stopping === undefined) {
      warn(`start failed: ${err instanceof Error ? err.message : String(err)}`);
      void shutdown("start failed", 1);
    }
  }
  // Runs until a signal or a dying child starts the shutdown.
  return done;
}

process.exitCode = await main();
// s3rver and stray sockets may keep the loop alive; everything we own is stopped.
process.exit();
