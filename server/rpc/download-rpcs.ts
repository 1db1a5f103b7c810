import {
  create,
  type DescMessage,
  type DescMethodServerStreaming,
  type DescMethodUnary,
  type MessageShape,
} from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { HistoryOffError, type HistoryReader } from "../../core/history-reader.js";
import type { JobService } from "../../core/job-service.js";
import { parseJobId } from "../../core/jobs.js";
import {
  CreateWatchTokenResponseSchema,
  DownloadService,
  GetJobStatisticsResponseSchema,
  GetStatusResponseSchema,
  ListJobHistoryResponseSchema,
} from "../../gen/downloads/v1/download_service_pb.js";
import type { Owner } from "../auth.js";
import type { WatchHub } from "../watch-hub.js";
import type { PlainFields } from "../wire/request-reader.js";
import {
  jobListQuery,
  listQuery,
  listResponse,
  statisticsRange,
  statisticsResponse,
} from "./history-presenter.js";
import { waitForChange, waitPlan } from "./long-poll.js";
import { type Answer, etagMatches, type JobPresenter, Reply } from "./presenter.js";
import { WatchTokens } from "./watch-token.js";

// Every RPC of DownloadService, once: what it reads from the request, which domain call
// it makes for which owner, and the answer the job presenter makes of the result. Both
// ways in serve this table: connect-node through connect/connect-routes.ts, the lean
// transport through lean/lean-transport.ts. An RPC added here is served by both.

/** What an RPC knows of its call, whichever way it came in. */
export interface RpcCall {
  /** Who the call acts for (auth.ts); jobs of other owners do not exist for it. */
  owner: Owner;
  /** A request header, repeated values joined by ", " (as Headers.get). */
  header(name: string): string | null;
  /** Aborted when the caller goes away, the deadline passes or the server stops. */
  signal: AbortSignal;
  /** A Connect GET: the answer may be reused briefly. */
  get: boolean;
  /** When the caller's deadline (connect-timeout-ms, grpc-timeout) passes, ms since the epoch. */
  deadline?: number | undefined;
  /** The transport answers Answer.notModified with 304 and no body (the lean transport's GET). */
  notModifiedOk?: boolean;
}

/** The body of an answer that is never sent: a 304 has none. */
const NO_BODY = new Reply(GetStatusResponseSchema, () => {
  throw new Error("a 304 Not Modified answer has no body");
});

interface RowBase {
  /** The usual request's JSON fields, read with JSON.parse (wire/request-reader.ts). */
  plain: PlainFields;
}

export interface UnaryRow extends RowBase {
  method: DescMethodUnary;
  run(call: RpcCall, req: MessageShape<DescMessage>): Promise<Answer<DescMessage>>;
}

export interface StreamRow extends RowBase {
  method: DescMethodServerStreaming;
  run(call: RpcCall, req: MessageShape<DescMessage>): AsyncIterable<Reply<DescMessage>>;
  /**
   * The same stream pushed: each answer handed to `send` as it comes, which returns a
   * promise when it cannot take the next one yet. Optional; a transport that uses it
   * spares a promise hop per message (WatchJob's fan-out). Resolves when the stream is over.
   */
  push?(
    call: RpcCall,
    req: MessageShape<DescMessage>,
    send: (reply: Reply<DescMessage>) => undefined | Promise<unknown>,
  ): Promise<void>;
}

export type RpcRow = UnaryRow | StreamRow;

function unary<I extends DescMessage, O extends DescMessage>(
  method: DescMethodUnary<I, O>,
  plain: PlainFields,
  run: (call: RpcCall, req: MessageShape<I>) => Promise<Answer<O>>,
): UnaryRow {
  return { method, plain, run } as unknown as UnaryRow;
}

