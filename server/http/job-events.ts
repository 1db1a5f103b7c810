import { once } from "node:events";
import type { IncomingHttpHeaders, IncomingMessage, ServerResponse } from "node:http";
import type { Http2ServerRequest, Http2ServerResponse } from "node:http2";
import type { DescMessage, MessageShape } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { codeToHttpStatus, errorToJsonBytes } from "@connectrpc/connect/protocol-connect";
import type { Logger } from "pino";
import type { JobStore } from "../../core/job-store.js";
import { isTerminal, parseJobId } from "../../core/jobs.js";
import { DownloadService } from "../../gen/downloads/v1/download_service_pb.js";
import { bearerToken, type Owner } from "../auth.js";
import type { RpcCall, RpcRow, StreamRow } from "../rpc/download-rpcs.js";
import { rpcFailure } from "../rpc/errors.js";
import type { Reply } from "../rpc/presenter.js";
import type { WatchTokens } from "../rpc/watch-token.js";
import { STREAM_HEADERS } from "../wire/stream-headers.js";

// A job's WatchJob events as server-sent events (text/event-stream), for EventSource
// and `curl -N`: GET /v1/jobs/<job id>/events. Each job event is the WatchJob message
// in its JSON form, with `id:` its version, so a reconnecting EventSource resumes after
// the last one it got (Last-Event-ID); heartbeats are comments, except a queued job's,
// which carry its fresh queue estimate as `event: estimate` (the same WatchJob message,
// its heartbeat case; no `id:`, the job's version did not change); the stream ends right
// after the terminal job with `event: end`, and a reconnect after the end gets 204 (an
// EventSource stops there). The events come from the WatchJob row of the RPC table, so
// they are the ones WatchJob sends.
//
// Who may watch: the owner (Authorization: Bearer, as for the RPCs), or anyone holding a
// scoped watch token for this job (CreateWatchToken; `access_token` in the query, since
// EventSource cannot set headers, or as the bearer). Any origin may read the stream: the
// credential is a token the page holds, never a cookie.

type NodeRequest = IncomingMessage | Http2ServerRequest;
type NodeResponse = ServerResponse | Http2ServerResponse;

const PATH = /^\/v1\/jobs\/([^/]+)\/events$/;

/** How long an EventSource waits before reconnecting after a cut. */
const RETRY_MS = 2_000;

/** Every answer of the endpoint may be read by a page of any origin (see above). */
const CORS: Readonly<Record<string, string>> = {
  "access-control-allow-origin": "*",
  "access-control-expose-headers": "content-type",
};

export interface JobEventsOptions {
  rows: readonly RpcRow[];
  store: JobStore;
  tokens: WatchTokens;
  authenticate(headers: IncomingHttpHeaders): Owner;
  log: Logger;
}

function out(res: NodeResponse): ServerResponse {
  return res as ServerResponse;
}

/** Returns true when the request was for a job's events (answered here). */
export type JobEvents = (req: NodeRequest, res: NodeResponse) => boolean;

export function createJobEvents(opts: JobEventsOptions): JobEvents {
  const row = opts.rows.find((r) => r.method === DownloadService.method.watchJob) as
    | StreamRow
    | undefined;
  if (row === undefined) throw new Error("the RPC table has no WatchJob row");
  return (req, res) => {
    const url = req.url ?? "";
    const q = url.indexOf("?");
    const match = PATH.exec(q === -1 ? url : url.slice(0, q));
    if (match === null) return false;
    if (req.method === "OPTIONS") {
      // A fetch-based client sending Authorization or Last-Event-ID asks first.
      out(res).writeHead(204, {
        ...CORS,
        "access-control-allow-methods": "GET",
        "access-control-allow-headers": "authorization, last-event-id, cache-control",
        "access-control-max-age": "600",
      });
      out(res).end();
      return true;
    }
    if (req.method !== "GET") {
      fail(res, new ConnectError("job events are read with GET", Code.Unimplemented), 405);
      return true;
    }
    const params = new URLSearchParams(q === -1 ? "" : url.slice(q + 1));
    void serve(req, res, match[1] ?? "", params, row, opts);
    return true;
  };
}

/** An error before the stream began: its HTTP status and the Connect JSON error body. */
function fail(res: NodeResponse, err: ConnectError, status = codeToHttpStatus(err.code)): void {
  if (res.headersSent || res.writableEnded || res.destroyed) return;
  const body = errorToJsonBytes(err, {});
  out(res).writeHead(status, {
    ...CORS,
    "content-type": "application/json",
    "content-length": String(body.byteLength),
    "cache-control": "no-store",
  });
  out(res).end(body);
}

