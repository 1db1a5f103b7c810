import { existsSync, readdirSync, readFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { cors } from "@connectrpc/connect";
import { describe, expect, test } from "vitest";
import { parse } from "yaml";
import { loadConfig } from "../core/config.js";
import { DownloadService } from "../gen/downloads/v1/download_service_pb.js";
import { Health } from "../gen/grpc/health/v1/health_pb.js";
import { compiledArgsFor, nodeArgsFor } from "../local/service-process.js";

// No Docker engine and no Envoy binary run where we test, so the deploy files are
// checked as data: each setting the README promises is read back from the file that
// must carry it. CI also runs `docker-compose config -q` on the compose file, and
// test/health.test.ts runs the probe commands these files configure against a real
// API and worker.

const ROOT = resolve(import.meta.dirname, "..");
const read = (path: string) => readFileSync(resolve(ROOT, path), "utf8");

// Loosely typed views of the parsed files: the tests check the shape they rely on.
type Obj = Record<string, unknown>;
const obj = (v: unknown): Obj => (typeof v === "object" && v !== null ? (v as Obj) : {});
const arr = (v: unknown): unknown[] => (Array.isArray(v) ? v : []);
const str = (v: unknown): string =>
  typeof v === "string" ? v : typeof v === "number" ? String(v) : "";

const compose = obj(parse(read("docker-compose.yml"), { merge: true }));
const services = obj(compose.services);
const service = (name: string) => obj(services[name]);
const envOf = (name: string) => obj(service(name).environment);
const envoy = obj(parse(read("envoy/envoy.yaml")));
const dockerfile = read("Dockerfile");
const pkg = JSON.parse(read("package.json")) as {
  dependencies: Record<string, string>;
  devDependencies: Record<string, string>;
};
const defaults = loadConfig({});

/** Envoy durations ("300s", "0.5s") in milliseconds. */
function ms(duration: unknown): number {
  const m = /^(\d+(?:\.\d+)?)s$/.exec(str(duration));
  if (m === null) throw new Error(`not an Envoy duration: ${String(duration)}`);
  return Number(m[1]) * 1000;
}

/** `${VAR:-default}` resolved to its default, as compose does with VAR unset. */
function withDefaults(value: string): string {
  return value.replace(/\$\{[A-Z0-9_]+:-([^}]*)\}/g, "$1");
}

