import { createHash } from "node:crypto";
import {
  create,
  type DescMessage,
  type MessageShape,
  toBinary,
  toJsonString,
} from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import type { AdmissionOutcome } from "../../core/admission.js";
import type { DownloadLinks } from "../../core/download-link.js";
import type { JobEstimate, QueueForecaster } from "../../core/forecast.js";
import type { JobHead } from "../../core/job-store.js";
import {
  hasLiveResult,
  INITIATE_OUTCOME,
  initiateOutcomeJson,
  type JobExtras,
  toJobJson,
  toProtoEstimate,
  toProtoJob,
} from "../../core/job-to-proto.js";
import { isTerminal, type JobRecord } from "../../core/jobs.js";
import type { PresignedResult } from "../../core/storage.js";
import {
  CancelResponseSchema,
  DeleteJobResponseSchema,
  GetStatusResponseSchema,
  InitiateResponseSchema,
  ListJobsResponseSchema,
  RetryJobResponseSchema,
  WatchJobResponseSchema,
} from "../../gen/downloads/v1/download_service_pb.js";
import type { Beat } from "../watch-hub.js";
import { envelope, httpChunk, utf8InEnvelope } from "../wire/envelope.js";

// The job presenter: a JobRecord becomes the wire job with its freshly presigned
// download link, once per answer, for both ways in. connect-node takes the message;
// the lean transport takes the bytes, which each answer serializes at most once per
// encoding, so an answer shared by many watchers or polls is encoded once.

/** One encoding of an answer: its bytes, and their envelope and HTTP/1.1 chunk once asked for. */
interface Encoded {
  payload: Uint8Array;
  framed?: Buffer;
  chunk?: Buffer;
}

/** One RPC answer: the response message, and its encodings made on first use. */
export class Reply<Desc extends DescMessage> {
  private msg: MessageShape<Desc> | undefined;
  /** JSON, then binary. */
  private readonly encodings: [Encoded | undefined, Encoded | undefined] = [undefined, undefined];

  constructor(
    readonly schema: Desc,
    private readonly build: () => MessageShape<Desc>,
    /** The JSON text made straight from the record (core/job-to-proto.ts toJobJson). */
    private readonly jsonText?: () => string,
    /** A stream ends after this answer: the lean transport sends both in one write. */
    readonly last = false,
  ) {}

  message(): MessageShape<Desc> {
    this.msg ??= this.build();
    return this.msg;
  }

  private encoded(binary: boolean): Encoded {
    const i = binary ? 1 : 0;
    // JSON is made inside its envelope, for the streams that send it (wire/envelope.ts).
    this.encodings[i] ??= binary
      ? { payload: toBinary(this.schema, this.message()) }
      : utf8InEnvelope(this.jsonText?.() ?? toJsonString(this.schema, this.message()));
    return this.encodings[i];
  }

  bytes(binary: boolean): Uint8Array {
    return this.encoded(binary).payload;
  }

  /** The bytes in a plain envelope (flags 0), made once for every stream that sends them. */
  enveloped(binary: boolean): Buffer {
    const e = this.encoded(binary);
    e.framed ??= envelope(0, e.payload);
    return e.framed;
  }

  /** enveloped() as one HTTP/1.1 chunk (the lean transport's chunked streams). */
  chunked(binary: boolean): Buffer {
    const e = this.encoded(binary);
    e.chunk ??= httpChunk(this.enveloped(binary));
    return e.chunk;
  }
}

/** A GetStatus answer of one version of a job, kept for the polls that follow. */
class StatusReply extends Reply<typeof GetStatusResponseSchema> {
  readonly version: number;
  /** The queue plan the estimate came from (QueueForecaster.generation). */
  readonly generation: number;
  /** What the ETag adds for the estimate: it changes whenever the estimate does. */
  readonly estimateTag: string;
  private jobText: string | undefined;

