import { once } from "node:events";
import { create, fromBinary, fromJsonString, toBinary, toJsonString } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import type { JobRecord } from "../core/jobs.js";
import {
  type Job,
  WatchJobRequestSchema,
  type WatchJobRequest,
  WatchJobResponseSchema,
} from "../gen/downloads/v1/download_service_pb.js";
import {
  type FastPathDeps,
  type NodeRequest,
  type NodeResponse,
  asConnectError,
  deadlineExceeded,
  endStream,
  envelope,
  out,
  readBody,
  recordOutcome,
  singleRequestMessage,
  streamBodyLimit,
  timeoutOf,
} from "./fast-connect.js";
import { hasLiveResult, toProtoJob } from "../core/job-to-proto.js";

// WatchJob over the Connect streaming protocol (application/connect+json and
// application/connect+proto, HTTP/1.1 and h2), without connect-node's per-stream
// pipeline. connect-node serializes, envelopes and writes each message through a chain
// of async iterables per stream: at a thousand watchers of one job that is ~75 ms of one
// core per update. Here a published record is serialized once per encoding, enveloped
// once, and the same bytes are written to every stream of the job with one write each.
// Everything else (snapshot, resume, heartbeats, coalescing, the end after the terminal
// state, a maximum stream time, shutdown) is WatchHub's, as for the connect-node path.

const PROCEDURE = "/downloads.v1.DownloadService/WatchJob";
const CONTENT_TYPE = { json: "application/connect+json", proto: "application/connect+proto" } as const;

/** A record as this process sends it: the proto Job and its enveloped encodings. */
interface Encoded {
  job: Job | Promise<Job>;
  json?: Buffer | Promise<Buffer>;
  proto?: Buffer | Promise<Buffer>;
}

export function createFastWatch(deps: FastPathDeps) {
  // Every stream of a job receives the same record object from the hub, so the record
  // is the cache key; the entry goes with the record once no stream holds it.
  const encoded = new WeakMap<JobRecord, Encoded>();

  /** A completed job's URL is presigned on read (stored URLs expire); once per record here. */
  const present = (rec: JobRecord): Job | Promise<Job> => {
    if (!hasLiveResult(rec)) return toProtoJob(rec);
    return deps.presigner.presignResult(rec.result.key, rec.result.fileName).then((url) => toProtoJob(rec, url));
  };

  const encode = (job: Job, binary: boolean): Buffer => {
    const msg = create(WatchJobResponseSchema, { event: { case: "job", value: job } });
    return envelope(0, binary ? toBinary(WatchJobResponseSchema, msg) : Buffer.from(toJsonString(WatchJobResponseSchema, msg)));
  };

  /** The enveloped message for a record: converted, presigned and serialized once per encoding. */
  const jobEnvelope = (rec: JobRecord, binary: boolean): Buffer | Promise<Buffer> => {
    let entry = encoded.get(rec);
    if (entry === undefined) {
      entry = { job: present(rec) };
      encoded.set(rec, entry);
    }
    const key = binary ? "proto" : "json";
    let bytes = entry[key];
    if (bytes === undefined) {
      const job = entry.job;
      bytes = job instanceof Promise ? job.then((j) => encode(j, binary)) : encode(job, binary);
      entry[key] = bytes;
    }
    return bytes;
  };

  return async function watchJob(req: NodeRequest, res: NodeResponse, binary: boolean): Promise<void> {
    const abort = new AbortController();
    const onClose = () => abort.abort();
    res.once("close", onClose);
    let deadline: NodeJS.Timeout | undefined;
    let timedOut = false;
    let headersSent = false;
    const write = (chunk: Buffer): boolean => {
      if (!headersSent) {
        headersSent = true;
        // As connect-node: headers go out with the first message, so an error before
        // it is still a 200 with the error in the end-of-stream envelope.
        out(res).writeHead(200, { "content-type": binary ? CONTENT_TYPE.proto : CONTENT_TYPE.json });
      }
      return out(res).write(chunk);
    };
    /** Ends the stream with `{}` or the error; a client that hung up gets nothing more. */
    const finish = (err: ConnectError | undefined) => {
      if (abort.signal.aborted && !timedOut) {
        recordOutcome(req, Code.Canceled);
        return;
      }
      const end = timedOut ? deadlineExceeded() : err;
      recordOutcome(req, end?.code);
      write(endStream(end));
      res.end();
    };

    try {
      const owner = deps.authenticate(req.headers);
      const timeout = timeoutOf(req.headers);
      if (timeout.error !== undefined) throw timeout.error;
      if (timeout.ms !== undefined) {
        deadline = setTimeout(() => {
          timedOut = true;
          abort.abort();
        }, timeout.ms);
      }
      const body = await readBody(req, streamBodyLimit(deps.readMaxBytes));
      const request = parseRequest(singleRequestMessage(body, deps.readMaxBytes), binary);

      for await (const ev of deps.watch(owner, request.jobId, request.afterVersion, abort.signal)) {
        let chunk = ev.job !== undefined ? jobEnvelope(ev.job, binary) : heartbeatEnvelope(ev.heartbeat, binary);
        if (chunk instanceof Promise) chunk = await chunk;
        if (abort.signal.aborted) break;
        // A client that reads slowly is sent nothing more until it catches up; meanwhile
        // the hub keeps only the latest record of each state for it.
        if (!write(chunk)) await drained(res, abort.signal);
      }
      finish(undefined);
    } catch (err) {
      finish(abort.signal.aborted ? undefined : asConnectError(err, deps.log, PROCEDURE));
    } finally {
      clearTimeout(deadline);
      res.off("close", onClose);
      // Answered or abandoned: release the hub's generator if it is still open.
      abort.abort();
    }
  };
}

function heartbeatEnvelope(beat: { time: number; version: number }, binary: boolean): Buffer {
  const msg = create(WatchJobResponseSchema, {
    event: { case: "heartbeat", value: { time: timestampFromMs(beat.time), version: beat.version } },
  });
  return envelope(0, binary ? toBinary(WatchJobResponseSchema, msg) : Buffer.from(toJsonString(WatchJobResponseSchema, msg)));
}

function parseRequest(data: Uint8Array, binary: boolean): WatchJobRequest {
  if (binary) {
    try {
      return fromBinary(WatchJobRequestSchema, data);
    } catch (err) {
      // connect-node's words; the code is the caller's error, as strict-binary.ts makes it there.
      throw new ConnectError(`parse binary: ${err instanceof Error ? err.message : String(err)}`, Code.InvalidArgument);
    }
  }
  try {
    return fromJsonString(WatchJobRequestSchema, Buffer.from(data).toString("utf8"), { ignoreUnknownFields: false });
  } catch (err) {
    throw ConnectError.from(err, Code.InvalidArgument);
  }
}

async function drained(res: NodeResponse, signal: AbortSignal): Promise<void> {
  await once(res as NodeJS.EventEmitter, "drain", { signal }).catch(() => undefined);
}
