import { type Context, context, type Span, SpanKind } from "@opentelemetry/api";
import { markError, startSpan } from "../core/tracing.js";

// The trace spans of one bundle run, children of its `bundle` span: one `download` per
// source (from opening it to its last byte entering the ZIP), `zip` (from the first
// entry to the last) and `upload` (the multipart upload, from its start to the result
// object being complete). They overlap on purpose: the bytes stream through all three at
// once, and the trace shows which one the run waited for. With tracing off every span is
// a no-op.

export interface SpanEntry {
  fileId: number;
  sizeBytes: number;
}

export class BundleSpans {
  private readonly parent: Context = context.active();
  private readonly upload: Span;
  private zip: Span | undefined;
  private readonly downloads = new Map<number, Span>();
  private finished = false;

  constructor(private readonly entries: readonly SpanEntry[]) {
    this.upload = startSpan("upload", { kind: SpanKind.CLIENT }, this.parent);
  }

  fileStarted(index: number): void {
    this.zip ??= startSpan(
      "zip",
      { attributes: { "zip.entries": this.entries.length } },
      this.parent,
    );
    const entry = this.entries[index];
    const attributes =
      entry === undefined ? {} : { "file.id": entry.fileId, "file.size_bytes": entry.sizeBytes };
    this.downloads.set(
      index,
      startSpan("download", { kind: SpanKind.CLIENT, attributes }, this.parent),
    );
  }

  fileDone(index: number): void {
    this.downloads.get(index)?.end();
    this.downloads.delete(index);
    if (index === this.entries.length - 1) this.endZip();
  }

  /** The result object is complete. */
  done(sizeBytes: number): void {
    if (this.finished) return;
    this.finished = true;
    this.endZip();
    this.upload.setAttribute("zip.size_bytes", sizeBytes);
    this.upload.end();
  }

  /** The run stopped (failure or cancel): every open span ends, marked with the reason. */
  failed(err: unknown): void {
    if (this.finished) return;
    this.finished = true;
    for (const span of [
      ...this.downloads.values(),
      ...(this.zip !== undefined ? [this.zip] : []),
      this.upload,
    ]) {
      markError(span, err);
      span.end();
    }
    this.downloads.clear();
    this.zip = undefined;
  }

  private endZip(): void {
    this.zip?.end();
    this.zip = undefined;
  }
}