/** The owner the request acts for: a scoped token for this job, or the owner's bearer token. */
async function ownerFor(
  req: NodeRequest,
  jobId: string,
  params: URLSearchParams,
  opts: JobEventsOptions,
): Promise<Owner> {
  const header = req.headers.authorization;
  const presented = params.get("access_token") ?? undefined;
  const bearer = bearerToken(Array.isArray(header) ? header[0] : header);
  // A scoped token has the job id before its first dot; an owner's token is opaque.
  const scoped = presented ?? (bearer?.startsWith(`${jobId}.`) === true ? bearer : undefined);
  if (scoped === undefined) return opts.authenticate(req.headers);
  const grant = opts.tokens.inspect(scoped, jobId);
  const rec = await opts.store.get(jobId);
  opts.tokens.verify(grant, rec.owner);
  return rec.owner;
}

/** Last-Event-ID (or ?after_version= for curl): the version the caller has. */
function afterVersionOf(req: NodeRequest, params: URLSearchParams): number {
  const raw = req.headers["last-event-id"] ?? params.get("after_version") ?? "";
  const text = Array.isArray(raw) ? (raw[0] ?? "") : raw;
  if (text === "") return 0;
  if (!/^\d{1,10}$/.test(text) || Number(text) > 2147483647)
    throw new ConnectError(
      `Last-Event-ID must be a job version (a whole number), got "${text.slice(0, 40)}"`,
      Code.InvalidArgument,
    );
  return Number(text);
}

class SseCall implements RpcCall {
  readonly get = true;
  constructor(
    readonly owner: Owner,
    private readonly req: NodeRequest,
    readonly signal: AbortSignal,
  ) {}
  header(name: string): string | null {
    const v = this.req.headers[name];
    return v === undefined ? null : Array.isArray(v) ? v.join(", ") : v;
  }
}

async function serve(
  req: NodeRequest,
  res: NodeResponse,
  rawJobId: string,
  params: URLSearchParams,
  row: StreamRow,
  opts: JobEventsOptions,
): Promise<void> {
  const abort = new AbortController();
  const onClose = () => abort.abort(new Error("events over"));
  res.once("close", onClose);
  let iterator: AsyncIterator<Reply<DescMessage>> | undefined;
  try {
    let jobId: string;
    try {
      jobId = parseJobId(decodeURIComponent(rawJobId));
    } catch {
      throw new ConnectError(`"${rawJobId.slice(0, 64)}" is not a job id`, Code.InvalidArgument);
    }
    const owner = await ownerFor(req, jobId, params, opts);
    const afterVersion = afterVersionOf(req, params);
    if (afterVersion > 0) {
      // A reconnect after the end: 204 tells an EventSource to stop reconnecting.
      const rec = await opts.store.get(jobId);
      if (isTerminal(rec.state) && rec.version <= afterVersion) {
        out(res).writeHead(204, { ...CORS, ...STREAM_HEADERS });
        out(res).end();
        return;
      }
    }
    const call = new SseCall(owner, req, abort.signal);
    iterator = row
      .run(call, { jobId, afterVersion } as unknown as MessageShape<DescMessage>)
      [Symbol.asyncIterator]();
    // The first event (snapshot or heartbeat) comes at once; an unknown or foreign job
    // fails here, before any header, with its own HTTP status.
    let next = await iterator.next();
    out(res).writeHead(200, {
      ...CORS,
      ...STREAM_HEADERS,
      "content-type": "text/event-stream; charset=utf-8",
    });
    if (!write(res, `retry: ${RETRY_MS}\n\n`)) await drained(res, abort.signal);
    while (next.done !== true && !abort.signal.aborted) {
      const reply = next.value;
      const msg = reply.message() as MessageShape<typeof DownloadService.method.watchJob.output>;
      let text: string;
      if (msg.event.case === "job") {
        const data = Buffer.from(reply.bytes(false)).toString("utf8");
        text = `id: ${msg.event.value.version}\ndata: ${data}\n\n`;
        if (reply.last) text += "event: end\ndata: {}\n\n";
      } else if (msg.event.value?.estimate !== undefined) {
        const data = Buffer.from(reply.bytes(false)).toString("utf8");
        text = `event: estimate\ndata: ${data}\n\n`;
      } else {
        text = `: heartbeat version=${msg.event.value?.version ?? 0}\n\n`;
      }
      if (!write(res, text)) await drained(res, abort.signal);
      if (reply.last) break;
      next = await iterator.next();
    }
    out(res).end();
  } catch (err) {
    if (abort.signal.aborted) return;
    const error = rpcFailure(err, opts.log, "GET /v1/jobs/{job}/events", true);
    if (!res.headersSent) fail(res, error);
    // A stream that already began just ends: the EventSource reconnects with
    // Last-Event-ID (the server restarting, Redis failing over).
    else out(res).end();
  } finally {
    res.off("close", onClose);
    abort.abort(new Error("events over"));
    await iterator?.return?.();
  }
}

function write(res: NodeResponse, text: string): boolean {
  if (res.writableEnded || res.destroyed) return true;
  return out(res).write(text);
}

function drained(res: NodeResponse, signal: AbortSignal): Promise<unknown> {
  return once(res, "drain", { signal }).catch(() => undefined);
}