function stream<I extends DescMessage, O extends DescMessage>(
  method: DescMethodServerStreaming<I, O>,
  plain: PlainFields,
  run: (call: RpcCall, req: MessageShape<I>) => AsyncIterable<Reply<O>>,
  push?: (
    call: RpcCall,
    req: MessageShape<I>,
    send: (reply: Reply<O>) => undefined | Promise<unknown>,
  ) => Promise<void>,
): StreamRow {
  return { method, plain, run, push } as unknown as StreamRow;
}

export interface RpcDeps {
  jobs: JobService;
  hub: WatchHub;
  presenter: JobPresenter;
  /** The job history in PostgreSQL; undefined when HISTORY_DATABASE_URL is unset. */
  history?: HistoryReader | undefined;
  /** The longest GetStatus wait (long-poll); longer ones are clamped. Default 25 s. */
  statusMaxWaitMs?: number;
  /** Signs scoped watch tokens (CreateWatchToken); off without WATCH_TOKEN_SECRET. */
  watchTokens?: WatchTokens;
}

/** Where a job's server-sent events are served (http/job-events.ts). */
export function eventsPath(jobId: string): string {
  return `/v1/jobs/${encodeURIComponent(jobId)}/events`;
}

export function downloadRpcs({
  jobs,
  hub,
  presenter,
  history,
  statusMaxWaitMs = 25_000,
  watchTokens = new WatchTokens(undefined),
}: RpcDeps): readonly RpcRow[] {
  const m = DownloadService.method;
  const historyOn = () => {
    if (history === undefined) throw new HistoryOffError();
    return history;
  };
  return [
    unary(
      m.initiate,
      { fileIds: "int32[]", requestId: "string", callbackUrl: "string", priority: "int32" },
      async (call, req) => {
        const { job, outcome } = await jobs.initiate(call.owner, {
          fileIds: req.fileIds,
          requestId: req.requestId,
          idempotencyKey: call.header("idempotency-key"),
          callbackUrl: req.callbackUrl,
          labels: req.labels,
          priority: req.priority,
        });
        return { reply: await presenter.initiated(job, outcome) };
      },
    ),
    unary(m.getStatus, { jobId: "string", afterVersion: "int32" }, async (call, req) => {
      // A wait that would outlast the caller's own deadline ends a little before it, so
      // the caller gets the job rather than DEADLINE_EXCEEDED.
      const budget =
        call.deadline === undefined
          ? statusMaxWaitMs
          : Math.min(statusMaxWaitMs, Math.max(0, waitBefore(call.deadline)));
      const wait = waitPlan(req.wait, budget, statusMaxWaitMs);
      const ifNoneMatch = call.get ? call.header("if-none-match") : null;
      if (ifNoneMatch !== null && call.notModifiedOk === true && wait.ms === 0) {
        // A conditional poll is most often of an unchanged job: the head alone (one
        // HMGET) names the answer, and a match is 304 without reading the record.
        const head = await jobs.head(call.owner, req.jobId);
        const etag = await presenter.headEtag(head);
        if (etag !== undefined && etagMatches(ifNoneMatch, etag))
          return {
            reply: NO_BODY,
            header: { "cache-control": presenter.cacheControl(head), etag },
            notModified: true,
          };
      }
      let rec = await jobs.get(call.owner, req.jobId);
      rec = await waitForChange(hub, rec, req.afterVersion, wait.ms, call.signal, call.owner);
      const now = Date.now();
      const reply = await presenter.status(rec, wait, now);
      if (!call.get) return { reply };
      // A GET answer may be cached; its ETag lets the next poll get 304 Not Modified.
      const etag = presenter.etag(rec, now);
      return {
        reply,
        header: { "cache-control": presenter.cacheControl(rec), etag },
        notModified: etagMatches(ifNoneMatch, etag),
      };
    }),
    stream(
      m.watchJob,
      { jobId: "string", afterVersion: "int32" },
      (call, req) =>
        mapEach(
          hub.watch(parseJobId(req.jobId), req.afterVersion, call.signal, call.owner),
          (ev) =>
            ev.job !== undefined ? presenter.watch(ev.job) : presenter.heartbeat(ev.heartbeat),
        ),
      (call, req, send) =>
        hub.follow(parseJobId(req.jobId), req.afterVersion, call.signal, call.owner, (ev) => {
          if (ev.job !== undefined) return presenter.watch(ev.job).then(send);
          const beat = presenter.heartbeat(ev.heartbeat);
          return beat instanceof Promise ? beat.then(send) : send(beat);
        }),
    ),
    unary(m.cancel, { jobId: "string" }, async (call, req) => ({
      reply: await presenter.cancelled(await jobs.cancel(call.owner, req.jobId)),
    })),
    unary(m.listJobHistory, { pageSize: "int32", pageToken: "string" }, async (call, req) => {
      const page = await historyOn().list(call.owner, listQuery(req));
      return { reply: new Reply(ListJobHistoryResponseSchema, () => listResponse(page)) };
    }),
    unary(m.listJobs, { pageSize: "int32", pageToken: "string" }, async (call, req) => {
      const page = await jobs.list(call.owner, jobListQuery(req));
      return { reply: await presenter.listed(page) };
    }),
    unary(m.deleteJob, { jobId: "string" }, async (call, req) => {
      await jobs.delete(call.owner, req.jobId);
      return { reply: presenter.deleted() };
    }),
    unary(m.retryJob, { jobId: "string", requestId: "string" }, async (call, req) => {
      const { job, replayed } = await jobs.retry(call.owner, req.jobId, {
        requestId: req.requestId,
        idempotencyKey: call.header("idempotency-key"),
      });
      return { reply: await presenter.retried(job, replayed) };
    }),
    unary(m.getJobStatistics, {}, async (call, req) => {
      const { interval, from, to } = statisticsRange(req);
      const buckets = await historyOn().statistics(call.owner, interval, from, to);
      return {
        reply: new Reply(GetJobStatisticsResponseSchema, () => statisticsResponse(buckets)),
      };
    }),
    unary(m.createWatchToken, { jobId: "string" }, async (call, req) => {
      // Only the owner of an existing job gets a token for it.
      const rec = await jobs.get(call.owner, req.jobId);
      const { token, expiresAt } = watchTokens.create(rec.id, rec.owner, req.ttl);
      return {
        reply: new Reply(CreateWatchTokenResponseSchema, () =>
          create(CreateWatchTokenResponseSchema, {
            token,
            expireTime: timestampFromMs(expiresAt),
            eventsPath: `${eventsPath(rec.id)}?access_token=${encodeURIComponent(token)}`,
          }),
        ),
      };
    }),
  ];
}

/** How long a long-poll may wait to still answer before `deadline`. */
function waitBefore(deadline: number): number {
  const left = deadline - Date.now();
  return left - Math.min(1000, left / 5);
}

const DONE: IteratorReturnResult<undefined> = { done: true, value: undefined };

/**
 * `source` with each item mapped, as one small object: an async generator here would
 * keep a suspended frame per idle stream, and tens of thousands of streams stay open.
 */
class MapEach<T, U> implements AsyncIterableIterator<U> {
  private readonly it: AsyncIterator<T>;

  constructor(
    source: AsyncIterable<T>,
    private readonly fn: (item: T) => U | Promise<U>,
  ) {
    this.it = source[Symbol.asyncIterator]();
  }

  [Symbol.asyncIterator](): this {
    return this;
  }

  async next(): Promise<IteratorResult<U, undefined>> {
    const r = await this.it.next();
    return r.done === true ? DONE : { done: false, value: await this.fn(r.value) };
  }

  async return(): Promise<IteratorResult<U, undefined>> {
    await this.it.return?.();
    return DONE;
  }
}

function mapEach<T, U>(
  source: AsyncIterable<T>,
  fn: (item: T) => U | Promise<U>,
): AsyncIterable<U> {
  return new MapEach(source, fn);
}
