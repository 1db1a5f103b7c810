import { randomBytes } from "node:crypto";
import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { createClient, type Interceptor } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { loadConfig } from "../core/config.js";
import { startTracing, type Tracing, tracingEnabled } from "../core/tracing.js";
import { DownloadService, JobState } from "../gen/downloads/v1/download_service_pb.js";
import { waitUntil } from "../local/ports.js";
import { type ApiStack, startApiStack, withTestToken } from "./helpers/api.js";
import { STARTUP_MS } from "./helpers/deadline.js";
import { type Services, startServices } from "./helpers/services.js";
import { spawnWorker, type WorkerProcess } from "./helpers/worker-process.js";

// One trace from the RPC into the worker, as a tracing backend would show it: the API
// runs in this process and the worker in another, both configured only through the
// standard OTEL_* variables and exporting OTLP/HTTP JSON to a small collector that this
// test runs. Spans are matched by their ids, exactly as the backend links them.

interface OtlpSpan {
  service: string;
  traceId: string;
  spanId: string;
  parentSpanId: string;
  name: string;
  attributes: Record<string, unknown>;
}

/** A minimal OTLP/HTTP JSON trace receiver: every span it was sent, flattened. */
async function startCollector(): Promise<{
  url: string;
  spans: OtlpSpan[];
  requests: () => number;
  server: Server;
}> {
  const spans: OtlpSpan[] = [];
  let requests = 0;
  const server = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on("data", (c: Buffer) => chunks.push(c));
    req.on("end", () => {
      requests += 1;
      if (
        req.method !== "POST" ||
        req.url !== "/v1/traces" ||
        !(req.headers["content-type"] ?? "").includes("json")
      ) {
        res.writeHead(404).end();
        return;
      }
      const body = JSON.parse(Buffer.concat(chunks).toString("utf8")) as {
        resourceSpans?: {
          resource?: { attributes?: { key: string; value: { stringValue?: string } }[] };
          scopeSpans?: { spans?: Record<string, unknown>[] }[];
        }[];
      };
      for (const rs of body.resourceSpans ?? []) {
        const service =
          rs.resource?.attributes?.find((a) => a.key === "service.name")?.value.stringValue ?? "";
        for (const ss of rs.scopeSpans ?? []) {
          for (const s of ss.spans ?? []) {
            const attributes: Record<string, unknown> = {};
            for (const a of (s.attributes as
              | { key: string; value: Record<string, unknown> }[]
              | undefined) ?? []) {
              attributes[a.key] = Object.values(a.value)[0];
            }
            spans.push({
              service,
              traceId: String(s.traceId),
              spanId: String(s.spanId),
              parentSpanId: String(s.parentSpanId ?? ""),
              name: String(s.name),
              attributes,
            });
          }
        }
      }
      res.writeHead(200, { "content-type": "application/json" }).end("{}");
    });
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as AddressInfo;
  return { url: `http://127.0.0.1:${port}`, spans, requests: () => requests, server };
}

let svc: Services;
let st: ApiStack;
let worker: WorkerProcess;
let tracing: Tracing;
let collector: Awaited<ReturnType<typeof startCollector>>;

beforeAll(async () => {
  collector = await startCollector();
  svc = await startServices();
  await svc.putSource(901, 3 * 1024 * 1024);
  await svc.putSource(902, 500_000);
  const otel = {
    OTEL_EXPORTER_OTLP_ENDPOINT: collector.url,
    // Export within a fifth of a second rather than the default five.
    OTEL_BSP_SCHEDULE_DELAY: "200",
  };
  // What server/main.ts does, from the same variables.
  tracing = startTracing(loadConfig({ ...svc.env, ...otel }), { serviceName: "download-jobs-api" });
  st = await startApiStack(otel, { services: svc, tracing: tracing.enabled });
  worker = spawnWorker({
    ...svc.env,
    ...otel,
    QUEUE_PREFIX: st.cfg.QUEUE_PREFIX,
    LOG_LEVEL: "info",
    LOG_FORMAT: "json",
    THROTTLE_BYTES_PER_SECOND: String(8 * 1024 * 1024),
  });
  await waitUntil("worker ready", async () => worker.output().includes("worker ready"), STARTUP_MS);
});

afterAll(async () => {
  await worker?.kill("SIGTERM");
  await st?.stop();
  await tracing?.shutdown();
  await svc?.stop();
  await new Promise((resolve) => collector?.server.close(resolve));
});

const hex = (bytes: number) => randomBytes(bytes).toString("hex");

