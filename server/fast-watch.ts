import { once } from "node:events";
import { create, fromBinary, fromJsonString, toBinary, toJsonString } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import { hasLiveResult, toJobJson, toProtoJob } from "../core/job-to-proto.js";
import { isTerminal, type JobRecord } from "../core/jobs.js";
import type { PresignedResult } from "../core/storage.js";
import {
  type WatchJobRequest,
  WatchJobRequestSchema,
  WatchJobResponseSchema,
} from "../gen/downloads/v1/download_service_pb.js";
import {
  asConnectError,
  deadlineExceeded,
  endStream,
  envelope,
  type FastPathDeps,
  type NodeRequest,
  type NodeResponse,
  out,
  plainJson,
  readBody,
  recordOutcome,
  singleRequestMessage,
  streamBodyLimit,
  timeoutOf,
} from "./fast-connect.js";

// WatchJob over the Connect streaming protocol (application/connect+json and
// application/connect+proto, HTTP/1.1 and h2), without connect-node's per-stream
// pipeline. connect-node serializes, envelopes and writes each message through a chain
// of async iterables per stream: at a thousand watchers of one job that is ~75 ms of one
// core per update. Here a published record is serialized once per encoding, enveloped
// once, and the same bytes are written to every stream of the job with one write each.
// Everything else (snapshot, resume, heartbeats, coalescing, the end after the terminal
// state, a maximum stream time, shutdown) is WatchHub's, as for the connect-node path.

const PROCEDURE = "/downloads.v1.DownloadService/WatchJob";
/**
 * Why a stream's signal aborts. abort() without a reason builds a DOMException, stack
 * trace included, for every stream: a tenth of a millisecond per job in the
 * job-overhead benchmark. Nothing reads the reason.
 */
const STREAM_OVER = new Error("stream over");
const CONTENT_TYPE = {
  json: "application/connect+json",
  proto: "application/connect+proto",
} as const;

/** One message as it goes out: the Connect envelope, and (lazily) the same as an HTTP/1.1 chunk. */
interface Frame {
  envelope: Buffer;
  chunk?: Buffer;
}

/** A record as this process sends it: its download URL (if any) and its framed encodings. */
interface Encoded {
  download: PresignedResult | undefined | Promise<PresignedResult>;
  json?: Frame | Promise<Frame>;
  proto?: Frame | Promise<Frame>;
}

/** `<size in hex>CRLF<data>CRLF`: what Node writes for one res.write() of a chunked response. */
function chunkOf(frame: Frame): Buffer {
  frame.chunk ??= Buffer.concat([
    Buffer.from(`${frame.envelope.length.toString(16)}\r\n`, "latin1"),
    frame.envelope,
    Buffer.from("\r\n", "latin1"),
  ]);
  return frame.chunk;
}

