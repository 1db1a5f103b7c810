import { create, fromBinary, fromJsonString, toBinary, toJsonString } from "@bufbuild/protobuf";
import { base64Decode } from "@bufbuild/protobuf/wire";
import { Code, ConnectError } from "@connectrpc/connect";
import type { JobRecord } from "../core/jobs.js";
import {
  type GetStatusRequest,
  GetStatusRequestSchema,
  GetStatusResponseSchema,
} from "../gen/downloads/v1/download_service_pb.js";
import {
  type FastPathDeps,
  type NodeRequest,
  type NodeResponse,
  asConnectError,
  deadlineExceeded,
  out,
  readBody,
  recordOutcome,
  timeoutOf,
  writeUnaryError,
} from "./fast-connect.js";
import { hasLiveResult, toProtoJob } from "../core/job-to-proto.js";

// GetStatus over the Connect unary protocol, the call pollers make: a JSON or binary
// POST, or a GET with the message in the query (`?encoding=json&message=...`,
// `base64=1` for binary). connect-node spends more on its own machinery (abort signals,
// header objects, async iterables) than on the call; here a poll is one HGETALL, one
// conversion and one serialization, with connect-node's status codes and error bodies.

const PROCEDURE = "/downloads.v1.DownloadService/GetStatus";

export interface StatusRequest {
  method: "GET" | "POST";
  binary: boolean;
  /** GET only: the query parameters. */
  params?: URLSearchParams;
}

export function createFastStatus(deps: FastPathDeps) {
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

  return async function getStatus(req: NodeRequest, res: NodeResponse, call: StatusRequest): Promise<void> {
    const isGet = call.method === "GET";
    let deadline: NodeJS.Timeout | undefined;
    try {
      const owner = deps.authenticate(req.headers);
      const timeout = timeoutOf(req.headers);
      if (timeout.error !== undefined) throw timeout.error;
      const work = (async () => {
        const input = isGet
          ? parseQueryMessage(call.params ?? new URLSearchParams(), call.binary)
          : parseBody(await readBody(req, deps.readMaxBytes), call.binary);
        const rec = await deps.getJob(owner, input.jobId);
        // An expired result (retention deleted the ZIP) gets no URL.
        const download = hasLiveResult(rec)
          ? await deps.presigner.presignResult(rec.result.key, rec.result.fileName)
          : undefined;
        return { rec, job: toProtoJob(rec, download) };
      })();
      let answer: Awaited<typeof work>;
      if (timeout.ms === undefined) {
        answer = await work;
      } else {
        work.catch(() => undefined);
        answer = await Promise.race([
          work,
          new Promise<never>((_resolve, reject) => {
            deadline = setTimeout(() => reject(deadlineExceeded()), timeout.ms);
          }),
        ]);
      }
      const msg = create(GetStatusResponseSchema, { job: answer.job });
      const body = call.binary ? toBinary(GetStatusResponseSchema, msg) : Buffer.from(toJsonString(GetStatusResponseSchema, msg));
      const headers: Record<string, string> = {
        "content-type": call.binary ? "application/proto" : "application/json",
        "content-length": String(body.byteLength),
      };
      if (isGet) headers["cache-control"] = cacheControl(answer.rec);
      recordOutcome(req, undefined);
      out(res).writeHead(200, headers);
      out(res).end(body);
    } catch (err) {
      const error = asConnectError(err, deps.log, PROCEDURE);
      recordOutcome(req, error.code);
      // An error answer must not be reused: the next poll may well succeed.
      writeUnaryError(res, error, isGet ? { "cache-control": "no-store" } : undefined);
    } finally {
      clearTimeout(deadline);
    }
  };
}

function parseBody(data: Uint8Array, binary: boolean): GetStatusRequest {
  if (binary) {
    try {
      return fromBinary(GetStatusRequestSchema, data);
    } catch (err) {
      // connect-node's words; the code is the caller's error, as strict-binary.ts makes it there.
      throw new ConnectError(`parse binary: ${err instanceof Error ? err.message : String(err)}`, Code.InvalidArgument);
    }
  }
  return parseJson(Buffer.from(data.buffer, data.byteOffset, data.byteLength).toString("utf8"));
}

function parseJson(text: string): GetStatusRequest {
  try {
    return fromJsonString(GetStatusRequestSchema, text, { ignoreUnknownFields: false });
  } catch (err) {
    throw ConnectError.from(err, Code.InvalidArgument);
  }
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
