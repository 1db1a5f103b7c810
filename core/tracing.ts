import {
  type Context,
  context,
  propagation,
  ROOT_CONTEXT,
  type Span,
  type SpanOptions,
  SpanStatusCode,
  trace,
} from "@opentelemetry/api";
import { AsyncLocalStorageContextManager } from "@opentelemetry/context-async-hooks";
import { W3CTraceContextPropagator } from "@opentelemetry/core";
import { OTLPTraceExporter } from "@opentelemetry/exporter-trace-otlp-http";
import {
  defaultResource,
  detectResources,
  envDetector,
  resourceFromAttributes,
} from "@opentelemetry/resources";
import {
  BatchSpanProcessor,
  ConsoleSpanExporter,
  SimpleSpanProcessor,
  type SpanExporter,
  type SpanProcessor,
  TracerProvider,
} from "@opentelemetry/sdk-trace";

// OpenTelemetry tracing, off unless the standard OTEL_* variables ask for it. One trace
// follows a job from the RPC that started it into the worker that runs it: the API keeps
// the W3C `traceparent` of its Initiate span in the BullMQ job's data, and the worker
// continues that trace (spans bundle > download per source, zip, upload).
//
// While tracing is off the @opentelemetry/api calls below are no-ops: no span is
// recorded and nothing is propagated.

export const TRACER_NAME = "download-jobs";

export interface TracingConfig {
  OTEL_TRACES_EXPORTER?: "otlp" | "console" | "none" | undefined;
  OTEL_EXPORTER_OTLP_ENDPOINT?: string | undefined;
  OTEL_EXPORTER_OTLP_TRACES_ENDPOINT?: string | undefined;
  OTEL_BSP_SCHEDULE_DELAY: number;
}

/** On when an OTLP endpoint or an exporter is named, unless OTEL_TRACES_EXPORTER=none. */
export function tracingEnabled(cfg: TracingConfig): boolean {
  if (cfg.OTEL_TRACES_EXPORTER === "none") return false;
  return (
    cfg.OTEL_TRACES_EXPORTER !== undefined ||
    cfg.OTEL_EXPORTER_OTLP_ENDPOINT !== undefined ||
    cfg.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT !== undefined
  );
}

export interface Tracing {
  readonly enabled: boolean;
  /** Exports what is still buffered and unregisters everything; safe to call twice. */
  shutdown(): Promise<void>;
}

export interface TracingOptions {
  /** `service.name` unless OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES set one. */
  serviceName: string;
  /** Tests: export to this (synchronously, span by span), whatever the configuration. */
  exporter?: SpanExporter;
}

/**
 * Registers the process-wide tracer provider, the AsyncLocalStorage context manager and
 * the W3C trace-context propagator. Entry points call it once, before anything traced.
 * The endpoint comes from the configuration; the OTLP exporter reads its other standard
 * variables itself (headers, timeout, compression, certificates). It sends OTLP/HTTP
 * with JSON bodies, which every OpenTelemetry Collector accepts on its port 4318.
 */
export function startTracing(cfg: TracingConfig, opts: TracingOptions): Tracing {
  if (opts.exporter === undefined && !tracingEnabled(cfg)) {
    return { enabled: false, shutdown: () => Promise.resolve() };
  }
  let processor: SpanProcessor;
  if (opts.exporter !== undefined) {
    processor = new SimpleSpanProcessor({ exporter: opts.exporter });
  } else if (cfg.OTEL_TRACES_EXPORTER === "console") {
    processor = new SimpleSpanProcessor({ exporter: new ConsoleSpanExporter() });
  } else {
    const url = tracesUrl(cfg);
    processor = new BatchSpanProcessor({
      exporter: new OTLPTraceExporter(url === undefined ? {} : { url }),
      scheduledDelayMillis: cfg.OTEL_BSP_SCHEDULE_DELAY,
    });
  }
  // Later resources win: our default name, then what the environment says.
  const resource = defaultResource()
    .merge(resourceFromAttributes({ "service.name": opts.serviceName }))
    .merge(detectResources({ detectors: [envDetector] }));
  const provider = new TracerProvider({ resource, spanProcessors: [processor] });
  const contextManager = new AsyncLocalStorageContextManager().enable();
  context.setGlobalContextManager(contextManager);
  propagation.setGlobalPropagator(new W3CTraceContextPropagator());
  trace.setGlobalTracerProvider(provider);
  let done: Promise<void> | undefined;
  return {
    enabled: true,
    shutdown() {
      done ??= provider
        .shutdown()
        .catch(() => undefined)
        .finally(() => {
          trace.disable();
          propagation.disable();
          context.disable();
        });
      return done;
    },
  };
}

/** Where spans go, as the OTLP specification derives it from the two endpoint variables. */
function tracesUrl(cfg: TracingConfig): string | undefined {
  if (cfg.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT !== undefined)
    return cfg.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT;
  if (cfg.OTEL_EXPORTER_OTLP_ENDPOINT === undefined) return undefined;
  return `${cfg.OTEL_EXPORTER_OTLP_ENDPOINT.replace(/\/+$/, "")}/v1/traces`;
}

/** The W3C traceparent of the active span, to hand to another process; undefined when off. */
export function currentTraceparent(): string | undefined {
  const carrier: Record<string, string> = {};
  propagation.inject(context.active(), carrier);
  return carrier.traceparent;
}

/** The context a `traceparent` (or incoming HTTP headers) names, to start child spans in. */
export function extractContext(carrier: Record<string, string | string[] | undefined>): Context {
  return propagation.extract(ROOT_CONTEXT, carrier);
}

/**
 * Runs `fn` inside a new active span (a child of `parent`, or of the active span) and
 * ends the span when `fn` settles, marking it as an error if `fn` throws.
 */
export async function inSpan<T>(
  name: string,
  options: SpanOptions & { parent?: Context },
  fn: (span: Span) => Promise<T>,
): Promise<T> {
  const { parent, ...spanOptions } = options;
  const tracer = trace.getTracer(TRACER_NAME);
  return tracer.startActiveSpan(name, spanOptions, parent ?? context.active(), async (span) => {
    try {
      return await fn(span);
    } catch (err) {
      markError(span, err);
      throw err;
    } finally {
      span.end();
    }
  });
}

/** A span that the caller ends itself (for work that spans callbacks rather than one call). */
export function startSpan(
  name: string,
  options: SpanOptions = {},
  parent: Context = context.active(),
): Span {
  return trace.getTracer(TRACER_NAME).startSpan(name, options, parent);
}

export function markError(span: Span, err: unknown): void {
  span.recordException(err instanceof Error ? err : new Error(String(err)));
  span.setStatus({
    code: SpanStatusCode.ERROR,
    message: err instanceof Error ? err.message : String(err),
  });
}