function clientWith(headers: Record<string, string>) {
  const addHeaders: Interceptor = (next) => (req) => {
    for (const [k, v] of Object.entries(headers)) req.header.set(k, v);
    return next(req);
  };
  return createClient(
    DownloadService,
    createConnectTransport({
      baseUrl: st.server.url,
      httpVersion: "1.1",
      interceptors: [withTestToken, addHeaders],
    }),
  );
}

async function runToCompletion(
  client: ReturnType<typeof clientWith>,
  fileIds: number[],
): Promise<string> {
  const { job } = await client.initiate({ fileIds });
  const jobId = job?.jobId ?? "";
  const poller = clientWith({});
  await expect
    .poll(async () => (await poller.getStatus({ jobId })).job?.state, {
      interval: 100,
    })
    .toBe(JobState.COMPLETED);
  return jobId;
}

/** Waits until the worker's spans of `jobId` have all arrived, and returns its trace. */
async function traceOfJob(jobId: string): Promise<{ bundle: OtlpSpan; spans: OtlpSpan[] }> {
  let bundle: OtlpSpan | undefined;
  await expect
    .poll(
      () => {
        bundle = collector.spans.find(
          (s) => s.name === "bundle" && s.attributes["job.id"] === jobId,
        );
        const trace = collector.spans.filter((s) => s.traceId === bundle?.traceId);
        return (
          bundle !== undefined &&
          trace.some((s) => s.name === "upload") &&
          trace.some((s) => s.name.endsWith("/Initiate"))
        );
      },
      { interval: 100 },
    )
    .toBe(true);
  const b = bundle as OtlpSpan;
  return { bundle: b, spans: collector.spans.filter((s) => s.traceId === b.traceId) };
}

describe("tracing", () => {
  test("is off unless an OTLP endpoint or an exporter is configured", () => {
    expect(tracingEnabled(loadConfig({}))).toBe(false);
    expect(
      tracingEnabled(loadConfig({ OTEL_EXPORTER_OTLP_ENDPOINT: "http://collector:4318" })),
    ).toBe(true);
    expect(tracingEnabled(loadConfig({ OTEL_TRACES_EXPORTER: "console" }))).toBe(true);
    expect(
      tracingEnabled(
        loadConfig({
          OTEL_EXPORTER_OTLP_ENDPOINT: "http://collector:4318",
          OTEL_TRACES_EXPORTER: "none",
        }),
      ),
    ).toBe(false);
  });

  test("an incoming traceparent's trace continues through the RPC into the worker's bundle, download, zip and upload spans", async () => {
    const traceId = hex(16);
    const callerSpanId = hex(8);
    const jobId = await runToCompletion(
      clientWith({ traceparent: `00-${traceId}-${callerSpanId}-01` }),
      [901, 902],
    );

    const { bundle, spans } = await traceOfJob(jobId);
    expect(bundle.traceId).toBe(traceId);
    const initiate = spans.find((s) => s.name === "downloads.v1.DownloadService/Initiate");
    expect(initiate).toMatchObject({ service: "download-jobs-api", parentSpanId: callerSpanId });
    expect(initiate?.attributes["rpc.system"]).toBe("connect_rpc");
    // The worker (another process) continues from the Initiate span itself.
    expect(bundle.service).toBe("download-jobs-worker");
    expect(bundle.parentSpanId).toBe(initiate?.spanId);
    const children = spans.filter((s) => s.parentSpanId === bundle.spanId);
    const downloads = children.filter((s) => s.name === "download");
    expect(downloads.map((s) => Number(s.attributes["file.id"])).sort()).toEqual([901, 902]);
    expect(children.filter((s) => s.name === "zip")).toHaveLength(1);
    const upload = children.find((s) => s.name === "upload");
    expect(Number(upload?.attributes["zip.size_bytes"])).toBeGreaterThan(3_500_000);

    // The worker's log lines of this job carry the same trace id.
    const started = worker
      .output()
      .split("\n")
      .filter((l) => l.startsWith("{"))
      .map((l) => JSON.parse(l) as Record<string, unknown>)
      .find((l) => l.msg === "job started" && l.jobId === jobId);
    expect(started).toMatchObject({ traceId, owner: st.owner });
  });

  test("without a traceparent the RPC starts a new trace, and the worker joins it", async () => {
    const jobId = await runToCompletion(clientWith({}), [902]);
    const { bundle, spans } = await traceOfJob(jobId);
    const initiate = spans.find((s) => s.name === "downloads.v1.DownloadService/Initiate");
    expect(initiate?.parentSpanId ?? "").toBe("");
    expect(bundle.parentSpanId).toBe(initiate?.spanId);
    expect(
      spans
        .filter((s) => s.parentSpanId === bundle.spanId)
        .map((s) => s.name)
        .sort(),
    ).toEqual(["download", "upload", "zip"]);
  });
});
