import { create, fromBinary, fromJsonString, toBinary, toJsonString } from "@bufbuild/protobuf";
import { base64Decode } from "@bufbuild/protobuf/wire";
import { Code, ConnectError } from "@connectrpc/connect";
import { hasLiveResult, toProtoJob } from "../core/job-to-proto.js";
import { isTerminal, type JobRecord } from "../core/jobs.js";
import type { PresignedResult } from "../core/storage.js";
import {
  type GetStatusRequest,
  GetStatusRequestSchema,
  type GetStatusResponse,
  GetStatusResponseSchema,
} from "../gen/downloads/v1/download_service_pb.js";
import {
  asConnectError,
  type FastPathDeps,
  type NodeRequest,
  type NodeResponse,
  out,
  readBody,
  recordOutcome,
  timeoutOf,
  withDeadline,
  writeUnaryError,
} from "./fast-connect.js";

// GetStatus over the Connect unary protocol, the call pollers make: a JSON or binary
// POST, or a GET with the message in the query (`?encoding=json&message=...`,
// `base64=1` for binary). connect-node spends more on its own machinery (abort signals,
// header objects, async iterables) than on the call; here a poll is one HGETALL, one
// conversion and one serialization, with connect-node's status codes and error bodies.

const PROCEDURE = "/downloads.v1.DownloadService/GetStatus";
/** Jobs whose serialized answer is kept (a few hundred bytes to a few KB each). */
const ANSWER_CACHE_SIZE = 10_000;

export interface StatusRequest {
  method: "GET" | "POST";
  binary: boolean;
  /** GET only: the query parameters. */
  params?: URLSearchParams;
}

/** An answer's encodings: Connect JSON, Connect binary, and binary in a gRPC envelope. */
export type AnswerEncoding = "json" | "proto" | "grpc";

export interface StatusAnswers {
  /** The job as `owner` may see it, with its result presigned when it has a live one. */
  lookup(owner: string, rawJobId: string): Promise<Lookup>;
  /** The serialized GetStatusResponse, reused while the job's version stands. */
  serialize(found: Lookup, encoding: AnswerEncoding): Buffer;
}

export interface Lookup {
  rec: JobRecord;
  download: PresignedResult | undefined;
}

/** One per server: the Connect and gRPC lean paths share the kept answers. */
export function createStatusAnswers(
  deps: Pick<FastPathDeps, "getJob" | "presigner">,
): StatusAnswers {
  // Pollers read the same job far more often than it changes, and a job's answer is a
  // pure function of its record, which every change gives a new version (the update
  // script in job-store.ts): keep the serialized answer per job and version, and skip
  // conversion and serialization while the version stands. Oldest entries go first.
  const answers = new Map<string, { version: number } & { [E in AnswerEncoding]?: Buffer }>();
  // Kept answers are allocated on their own (allocUnsafeSlow), never as a slice of
  // Node's shared 8 KB Buffer pool: a kept slice of a few hundred bytes pins its whole
  // pool slab outside the JS heap, ~8 KB per job and encoding (the soak's
  // nodejs_external_memory_bytes growth).
  const encode = (msg: GetStatusResponse, encoding: AnswerEncoding): Buffer => {
    if (encoding === "json") {
      const text = toJsonString(GetStatusResponseSchema, msg);
      const json = Buffer.allocUnsafeSlow(Buffer.byteLength(text));
      json.write(text);
      return json;
    }
    const bytes = toBinary(GetStatusResponseSchema, msg);
    if (encoding === "proto") return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const framed = Buffer.allocUnsafeSlow(5 + bytes.byteLength);
    framed[0] = 0;
    framed.writeUInt32BE(bytes.byteLength, 1);
    framed.set(bytes, 5);
    return framed;
  };
  return {
    async lookup(owner, rawJobId) {
      const rec = await deps.getJob(owner, rawJobId);
      // An expired result (retention deleted the ZIP) gets no URL.
      const download = hasLiveResult(rec)
        ? await deps.presigner.presignResult(rec.result.key, rec.result.fileName)
        : undefined;
      return { rec, download };
    },
    serialize({ rec, download }, encoding) {
      // Only a job that can still change is kept: pollers stop at the end state, so an
      // ended job's entry would stay until evicted (and a live result is presigned anew).
      const cacheable = !isTerminal(rec.state);
      if (!cacheable) answers.delete(rec.id);
      let entry = cacheable ? answers.get(rec.id) : undefined;
      if (entry !== undefined && entry.version !== rec.version) entry = undefined;
      const cached = entry?.[encoding];
      if (cached !== undefined) return cached;
      const body = encode(
        create(GetStatusResponseSchema, { job: toProtoJob(rec, download) }),
        encoding,
      );
      if (cacheable) {
        if (entry === undefined) {
          entry = { version: rec.version };
          answers.delete(rec.id);
          if (answers.size >= ANSWER_CACHE_SIZE)
            answers.delete(answers.keys().next().value as string);
          answers.set(rec.id, entry);
        }
        entry[encoding] = body;
      }
      return body;
    },
  };
}