  constructor(
    private readonly rec: JobRecord,
    private readonly download: PresignedResult | undefined,
    private readonly pollAfterMs: number | undefined,
    private readonly extras: JobExtras = {},
    generation = 0,
  ) {
    super(
      GetStatusResponseSchema,
      () =>
        create(GetStatusResponseSchema, {
          job: toProtoJob(rec, download, extras),
          ...(pollAfterMs !== undefined ? { pollAfter: duration(pollAfterMs) } : {}),
        }),
      () => this.jsonWith(""),
    );
    this.version = rec.version;
    this.generation = generation;
    const e = extras.estimate;
    this.estimateTag =
      e === undefined
        ? ""
        : createHash("sha256")
            .update(
              `${e.position} ${e.predictedStartAt} ${e.predictedEndAt} ${e.runningJobs} ${e.samples} ${Math.round(e.bytesPerSecond)}`,
            )
            .digest("base64url")
            .slice(0, 10);
  }

  /** The JSON answer with `fields` (",\"name\":value..." of fields 2 and 3) in their place. */
  jsonWith(fields: string): string {
    this.jobText ??= JSON.stringify(toJobJson(this.rec, this.download, this.extras));
    const poll =
      this.pollAfterMs !== undefined ? `,"pollAfter":"${durationJson(this.pollAfterMs)}"` : "";
    return `{"job":${this.jobText}${fields}${poll}}`;
  }
}

/** A unary answer and the response headers it asks for. */
export interface Answer<Desc extends DescMessage> {
  reply: Reply<Desc>;
  header?: Readonly<Record<string, string>>;
  /**
   * A GET whose If-None-Match names the answer's ETag: a transport that can answers
   * 304 Not Modified with the headers and no body.
   */
  notModified?: boolean;
}

type Presigner = {
  presignResult(key: string, fileName: string, now?: number): Promise<PresignedResult>;
};

/** What a long-poll adds to a GetStatus answer (rpc/long-poll.ts). */
export interface StatusWait {
  ms: number;
  notice?: string | undefined;
}

/** A Duration of whole milliseconds, as a message field and as protobuf JSON. */
function duration(ms: number): { seconds: bigint; nanos: number } {
  return { seconds: BigInt(Math.floor(ms / 1000)), nanos: (ms % 1000) * 1_000_000 };
}

function durationJson(ms: number): string {
  return `${Number((ms / 1000).toFixed(3))}s`;
}

/** What the presenter adds to a record's answer beyond the presigned URL. */
export interface PresenterOptions {
  /** Stable download links (DOWNLOAD_LINK_SECRET); none without. */
  links?: DownloadLinks | undefined;
  /** Queue position and predicted times of queued and running jobs. */
  forecast?: QueueForecaster | undefined;
  /** Where a failed estimate is reported: the answer goes out without one. */
  onError?: (err: unknown) => void;
}

/** Whether an If-None-Match header names `etag` (weak comparison, RFC 9110 13.1.2). */
export function etagMatches(ifNoneMatch: string | null, etag: string): boolean {
  if (ifNoneMatch === null) return false;
  for (const raw of ifNoneMatch.split(",")) {
    const tag = raw.trim();
    if (tag === "*" || (tag.startsWith("W/") ? tag.slice(2) : tag) === etag) return true;
  }
  return false;
}

/** Jobs whose GetStatus answer is kept (a few hundred bytes to a few KB each). */
const STATUS_CACHE_SIZE = 10_000;

// Every stream of a job receives the same record object from the hub, and the answer
// made for it rides on that object under a symbol of ours (not enumerable: no copy, no
// JSON, no comparison sees it), so it goes when the record does. Not a WeakMap keyed by
// the record: each job update would add an ephemeron, and V8 walks those in the pause
// of a full collection (wire/envelope.ts).
const WATCH_ANSWER = Symbol("watch answer");
type Answered = JobRecord & { [WATCH_ANSWER]?: Promise<Reply<typeof WatchJobResponseSchema>> };

/** How long one queued job's estimate serves the heartbeats of all its streams. */
const QUEUED_ESTIMATE_SHARE_MS = 500;

