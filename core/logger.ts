import { pino, type Logger } from "pino";

export type { Logger };

/** The root logger; entry points make it, everything else gets a child. */
export function createLogger(level: string, name: string): Logger {
  return pino({
    name,
    level,
    // Presigned URLs carry credentials in their query string: never log them.
    redact: { paths: ["*.download_url", "*.downloadUrl", "*.url", "authorization", "*.authorization"], censor: "[redacted]" },
  });
}