export function createFastStatus(deps: FastPathDeps, answers: StatusAnswers) {
  /**
   * How long a GET answer may be reused. Every answer is `private`: job status belongs
   * to its owner (shared caches must not keep it), and a download URL is a bearer
   * credential. A running job changes up to five times a second, so a second of reuse
   * only spares a poller's duplicate reads; a failed or cancelled job never changes;
   * a completed job's answer carries a presigned URL that expires, so it may be reused
   * for a small part of the URL's lifetime only, leaving the client time to use it.
   */
  const completedMaxAge = Math.max(0, Math.min(60, Math.floor(deps.presignExpirySeconds / 10)));
  const cacheControl = (rec: JobRecord): string => {
    switch (rec.state) {
      case "COMPLETED":
        return `private, max-age=${completedMaxAge}`;
      case "FAILED":
      case "CANCELLED":
        return "private, max-age=60";
      default:
        return "private, max-age=1";
    }
  };

  return async function getStatus(
    req: NodeRequest,
    res: NodeResponse,
    call: StatusRequest,
  ): Promise<void> {
    const isGet = call.method === "GET";
    let owner: string | undefined;
    try {
      owner = deps.authenticate(req.headers);
      const timeout = timeoutOf(req.headers);
      if (timeout.error !== undefined) throw timeout.error;
      const work = (async () => {
        const input = isGet
          ? parseQueryMessage(call.params ?? new URLSearchParams(), call.binary)
          : parseBody(await readBody(req, deps.readMaxBytes), call.binary);
        return answers.lookup(owner as string, input.jobId);
      })();
      const answer = await withDeadline(work, timeout.ms);
      const body = answers.serialize(answer, call.binary ? "proto" : "json");
      const headers: Record<string, string> = {
        "content-type": call.binary ? "application/proto" : "application/json",
        "content-length": String(body.byteLength),
      };
      if (isGet) headers["cache-control"] = cacheControl(answer.rec);
      recordOutcome(req, undefined, owner);
      out(res).writeHead(200, headers);
      out(res).end(body);
    } catch (err) {
      const error = asConnectError(err, deps.log, PROCEDURE);
      recordOutcome(req, error.code, owner);
      // An error answer must not be reused: the next poll may well succeed.
      writeUnaryError(res, error, isGet ? { "cache-control": "no-store" } : undefined);
    }
  };
}

function parseBody(data: Uint8Array, binary: boolean): GetStatusRequest {
  if (binary) {
    try {
      return fromBinary(GetStatusRequestSchema, data);
    } catch (err) {
      // connect-node's words; the code is the caller's error, as strict-binary.ts makes it there.
      throw new ConnectError(
        `parse binary: ${err instanceof Error ? err.message : String(err)}`,
        Code.InvalidArgument,
      );
    }
  }
  return parseJson(Buffer.from(data.buffer, data.byteOffset, data.byteLength).toString("utf8"));
}

function parseJson(text: string): GetStatusRequest {
  // The usual poll is exactly {"jobId":"..."}: read it with JSON.parse. Anything else
  // goes through protobuf-es, which gives the exact errors (unknown fields, wrong types).
  const plain = plainJobIdRequest(text);
  if (plain !== undefined) return plain;
  try {
    return fromJsonString(GetStatusRequestSchema, text, { ignoreUnknownFields: false });
  } catch (err) {
    throw ConnectError.from(err, Code.InvalidArgument);
  }
}

function plainJobIdRequest(text: string): GetStatusRequest | undefined {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch {
    return undefined;
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) return undefined;
  const keys = Object.keys(value);
  if (keys.length !== 1 || keys[0] !== "jobId") return undefined;
  const jobId = (value as { jobId: unknown }).jobId;
  return typeof jobId === "string" ? create(GetStatusRequestSchema, { jobId }) : undefined;
}

/** Connect GET: `message` holds the request, base64url-encoded when `base64=1`. */
function parseQueryMessage(params: URLSearchParams, binary: boolean): GetStatusRequest {
  const message = params.get("message") ?? "";
  if (params.get("base64") === "1") {
    let bytes: Uint8Array;
    try {
      bytes = base64Decode(message);
    } catch {
      throw new ConnectError("message is not valid base64", Code.InvalidArgument);
    }
    return binary ? parseBody(bytes, true) : parseJson(Buffer.from(bytes).toString("utf8"));
  }
  return binary ? parseBody(Buffer.from(message, "utf8"), true) : parseJson(message);
}