export class JobPresenter {
  // Pollers read a job far more often than it changes, and an answer is a pure function
  // of the record, which every change gives a new version (job-store.ts): keep it per
  // job and version. Only a job that can still change is kept: pollers stop at the end
  // state, so an ended job's entry would stay until evicted (and a live result is
  // presigned anew on every read).
  private readonly statuses = new Map<string, StatusReply>();
  // A queued job's estimate for its heartbeats: the streams of one job are due in the
  // same tick of the hub and share the record object, so they share one estimate.
  private readonly queuedEstimates = new WeakMap<
    JobRecord,
    { at: number; extras: Promise<JobExtras> }
  >();
  private readonly completedMaxAge: number;
  /** A completed job's URL is signed as of the start of its window of this many ms. */
  private readonly urlWindowMs: number;

  constructor(
    private readonly presigner: Presigner,
    presignExpirySeconds: number,
    private readonly opts: PresenterOptions = {},
  ) {
    this.completedMaxAge = Math.max(0, Math.min(60, Math.floor(presignExpirySeconds / 10)));
    this.urlWindowMs = Math.max(1, this.completedMaxAge) * 1000;
  }

  /** The start of the URL window `now` falls in. */
  private urlWindow(now: number): number {
    return now - (now % this.urlWindowMs);
  }

  /**
   * A completed job's URL is presigned on every read (stored URLs expire), as of the
   * start of the current URL window (a tenth of the URL's lifetime, at most a minute):
   * reads within one window get the same URL, so an answer is a function of the record
   * and the window, and its ETag can say so. The URL lives that much less at most.
   */
  presign(rec: JobRecord, now = Date.now()): Promise<PresignedResult | undefined> {
    return hasLiveResult(rec)
      ? this.presigner.presignResult(rec.result.key, rec.result.fileName, this.urlWindow(now))
      : Promise.resolve(undefined);
  }

  /**
   * The ETag of a GetStatus answer: the job's version (every change of the record makes
   * a new one, job-store.ts) and, for a completed job, the URL window its link was
   * signed in. Anything else a GetStatus answer comes to show that is not bound to the
   * record's version must be added here, or a 304 would hide its change: a queued or
   * running job's estimate (whole seconds, core/forecast.ts) is, from the answer that
   * status() made last for this version.
   */
  etag(rec: JobHead, now = Date.now()): string {
    if (hasLiveResult(rec)) return `"${rec.version}.${this.urlWindow(now) / this.urlWindowMs}"`;
    const kept = isTerminal(rec.state) ? undefined : this.statuses.get(rec.id);
    return kept !== undefined && kept.version === rec.version && kept.estimateTag !== ""
      ? `"${rec.version}.q${kept.estimateTag}"`
      : `"${rec.version}"`;
  }

  /**
   * The ETag of the answer a full read would make now, from the job's head alone, or
   * undefined when only a full read can tell (a queued or running job whose kept answer
   * is of another version, or of an older queue plan: its estimate may have moved).
   */
  async headEtag(head: JobHead, now = Date.now()): Promise<string | undefined> {
    if (!isTerminal(head.state) && this.opts.forecast !== undefined) {
      const generation = await this.opts.forecast.currentGeneration().catch(() => -1);
      const kept = this.statuses.get(head.id);
      if (kept === undefined || kept.version !== head.version || kept.generation !== generation)
        return undefined;
    }
    return this.etag(head, now);
  }

  /**
   * The answer's parts made at read time: a completed job's stable link, a queued or
   * running job's estimate (a failed estimate leaves it out rather than fail the call).
   */
  async extras(rec: JobRecord): Promise<JobExtras> {
    const { links, forecast } = this.opts;
    if (isTerminal(rec.state)) return { linkUrl: links?.linkFor(rec) };
    if (forecast === undefined) return {};
    try {
      return { estimate: await forecast.estimate(rec) };
    } catch (err) {
      this.opts.onError?.(err);
      return {};
    }
  }

  /** When a plain poll of a job that can still change is worth making again. */
  pollAfterMs(rec: JobRecord): number | undefined {
    switch (rec.state) {
      case "QUEUED":
        return 2000;
      case "PROCESSING":
        return 1000;
      default:
        return undefined;
    }
  }