export function createFastWatch(deps: FastPathDeps) {
  // Every stream of a job receives the same record object from the hub, so the record
  // is the cache key; the entry goes with the record once no stream holds it.
  const encoded = new WeakMap<JobRecord, Encoded>();

  /** A completed job's URL is presigned on read (stored URLs expire); once per record here. */
  const presign = (rec: JobRecord): Promise<PresignedResult> | undefined =>
    hasLiveResult(rec)
      ? deps.presigner.presignResult(rec.result.key, rec.result.fileName)
      : undefined;

  // JSON straight from the record (toJobJson), binary through the proto Job.
  const encode = (
    rec: JobRecord,
    download: PresignedResult | undefined,
    binary: boolean,
  ): Frame => {
    const data = binary
      ? toBinary(
          WatchJobResponseSchema,
          create(WatchJobResponseSchema, {
            event: { case: "job", value: toProtoJob(rec, download) },
          }),
        )
      : Buffer.from(`{"job":${JSON.stringify(toJobJson(rec, download))}}`);
    return { envelope: envelope(0, data) };
  };

  /** The enveloped message for a record: presigned and serialized once per encoding. */
  const jobFrame = (rec: JobRecord, binary: boolean): Frame | Promise<Frame> => {
    let entry = encoded.get(rec);
    if (entry === undefined) {
      entry = { download: presign(rec) };
      encoded.set(rec, entry);
    }
    const key = binary ? "proto" : "json";
    let bytes = entry[key];
    if (bytes === undefined) {
      const download = entry.download;
      bytes =
        download instanceof Promise
          ? download.then((d) => encode(rec, d, binary))
          : encode(rec, download, binary);
      entry[key] = bytes;
    }
    return bytes;
  };

  return async function watchJob(
    req: NodeRequest,
    res: NodeResponse,
    binary: boolean,
  ): Promise<void> {
    const abort = new AbortController();
    const onClose = () => abort.abort(STREAM_OVER);
    res.once("close", onClose);
    let deadline: NodeJS.Timeout | undefined;
    let timedOut = false;
    let headersSent = false;
    let owner: string | undefined;
    // HTTP/1.1 only: after the head, a shared message goes straight to the socket as a
    // ready-made chunk (the bytes res.write() would produce), one buffer and one write
    // for every stream of the job instead of a chunk header built per stream.
    const h1 = req.httpVersionMajor === 1 ? out(res) : undefined;
    let waitOn: NodeJS.EventEmitter = res;
    let corked: { uncork(): void } | undefined;
    const write = (frame: Frame, shared: boolean): boolean => {
      if (!headersSent) {
        headersSent = true;
        // As connect-node: headers go out with the first message, so an error before
        // it is still a 200 with the error in the end-of-stream envelope.
        out(res).writeHead(200, {
          "content-type": binary ? CONTENT_TYPE.proto : CONTENT_TYPE.json,
        });
      } else if (shared && h1?.chunkedEncoding && h1.socket !== null) {
        waitOn = h1.socket;
        return h1.socket.write(chunkOf(frame));
      }
      waitOn = res;
      return out(res).write(frame.envelope);
    };
    /** Ends the stream with `{}` or the error; a client that hung up gets nothing more. */
    const finish = (err: ConnectError | undefined) => {
      if (abort.signal.aborted && !timedOut) {
        recordOutcome(req, Code.Canceled, owner);
        return;
      }
      const end = timedOut ? deadlineExceeded() : err;
      recordOutcome(req, end?.code, owner);
      if (!headersSent) {
        headersSent = true;
        out(res).writeHead(200, {
          "content-type": binary ? CONTENT_TYPE.proto : CONTENT_TYPE.json,
        });
      }
      out(res).end(endStream(end));
      uncork();
    };
    const uncork = () => {
      corked?.uncork();
      corked = undefined;
    };

    try {
      owner = deps.authenticate(req.headers);
      const timeout = timeoutOf(req.headers);
      if (timeout.error !== undefined) throw timeout.error;
      if (timeout.ms !== undefined) {
        deadline = setTimeout(() => {
          timedOut = true;
          abort.abort(STREAM_OVER);
        }, timeout.ms);
      }
      const body = await readBody(req, streamBodyLimit(deps.readMaxBytes));
      const request = parseRequest(singleRequestMessage(body, deps.readMaxBytes), binary);

      for await (const ev of deps.watch(owner, request.jobId, request.afterVersion, abort.signal)) {
        let frame =
          ev.job !== undefined
            ? jobFrame(ev.job, binary)
            : { envelope: heartbeatEnvelope(ev.heartbeat, binary) };
        if (frame instanceof Promise) frame = await frame;
        if (abort.signal.aborted) break;
        const last = ev.job !== undefined && isTerminal(ev.job.state);
        if (last && h1?.socket != null && headersSent) {
          // The hub ends the stream right after a terminal state: the last message and
          // the end of the stream leave in one write (finish uncorks).
          corked = h1.socket;
          h1.socket.cork();
        }
        // A client that reads slowly is sent nothing more until it catches up; meanwhile
        // the hub keeps only the latest record of each state for it.
        if (!write(frame, ev.job !== undefined) && !last) await drained(waitOn, abort.signal);
      }
      finish(undefined);
    } catch (err) {
      finish(abort.signal.aborted ? undefined : asConnectError(err, deps.log, PROCEDURE));
    } finally {
      clearTimeout(deadline);
      uncork();
      res.off("close", onClose);
      // Answered or abandoned: release the hub's generator if it is still open.
      abort.abort(STREAM_OVER);
    }
  };
}

function heartbeatEnvelope(beat: { time: number; version: number }, binary: boolean): Buffer {
  const msg = create(WatchJobResponseSchema, {
    event: {
      case: "heartbeat",
      value: { time: timestampFromMs(beat.time), version: beat.version },
    },
  });
  return envelope(
    0,
    binary
      ? toBinary(WatchJobResponseSchema, msg)
      : Buffer.from(toJsonString(WatchJobResponseSchema, msg)),
  );
}

function parseRequest(data: Uint8Array, binary: boolean): WatchJobRequest {
  if (binary) {
    try {
      return fromBinary(WatchJobRequestSchema, data);
    } catch (err) {
      // connect-node's words; the code is the caller's error, as strict-binary.ts makes it there.
      throw new ConnectError(
        `parse binary: ${err instanceof Error ? err.message : String(err)}`,
        Code.InvalidArgument,
      );
    }
  }
  const text = Buffer.from(data.buffer, data.byteOffset, data.byteLength).toString("utf8");
  const plain = plainJson(text, { jobId: "string", afterVersion: "int32" });
  if (plain !== undefined) return create(WatchJobRequestSchema, plain);
  try {
    return fromJsonString(WatchJobRequestSchema, text, { ignoreUnknownFields: false });
  } catch (err) {
    throw ConnectError.from(err, Code.InvalidArgument);
  }
}

async function drained(target: NodeJS.EventEmitter, signal: AbortSignal): Promise<void> {
  await once(target, "drain", { signal }).catch(() => undefined);
}
