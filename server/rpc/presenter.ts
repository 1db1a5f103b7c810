import {
  create,
  type DescMessage,
  type MessageShape,
  toBinary,
  toJsonString,
} from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import type { AdmissionOutcome } from "../../core/admission.js";
import {
  hasLiveResult,
  INITIATE_OUTCOME,
  initiateOutcomeJson,
  toJobJson,
  toProtoJob,
} from "../../core/job-to-proto.js";
import { isTerminal, type JobRecord } from "../../core/jobs.js";
import type { PresignedResult } from "../../core/storage.js";
import {
  CancelResponseSchema,
  GetStatusResponseSchema,
  InitiateResponseSchema,
  WatchJobResponseSchema,
} from "../../gen/downloads/v1/download_service_pb.js";

// The job presenter: a JobRecord becomes the wire job with its freshly presigned
// download link, once per answer, for both ways in. connect-node takes the message;
// the lean transport takes the bytes, which each answer serializes at most once per
// encoding, so an answer shared by many watchers or polls is encoded once.

/** One RPC answer: the response message, and its encodings made on first use. */
export class Reply<Desc extends DescMessage> {
  private msg: MessageShape<Desc> | undefined;
  private json: Uint8Array | undefined;
  private proto: Uint8Array | undefined;

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

  bytes(binary: boolean): Uint8Array {
    if (binary) {
      this.proto ??= toBinary(this.schema, this.message());
      return this.proto;
    }
    if (this.json === undefined) {
      // Its own allocation, never a slice of Node's shared 8 KB Buffer pool: a kept
      // answer of a few hundred bytes would pin its whole slab outside the JS heap.
      const text = this.jsonText?.() ?? toJsonString(this.schema, this.message());
      this.json = Buffer.allocUnsafeSlow(Buffer.byteLength(text));
      (this.json as Buffer).write(text);
    }
    return this.json;
  }
}

/** A unary answer and the response headers it asks for. */
export interface Answer<Desc extends DescMessage> {
  reply: Reply<Desc>;
  header?: Readonly<Record<string, string>>;
}

type Presigner = {
  presignResult(key: string, fileName: string): Promise<PresignedResult>;
};

/** Jobs whose GetStatus answer is kept (a few hundred bytes to a few KB each). */
const STATUS_CACHE_SIZE = 10_000;

export class JobPresenter {
  // Every stream of a job receives the same record object from the hub: the record is
  // the key, and the entry goes with it once no stream holds it.
  private readonly watched = new WeakMap<
    JobRecord,
    Promise<Reply<typeof WatchJobResponseSchema>>
  >();
  // Pollers read a job far more often than it changes, and an answer is a pure function
  // of the record, which every change gives a new version (job-store.ts): keep it per
  // job and version. Only a job that can still change is kept: pollers stop at the end
  // state, so an ended job's entry would stay until evicted (and a live result is
  // presigned anew on every read).
  private readonly statuses = new Map<
    string,
    Reply<typeof GetStatusResponseSchema> & { version?: number }
  >();
  private readonly completedMaxAge: number;

  constructor(
    private readonly presigner: Presigner,
    presignExpirySeconds: number,
  ) {
    this.completedMaxAge = Math.max(0, Math.min(60, Math.floor(presignExpirySeconds / 10)));
  }

  /** A completed job's URL is presigned on every read: stored URLs expire. */
  presign(rec: JobRecord): Promise<PresignedResult | undefined> {
    return hasLiveResult(rec)
      ? this.presigner.presignResult(rec.result.key, rec.result.fileName)
      : Promise.resolve(undefined);
  }

  async status(rec: JobRecord): Promise<Reply<typeof GetStatusResponseSchema>> {
    const keep = !isTerminal(rec.state);
    if (!keep) this.statuses.delete(rec.id);
    const kept = keep ? this.statuses.get(rec.id) : undefined;
    if (kept !== undefined && kept.version === rec.version) return kept;
    const download = await this.presign(rec);
    const reply = Object.assign(
      new Reply(
        GetStatusResponseSchema,
        () => create(GetStatusResponseSchema, { job: toProtoJob(rec, download) }),
        () => `{"job":${JSON.stringify(toJobJson(rec, download))}}`,
      ),
      { version: rec.version },
    );
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
  cacheControl(rec: JobRecord): string {
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
    let reply = this.watched.get(rec);
    if (reply === undefined) {
      reply = this.presign(rec).then(
        (download) =>
          new Reply(
            WatchJobResponseSchema,
            () =>
              create(WatchJobResponseSchema, {
                event: { case: "job", value: toProtoJob(rec, download) },
              }),
            () => `{"job":${JSON.stringify(toJobJson(rec, download))}}`,
            isTerminal(rec.state),
          ),
      );
      this.watched.set(rec, reply);
    }
    return reply;
  }

  heartbeat(beat: { time: number; version: number }): Reply<typeof WatchJobResponseSchema> {
    return new Reply(WatchJobResponseSchema, () =>
      create(WatchJobResponseSchema, {
        event: {
          case: "heartbeat",
          value: { time: timestampFromMs(beat.time), version: beat.version },
        },
      }),
    );
  }

  async initiated(
    rec: JobRecord,
    outcome: AdmissionOutcome,
  ): Promise<Reply<typeof InitiateResponseSchema>> {
    // Only a reused result is complete at once; its URL is made now, as on every read.
    const download = await this.presign(rec);
    return new Reply(
      InitiateResponseSchema,
      () =>
        create(InitiateResponseSchema, {
          job: toProtoJob(rec, download),
          outcome: INITIATE_OUTCOME[outcome],
        }),
      // The outcome is never the default value, so JSON always carries it.
      () =>
        `{"job":${JSON.stringify(toJobJson(rec, download))},"outcome":"${initiateOutcomeJson(outcome)}"}`,
    );
  }

  async cancelled(rec: JobRecord): Promise<Reply<typeof CancelResponseSchema>> {
    const download = await this.presign(rec);
    return new Reply(
      CancelResponseSchema,
      () => create(CancelResponseSchema, { job: toProtoJob(rec, download) }),
      () => `{"job":${JSON.stringify(toJobJson(rec, download))}}`,
    );
  }
}