  async status(
    rec: JobRecord,
    wait?: StatusWait,
    now = Date.now(),
  ): Promise<Reply<typeof GetStatusResponseSchema>> {
    const base: StatusReply = await this.plainStatus(rec, now);
    if (wait === undefined || wait.ms <= 0) return base;
    // A long-poll's answer also says what wait was applied: its own reply around the
    // shared one (the job is still encoded once per version).
    const extra = {
      wait: duration(wait.ms),
      ...(wait.notice !== undefined ? { waitNotice: wait.notice } : {}),
    };
    const extraJson =
      `,"wait":"${durationJson(wait.ms)}"` +
      (wait.notice !== undefined ? `,"waitNotice":${JSON.stringify(wait.notice)}` : "");
    return new Reply(
      GetStatusResponseSchema,
      () => {
        const { job, pollAfter } = base.message();
        return create(GetStatusResponseSchema, { job, pollAfter, ...extra });
      },
      () => base.jsonWith(extraJson),
    );
  }

  private async plainStatus(rec: JobRecord, now: number): Promise<StatusReply> {
    const keep = !isTerminal(rec.state);
    if (!keep) this.statuses.delete(rec.id);
    // A queued or running job's answer also changes with the queue's plan.
    const generation =
      keep && this.opts.forecast !== undefined
        ? await this.opts.forecast.currentGeneration().catch(() => -1)
        : 0;
    const kept = keep ? this.statuses.get(rec.id) : undefined;
    if (kept !== undefined && kept.version === rec.version && kept.generation === generation)
      return kept;
    const [download, extras] = await Promise.all([this.presign(rec, now), this.extras(rec)]);
    const reply = new StatusReply(rec, download, this.pollAfterMs(rec), extras, generation);
    if (keep) {
      this.statuses.delete(rec.id);
      if (this.statuses.size >= STATUS_CACHE_SIZE)
        this.statuses.delete(this.statuses.keys().next().value as string);
      this.statuses.set(rec.id, reply);
    }
    return reply;
  }

  /**
   * How long a GET answer may be reused. Every answer is `private`: job status belongs
   * to its owner, and a download URL is a bearer credential. A running job changes up to
   * five times a second, so a second of reuse only spares a poller's duplicate reads; a
   * failed or cancelled job never changes; a completed job's URL expires, so its answer
   * may be reused for a small part of the URL's lifetime only.
   */
  cacheControl(rec: Pick<JobRecord, "state">): string {
    switch (rec.state) {
      case "COMPLETED":
        return `private, max-age=${this.completedMaxAge}`;
      case "FAILED":
      case "CANCELLED":
        return "private, max-age=60";
      default:
        return "private, max-age=1";
    }
  }

  /** A watched record: presigned and encoded once for every stream of the job. */
  watch(rec: JobRecord): Promise<Reply<typeof WatchJobResponseSchema>> {
    let reply = (rec as Answered)[WATCH_ANSWER];
    if (reply === undefined) {
      reply = Promise.all([this.presign(rec), this.extras(rec)]).then(
        ([download, extras]) =>
          new Reply(
            WatchJobResponseSchema,
            () =>
              create(WatchJobResponseSchema, {
                event: { case: "job", value: toProtoJob(rec, download, extras) },
              }),
            () => `{"job":${JSON.stringify(toJobJson(rec, download, extras))}}`,
            isTerminal(rec.state),
          ),
      );
      Object.defineProperty(rec, WATCH_ANSWER, { value: reply });
    }
    return reply;
  }