describe("Dockerfile", () => {
  const froms = [...dockerfile.matchAll(/^FROM\s+(\S+)(?:\s+AS\s+(\S+))?/gim)].map((m) => ({
    image: m[1] ?? "",
    alias: m[2],
  }));
  const finalStage = dockerfile.slice(dockerfile.lastIndexOf("\nFROM "));

  test("is multi-stage on a pinned Node 24 slim base, the Node the package pins", () => {
    expect(froms.length).toBeGreaterThanOrEqual(2);
    const base = /^ARG NODE_IMAGE=(\S+)$/m.exec(dockerfile)?.[1] ?? "";
    expect(base).toMatch(/^node:24\.\d+\.\d+-bookworm-slim$/);
    expect(base).toBe(`node:${pkg.dependencies.node}-bookworm-slim`);
    // Every stage starts from that base (or an earlier stage): nothing unpinned.
    const aliases = new Set(froms.map((f) => f.alias));
    for (const f of froms)
      expect(f.image === "${NODE_IMAGE}" || aliases.has(f.image), f.image).toBe(true);
    expect(dockerfile).not.toMatch(/:latest\b/);
  });

  test("installs production dependencies only with npm ci, without the npm copy of Node", () => {
    expect(dockerfile).toMatch(/npm ci --omit=dev/);
    expect(dockerfile).not.toMatch(/npm install\b/);
    expect(dockerfile).toMatch(/rm -rf node_modules\/node\b/);
    expect(finalStage).toMatch(/COPY --from=deps \/app\/node_modules/);
    expect(dockerfile).toMatch(/npm run build:web --if-present/);
    // The image runs the code `npm run build` compiles (test/compiled.test.ts runs it).
    expect(dockerfile).toMatch(/&& npm run build$/m);
    expect(finalStage).toMatch(/^COPY --from=build \/app\/dist \.\/dist$/m);
    expect(dockerfile).toContain(
      `#   API (default):  ${["node", ...compiledArgsFor("server/main.ts")].join(" ")}`,
    );
  });

  test("every package the API and worker import at run time survives --omit=dev", () => {
    const imported = new Set<string>();
    for (const dir of ["core", "server", "worker", "gen"]) {
      for (const file of readdirSync(resolve(ROOT, dir), { recursive: true, encoding: "utf8" })) {
        if (!file.endsWith(".ts")) continue;
        const src = readFileSync(join(ROOT, dir, file), "utf8");
        // `import type` is erased; everything else is loaded at run time.
        for (const m of src.matchAll(
          /^\s*(?:import|export)\s+(?!type\s)[^;]*?from\s+"([^".][^"]*)"/gm,
        )) {
          const spec = m[1] ?? "";
          if (spec.startsWith("node:")) continue;
          imported.add(
            spec.startsWith("@")
              ? spec.split("/").slice(0, 2).join("/")
              : (spec.split("/")[0] ?? spec),
          );
        }
        for (const m of src.matchAll(/import\("([^".][^"]*)"\)/g)) {
          const spec = m[1] ?? "";
          if (!spec.startsWith("node:"))
            imported.add(
              spec.startsWith("@")
                ? spec.split("/").slice(0, 2).join("/")
                : (spec.split("/")[0] ?? spec),
            );
        }
      }
    }
    expect(imported.size).toBeGreaterThan(5);
    expect([...imported].filter((p) => !(p in pkg.dependencies)).sort()).toEqual([]);
    // The CLI (bin/download-jobs.js) runs TypeScript through tsx: a production dependency.
    expect(pkg.dependencies.tsx).toBeDefined();
  });

  test("runs as a non-root user, the API by default, with a HEALTHCHECK that needs no curl", () => {
    const user = /^USER\s+(\S+)/m.exec(finalStage)?.[1];
    expect(user).toBeDefined();
    expect(["root", "0"]).not.toContain(user);
    expect(finalStage).toContain(
      `CMD ${JSON.stringify(["node", ...compiledArgsFor("server/main.ts")]).replaceAll(",", ", ")}`,
    );
    const healthcheck = /^HEALTHCHECK .*\\\n\s+CMD (\[.*\])$/m.exec(finalStage)?.[1] ?? "[]";
    const [cmd, flag, script] = JSON.parse(healthcheck) as string[];
    expect([cmd, flag]).toEqual(["node", "-e"]);
    expect(script).toMatch(/fetch\(.*\/healthz/);
  });

  test(".dockerignore keeps local state and installed modules out of the build context", () => {
    const ignored = read(".dockerignore")
      .split("\n")
      .map((l) => l.trim());
    for (const entry of ["node_modules", ".git", ".data", "clients/web/dist"])
      expect(ignored).toContain(entry);
  });
});

describe("docker-compose.yml", () => {
  const names = Object.keys(services);

  test("pins every image to an explicit tag, never latest", () => {
    expect(names.length).toBeGreaterThanOrEqual(7);
    for (const name of names) {
      const image = str(service(name).image);
      expect(image, name).toMatch(/^[a-z0-9./_-]+:[A-Za-z0-9._-]+$/);
      expect(image, name).not.toMatch(/:latest$/);
    }
    expect(service("minio").image).toMatch(/^minio\/minio:RELEASE\./);
    expect(service("minio-setup").image).toMatch(/^minio\/mc:RELEASE\./);
    expect(service("envoy").image).toMatch(/^envoyproxy\/envoy:v1\.3\d\.\d+$/);
  });

  test("runs Redis append-only with noeviction on a volume", () => {
    const command = arr(service("redis").command).map(str).join(" ");
    expect(command).toMatch(/--appendonly yes/);
    expect(command).toMatch(/--maxmemory-policy noeviction/);
    expect(arr(service("redis").volumes).map(str)).toContain("redis-data:/data");
  });

  test("gives every long-running service a health check, and starts each after what it needs", () => {
    // The collector's image holds its binary and nothing else (no shell, no wget), so
    // Docker cannot probe it; nothing waits on it (spans it misses are dropped).
    for (const name of names.filter((n) => n !== "minio-setup" && n !== "otel-collector")) {
      expect(arr(obj(service(name).healthcheck).test).length, name).toBeGreaterThan(1);
    }
    for (const name of names)
      expect(Object.keys(obj(service(name).depends_on)), name).not.toContain("otel-collector");
    expect(service("minio-setup").restart).toBe("no");
    expect(obj(service("minio-setup").depends_on)).toEqual({
      minio: { condition: "service_healthy" },
    });
    for (const name of ["api", "worker"]) {
      expect(service(name).depends_on, name).toEqual({
        redis: { condition: "service_healthy" },
        minio: { condition: "service_healthy" },
        "minio-setup": { condition: "service_completed_successfully" },
      });
    }
    expect(obj(obj(service("envoy").depends_on).api).condition).toBe("service_healthy");
  });

  test("wires the API and workers to the redis and minio services, downloads signed for the edge", () => {
    for (const name of ["api", "worker"]) {
      const env = envOf(name);
      expect(new URL(str(env.REDIS_URL)).hostname, name).toBe("redis");
      expect(new URL(str(env.S3_ENDPOINT)).hostname, name).toBe("minio");
      expect(names).toContain("redis");
      expect(names).toContain("minio");
      // Presigned URLs must name the host the browser reaches: the published edge.
      const publicUrl = new URL(withDefaults(str(env.S3_PUBLIC_ENDPOINT)));
      const edge = str(arr(service("envoy").ports)[0]);
      expect(publicUrl.port, name).toBe(withDefaults(edge).split(":")[0]);
      expect(env.HOST, name).toBe("0.0.0.0");
      // Every value the app reads must be one core/config.ts accepts.
      const resolved = Object.fromEntries(
        Object.entries(env).map(([k, v]) => [
          k,
          withDefaults(str(v)).replace(/\$\{[^}]*\}/g, "x".repeat(16)),
        ]),
      );
      expect(() => loadConfig({ ...resolved, AUTH_TOKENS: undefined }), name).not.toThrow();
    }
    // The buckets the setup job creates are the ones the app uses.
    const setup = arr(service("minio-setup").command).map(str).join("\n");
    for (const bucket of [envOf("api").SOURCE_BUCKET, envOf("api").RESULT_BUCKET])
      expect(setup).toContain(`local/${str(bucket)}`);
  });

  test("has no default for any secret: compose refuses to start until each is set", () => {
    for (const name of names) {
      for (const [key, value] of Object.entries(envOf(name))) {
        if (!/PASSWORD|SECRET|TOKEN|ACCESS_KEY/.test(key)) continue;
        expect(str(value), `${name}.${key}`).toMatch(/^\$\{[A-Z0-9_]+:\?[^}]+\}$/);
      }
    }
  });

  test("runs two API replicas and scalable workers, none of them published", () => {
    expect(obj(service("api").deploy).replicas).toBe(2);
    expect(withDefaults(str(obj(service("worker").deploy).replicas))).toMatch(/^\d+$/);
    for (const name of ["api", "worker"]) expect(service(name).ports, name).toBeUndefined();
  });

  test("publishes Envoy as the only port of the default stack; observability only on loopback", () => {
    const published = names.filter((n) => service(n).ports !== undefined);
    const defaultStack = published.filter((n) => service(n).profiles === undefined);
    expect(defaultStack).toEqual(["envoy"]);
    for (const n of published.filter((n) => service(n).profiles !== undefined)) {
      for (const p of arr(service(n).ports)) expect(str(p), n).toMatch(/^127\.0\.0\.1:/);
    }
    const listener = obj(obj(arr(obj(envoy.static_resources).listeners)[0]).address);
    const envoyPort = String(obj(listener.socket_address).port_value);
    expect(
      str(arr(service("envoy").ports)[0])
        .split(":")
        .at(-1),
    ).toBe(envoyPort);
    expect(arr(service("envoy").volumes).map(str)).toContain(
      "./envoy/envoy.yaml:/etc/envoy/envoy.yaml:ro",
    );
  });

  test("starts the worker with the Node flags every other launcher uses", () => {
    // One list (local/service-process.ts); the deploy files spell it out, for the code
    // the image compiles (npm run build), and `npm run worker` for the sources.
    const worker = ["node", ...compiledArgsFor("worker/main.ts")];
    expect(arr(service("worker").command).map(str)).toEqual(worker);
    expect(dockerfile).toContain(`#   worker:         ${worker.join(" ")}`);
    expect(read("docs/deployment.md")).toContain(`download-jobs:0.1.0 ${worker.join(" ")}`);
    expect((pkg as unknown as { scripts: Record<string, string> }).scripts.worker).toBe(
      ["node", ...nodeArgsFor("worker/main.ts")].join(" "),
    );
  });

  test("probes the API and worker on the ports they serve /healthz on", () => {
    const probe = (name: string) =>
      arr(obj(service(name).healthcheck).test)
        .map(str)
        .join(" ");
    expect(probe("api")).toContain(`http://127.0.0.1:${str(envOf("api").PORT)}/healthz`);
    expect(probe("worker")).toContain(
      `http://127.0.0.1:${str(envOf("worker").WORKER_HEALTH_PORT)}/healthz`,
    );
    expect(Number(envOf("worker").WORKER_HEALTH_PORT)).toBeGreaterThan(0);
  });

  test("observability: Prometheus scrapes every API and worker replica, Grafana is provisioned", () => {
    const observability = ["prometheus", "alertmanager", "grafana", "otel-collector"];
    for (const name of observability) expect(service(name).profiles).toEqual(["observability"]);
    for (const name of observability) {
      for (const v of arr(service(name).volumes)
        .map(str)
        .filter((v) => v.startsWith("./"))) {
        expect(existsSync(resolve(ROOT, v.split(":")[0] ?? "")), v).toBe(true);
      }
    }
    const prom = obj(parse(read("deploy/prometheus/prometheus.yml")));
    const jobs = new Map(arr(prom.scrape_configs).map((j) => [str(obj(j).job_name), obj(j)]));
    const target = (job: string) => obj(arr(jobs.get(job)?.dns_sd_configs)[0]);
    expect(target("api")).toMatchObject({ names: ["api"], port: Number(envOf("api").PORT) });
    expect(target("worker")).toMatchObject({
      names: ["worker"],
      port: Number(envOf("worker").WORKER_HEALTH_PORT),
    });
    for (const job of ["api", "worker"]) expect(jobs.get(job)?.metrics_path).toBe("/metrics");
    // The rules are mounted next to the configuration that names them (relative path),
    // and alerts go to the Alertmanager service on the port it listens on.
    for (const file of arr(prom.rule_files).map(str))
      expect(arr(service("prometheus").volumes).map(str)).toContain(
        `./deploy/prometheus/${file}:/etc/prometheus/${file}:ro`,
      );
    expect(arr(prom.rule_files)).toEqual(["alerts.yml"]);
    const am = obj(arr(obj(prom.alerting).alertmanagers)[0]);
    expect(obj(arr(am.static_configs)[0]).targets).toEqual(["alertmanager:9093"]);
    expect(str(arr(service("alertmanager").ports)[0])).toMatch(/:9093$/);
    // Traces: the collector takes OTLP/HTTP on the port the app's endpoint names.
    const otel = obj(parse(read("deploy/otel-collector/config.yaml")));
    const traces = obj(obj(obj(otel.service).pipelines).traces);
    for (const r of arr(traces.receivers)) expect(Object.keys(obj(otel.receivers))).toContain(r);
    for (const e of arr(traces.exporters)) expect(Object.keys(obj(otel.exporters))).toContain(e);
    for (const p of arr(traces.processors)) expect(Object.keys(obj(otel.processors))).toContain(p);
    const http = obj(obj(obj(obj(otel.receivers).otlp).protocols).http);
    expect(str(http.endpoint)).toBe("0.0.0.0:4318");
    expect(arr(service("otel-collector").expose).map(str)).toContain("4318");

    const providers = obj(parse(read("deploy/grafana/provisioning/dashboards/download-jobs.yml")));
    const dashboardsPath = str(obj(obj(arr(providers.providers)[0]).options).path);
    expect(arr(service("grafana").volumes).map(str)).toContain(
      `./deploy/grafana/dashboards:${dashboardsPath}:ro`,
    );
  });

  test("the Grafana dashboard charts queue depth, jobs, failures, streams and RPC latency", () => {
    const dashboard = JSON.parse(read("deploy/grafana/dashboards/download-jobs.json")) as {
      panels: { title: string; targets: { expr: string }[] }[];
    };
    const titles = dashboard.panels.map((p) => p.title.toLowerCase());
    for (const want of [
      "queue depth",
      "job rate",
      "job duration",
      "failures by code",
      "active watchjob streams",
      "rpc latency",
    ]) {
      expect(
        titles.some((t) => t.includes(want)),
        want,
      ).toBe(true);
    }
    const exprs = dashboard.panels.flatMap((p) => p.targets.map((t) => t.expr)).join("\n");
    // Every API replica reports the same queue counts: summing them would multiply the depth.
    expect(exprs).toMatch(/max by \(state\) \(queue_jobs\)/);
    for (const metric of [
      "rpc_requests_total",
      "rpc_duration_seconds_bucket",
      "watch_streams_open",
      "queue_jobs",
      "job_duration_seconds",
      "job_bytes_total",
      "job_failures_total",
      "cancel_latency_seconds_bucket",
      "job_retries_total",
    ]) {
      expect(exprs, metric).toContain(metric);
    }
  });

  test("is validated by CI with docker-compose config", () => {
    const ci = read(".ci/run");
    expect(ci).toMatch(/packages\+=\(docker-compose\)/);
    expect(ci).toMatch(
      /docker-compose -f docker-compose\.yml (--profile observability )?config -q/,
    );
  });
});

