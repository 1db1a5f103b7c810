import { isSpanContextValid, trace } from "@opentelemetry/api";
import { type Logger, pino } from "pino";
import { PinoPretty } from "pino-pretty";

export type { Logger };

export type LogFormat = "pretty" | "json";

export interface LoggerOptions {
  /** `json` (one object per line, for log shippers) or `pretty` (for people); see logFormatFor. */
  format?: LogFormat;
  /** Where JSON lines go instead of stdout (tests hold them back unless a test fails). */
  destination?: { write(line: string): void };
}

/**
 * LOG_FORMAT when set; otherwise pretty on a terminal outside production, JSON anywhere
 * else (containers, CI, files, `npm start`'s children, whose output it prefixes).
 */
export function logFormatFor(cfg: {
  LOG_FORMAT?: LogFormat | undefined;
  NODE_ENV?: string | undefined;
}): LogFormat {
  if (cfg.LOG_FORMAT !== undefined) return cfg.LOG_FORMAT;
  return process.stdout.isTTY === true && cfg.NODE_ENV !== "production" ? "pretty" : "json";
}

/**
 * The root logger; entry points make it, everything else gets a child (`{jobId,
 * attempt, owner}` in the worker, `{part}` in the API). Every line written inside a
 * traced operation carries its `traceId` and `spanId`, so logs and traces join up.
 */
export function createLogger(level: string, name: string, opts: LoggerOptions = {}): Logger {
  const options = {
    name,
    level,
    // Presigned URLs carry credentials in their query string: never log them.
    redact: {
      paths: ["*.download_url", "*.downloadUrl", "*.url", "authorization", "*.authorization"],
      censor: "[redacted]",
    },
    mixin: traceFields,
  };
  if (opts.format === "pretty") {
    // A synchronous stream in this thread rather than pino's worker-thread transport:
    // nothing is lost when the process exits right after a fatal line.
    return pino(
      options,
      PinoPretty({ sync: true, colorize: process.stdout.isTTY === true, ignore: "pid,hostname" }),
    );
  }
  return opts.destination !== undefined ? pino(options, opts.destination) : pino(options);
}

/** Without a tracer provider there is never an active span, and this costs one lookup. */
function traceFields(): Record<string, string> {
  const span = trace.getActiveSpan();
  if (span === undefined) return {};
  const ctx = span.spanContext();
  return isSpanContextValid(ctx) ? { traceId: ctx.traceId, spanId: ctx.spanId } : {};
}