  /**
   * A watch stream's heartbeat; a queued job's also says where the job stands now (its
   * estimate moves as the queue drains, with no new version of the job to carry it).
   */
  heartbeat(
    beat: Beat,
  ): Reply<typeof WatchJobResponseSchema> | Promise<Reply<typeof WatchJobResponseSchema>> {
    const reply = (estimate?: JobEstimate) =>
      new Reply(WatchJobResponseSchema, () =>
        create(WatchJobResponseSchema, {
          event: {
            case: "heartbeat",
            value: {
              time: timestampFromMs(beat.time),
              version: beat.version,
              ...(estimate !== undefined ? { estimate: toProtoEstimate(estimate) } : {}),
            },
          },
        }),
      );
    const rec = beat.queued;
    if (rec === undefined) return reply();
    let shared = this.queuedEstimates.get(rec);
    if (shared === undefined || beat.time - shared.at >= QUEUED_ESTIMATE_SHARE_MS) {
      shared = { at: beat.time, extras: this.extras(rec) };
      this.queuedEstimates.set(rec, shared);
    }
    return shared.extras.then((extras) => reply(extras.estimate));
  }

  async initiated(
    rec: JobRecord,
    outcome: AdmissionOutcome,
  ): Promise<Reply<typeof InitiateResponseSchema>> {
    // A new job's files that no worker has seen are sized first, for its first estimate.
    if (outcome === "created") await this.opts.forecast?.sizeNewJob(rec.fileIds);
    // Only a reused result is complete at once; its URL is made now, as on every read.
    const [download, extras] = await Promise.all([this.presign(rec), this.extras(rec)]);
    return new Reply(
      InitiateResponseSchema,
      () =>
        create(InitiateResponseSchema, {
          job: toProtoJob(rec, download, extras),
          outcome: INITIATE_OUTCOME[outcome],
        }),
      // The outcome is never the default value, so JSON always carries it.
      () =>
        `{"job":${JSON.stringify(toJobJson(rec, download, extras))},"outcome":"${initiateOutcomeJson(outcome)}"}`,
    );
  }

  async cancelled(rec: JobRecord): Promise<Reply<typeof CancelResponseSchema>> {
    const [download, extras] = await Promise.all([this.presign(rec), this.extras(rec)]);
    return new Reply(
      CancelResponseSchema,
      () => create(CancelResponseSchema, { job: toProtoJob(rec, download, extras) }),
      () => `{"job":${JSON.stringify(toJobJson(rec, download, extras))}}`,
    );
  }

  /** A page of ListJobs: each job as GetStatus shows it, completed ones freshly presigned. */
  async listed(page: {
    jobs: readonly JobRecord[];
    nextPageToken: string;
  }): Promise<Reply<typeof ListJobsResponseSchema>> {
    const [downloads, extras] = await Promise.all([
      Promise.all(page.jobs.map((rec) => this.presign(rec))),
      Promise.all(page.jobs.map((rec) => this.extras(rec))),
    ]);
    const token = JSON.stringify(page.nextPageToken);
    return new Reply(
      ListJobsResponseSchema,
      () =>
        create(ListJobsResponseSchema, {
          jobs: page.jobs.map((rec, i) => toProtoJob(rec, downloads[i], extras[i])),
          nextPageToken: page.nextPageToken,
        }),
      () => {
        const jobs = page.jobs.map((rec, i) =>
          JSON.stringify(toJobJson(rec, downloads[i], extras[i])),
        );
        const parts = [];
        if (jobs.length > 0) parts.push(`"jobs":[${jobs.join(",")}]`);
        if (page.nextPageToken !== "") parts.push(`"nextPageToken":${token}`);
        return `{${parts.join(",")}}`;
      },
    );
  }

  deleted(): Reply<typeof DeleteJobResponseSchema> {
    return new Reply(
      DeleteJobResponseSchema,
      () => create(DeleteJobResponseSchema),
      () => "{}",
    );
  }

  async retried(rec: JobRecord, replayed: boolean): Promise<Reply<typeof RetryJobResponseSchema>> {
    const [download, extras] = await Promise.all([this.presign(rec), this.extras(rec)]);
    return new Reply(
      RetryJobResponseSchema,
      () => create(RetryJobResponseSchema, { job: toProtoJob(rec, download, extras), replayed }),
      () =>
        `{"job":${JSON.stringify(toJobJson(rec, download, extras))}${replayed ? ',"replayed":true' : ""}}`,
    );
  }
}