describe("envoy/envoy.yaml", () => {
  const listener = obj(arr(obj(envoy.static_resources).listeners)[0]);
  const hcm = obj(obj(arr(obj(arr(listener.filter_chains)[0]).filters)[0]).typed_config);
  const vhost = obj(arr(obj(hcm.route_config).virtual_hosts)[0]);
  const routes = arr(vhost.routes).map(obj);
  const clusters = new Map(
    arr(obj(envoy.static_resources).clusters).map((c) => [str(obj(c).name), obj(c)]),
  );

  /** The first route whose prefix matches `path`, as Envoy picks it. */
  const routeFor = (path: string) =>
    obj(routes.find((r) => path.startsWith(str(obj(r.match).prefix)))?.route);

  test("accepts HTTP/1.1 and HTTP/2 on one listener", () => {
    expect(str(hcm["@type"])).toMatch(/HttpConnectionManager$/);
    expect(hcm.codec_type).toBe("AUTO");
  });

  test("lets every stream outlive the default route timeout: timeout 0s on each streaming RPC", () => {
    const streaming = [DownloadService, Health].flatMap((s) =>
      s.methods.filter((m) => m.methodKind !== "unary").map((m) => `/${s.typeName}/${m.name}`),
    );
    expect(streaming).toContain("/downloads.v1.DownloadService/WatchJob");
    for (const path of streaming) expect(routeFor(path).timeout, path).toBe("0s");
    expect(routeFor("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo").timeout).toBe(
      "0s",
    );
    // Unary calls keep a bound, well under the proxies' minute.
    for (const m of DownloadService.methods.filter((m) => m.methodKind === "unary")) {
      const t = ms(routeFor(`/${DownloadService.typeName}/${m.name}`).timeout);
      expect(t, m.name).toBeGreaterThan(0);
      expect(t, m.name).toBeLessThanOrEqual(60_000);
    }
  });

  test("keeps an idle watch open: stream_idle_timeout well above the heartbeat interval", () => {
    const idle = ms(hcm.stream_idle_timeout);
    expect(idle).toBeGreaterThan(2 * defaults.WATCH_HEARTBEAT_MS);
    expect(idle).toBeGreaterThan(2 * Number(envOf("api").WATCH_HEARTBEAT_MS));
  });

  test("answers CORS with the Connect and gRPC-Web headers, in exactly one place", () => {
    const filters = arr(hcm.http_filters).map((f) => str(obj(f).name));
    expect(filters).toEqual([
      "envoy.filters.http.cors",
      "envoy.filters.http.grpc_web",
      "envoy.filters.http.router",
    ]);
    const policy = obj(obj(vhost.typed_per_filter_config)["envoy.filters.http.cors"]);
    const list = (v: unknown) =>
      str(v)
        .split(",")
        .map((h) => h.trim().toLowerCase());
    const allow = list(policy.allow_headers);
    for (const h of [...cors.allowedHeaders, "authorization"])
      expect(allow, h).toContain(h.toLowerCase());
    for (const h of cors.exposedHeaders)
      expect(list(policy.expose_headers), h).toContain(h.toLowerCase());
    for (const m of cors.allowedMethods)
      expect(list(policy.allow_methods), m).toContain(m.toLowerCase());
    expect(read("envoy/envoy.yaml").match(/CorsPolicy/g)).toHaveLength(1);
    // The API itself sends no CORS headers, except on a job's server-sent events, which
    // any origin may read with a scoped watch token (no cookies): a policy of its own.
    const files = readdirSync(resolve(ROOT, "server"), { recursive: true, withFileTypes: true });
    for (const f of files.filter((e) => e.isFile())) {
      const path = resolve(f.parentPath, f.name);
      if (path.endsWith("/server/http/job-events.ts")) continue;
      expect(readFileSync(path, "utf8"), path).not.toMatch(/access-control-allow/i);
    }
  });

  test("speaks h2c to every API replica, health-checked on /healthz", () => {
    const api = clusters.get("api") ?? {};
    expect(api.type).toBe("STRICT_DNS");
    const address = obj(
      obj(
        obj(obj(arr(obj(arr(obj(api.load_assignment).endpoints)[0]).lb_endpoints)[0]).endpoint)
          .address,
      ).socket_address,
    );
    expect(address.address).toBe("api");
    expect(Object.keys(services)).toContain("api");
    expect(String(address.port_value)).toBe(str(envOf("api").PORT));
    const options = obj(
      obj(api.typed_extension_protocol_options)[
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
      ],
    );
    expect(obj(options.explicit_http_config).http2_protocol_options).toBeDefined();
    const check = obj(arr(api.health_checks)[0]);
    expect(obj(check.http_health_check).path).toBe("/healthz");
    expect(ms(check.interval)).toBeGreaterThan(0);
    // Presigned downloads reach MinIO through the edge: the route matches the bucket.
    expect(routeFor(`/${str(envOf("api").RESULT_BUCKET)}/bundles/x.zip`).cluster).toBe("minio");
  });

  test("keeps /metrics and the queue dashboard off the public edge", () => {
    for (const path of ["/metrics", "/admin/queues"]) {
      const r = routes.find((x) => path.startsWith(str(obj(x.match).prefix)));
      expect(obj(r?.direct_response).status, path).toBe(404);
    }
    expect(routeFor("/downloads.v1.DownloadService/GetStatus").cluster).toBe("api");
  });

  test("logs every request to stdout as JSON, without query strings", () => {
    const log = obj(arr(hcm.access_log)[0]);
    expect(log.name).toBe("envoy.access_loggers.stdout");
    const format = obj(obj(obj(log.typed_config).log_format).json_format);
    expect(Object.keys(format)).toEqual(
      expect.arrayContaining(["method", "path", "status", "duration_ms", "upstream"]),
    );
    const all = Object.values(format).map(str).join(" ");
    expect(all).not.toMatch(/%REQ\(:PATH\)%|%REQ_WITHOUT_QUERY|X-ENVOY-ORIGINAL-PATH/i);
    // %PATH(X:Y)%: X defaults to WQ (with the query), Y to ORIG_OR_PATH. ORIG reads only
    // x-envoy-original-path, set by a route rewrite (none here) or by the client itself:
    // every line would log "-" or what a client chose. Only the request's own :path will do.
    const paths = [...all.matchAll(/%PATH(?:\(([^)]*)\))?(?::\d+)?%/g)].map((m) => m[1] ?? "");
    expect(paths).toEqual(["NQ:PATH"]);
    expect(str(format.path)).toBe("%PATH(NQ:PATH)%");
  });

  test("uses no deprecated cluster field and health-checks over HTTP/2, out of step with the API's HTTP/1.1 idle close", () => {
    for (const [name, c] of clusters)
      expect(Object.keys(c), name).not.toContain("dns_refresh_rate");
    const check = obj(arr(clusters.get("api")?.health_checks)[0]);
    // The API closes an idle HTTP/1.1 connection after 5 s: an HTTP/1.1 check every 5 s
    // can meet that close. Over HTTP/2 the session idles out only after a minute.
    const http2 = obj(check.http_health_check).codec_client_type === "HTTP2";
    if (!http2) expect(ms(check.interval) % 5000).not.toBe(0);
    else expect(ms(check.interval)).toBeLessThan(defaults.HTTP2_IDLE_TIMEOUT_MS);
  });

  test("has an overload manager with a heap limit and a global downstream connection limit", () => {
    const om = obj(envoy.overload_manager);
    const monitors = new Map(
      arr(om.resource_monitors).map((m) => [str(obj(m).name), obj(obj(m).typed_config)]),
    );
    const connections = monitors.get("envoy.resource_monitors.global_downstream_max_connections");
    expect(Number(connections?.max_active_downstream_connections)).toBeGreaterThan(0);
    expect(
      Number(monitors.get("envoy.resource_monitors.fixed_heap")?.max_heap_size_bytes),
    ).toBeGreaterThan(0);
    const actions = arr(om.actions).map((a) => str(obj(a).name));
    expect(actions).toContain("envoy.overload_actions.stop_accepting_requests");
    // Every trigger names a configured monitor (Envoy refuses the file otherwise).
    for (const a of arr(om.actions))
      for (const t of arr(obj(a).triggers)) expect(monitors.has(str(obj(t).name))).toBe(true);
  });
});
