import { fromBinary } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { compressedFlag, compressionNegotiate } from "@connectrpc/connect/protocol";
import { parseTimeout, setTrailerStatus } from "@connectrpc/connect/protocol-grpc";
import { compressionBrotli, compressionGzip } from "@connectrpc/connect-node";
import {
  type GetStatusRequest,
  GetStatusRequestSchema,
} from "../gen/downloads/v1/download_service_pb.js";
import {
  asConnectError,
  type FastPathDeps,
  type NodeRequest,
  type NodeResponse,
  out,
  readBody,
  recordOutcome,
  streamBodyLimit,
  withDeadline,
} from "./fast-connect.js";
import type { StatusAnswers } from "./fast-status.js";

// GetStatus over gRPC (h2c), the call backend pollers make. connect-node's gRPC handler
// costs several times the call itself (abort signals, header objects, async-iterable
// pipelines); here a poll is one HGETALL and, while the job's version stands, an answer
// already framed. fast-path.ts sends only uncompressed binary requests here; the answer
// is connect-node's, byte for byte: the same headers, the same trailers (grpc-status,
// grpc-message, grpc-status-details-bin from the same helper), the same codes.
// Node's compatibility (req, res) API is kept: a do-nothing gRPC responder on the raw
// 'stream' event measured within the noise of one on it (~31k vs ~33k calls/s with h2load
// on this machine), and the RPC log, metrics and tracing of rpc-log.ts live on it.

const PROCEDURE = "/downloads.v1.DownloadService/GetStatus";
/** connect-node's defaults: what it accepts and answers with, and from what size it compresses. */
const COMPRESSIONS = [compressionGzip, compressionBrotli];
const COMPRESS_MIN_BYTES = 1024;

export function createFastGrpcStatus(deps: FastPathDeps, answers: StatusAnswers) {
  return async function getStatus(req: NodeRequest, res: NodeResponse): Promise<void> {
    const headers: Record<string, string> = { "content-type": "application/grpc+proto" };
    // The response's compression, negotiated as connect-node does: the first encoding in
    // grpc-accept-encoding that it knows. Clients such as grpc-js always offer gzip.
    const accept = req.headers["grpc-accept-encoding"];
    const compression = compressionNegotiate(
      COMPRESSIONS,
      null,
      typeof accept === "string" ? accept : null,
      "grpc-accept-encoding",
    ).response;
    if (compression !== null) headers["grpc-encoding"] = compression.name;
    let owner: string | undefined;
    try {
      owner = deps.authenticate(req.headers);
      const raw = req.headers["grpc-timeout"];
      const timeout = parseTimeout(typeof raw === "string" ? raw : null, Number.MAX_SAFE_INTEGER);
      if (timeout.error !== undefined) throw timeout.error;
      const work = (async () => {
        const input = unaryRequest(
          await readBody(req, streamBodyLimit(deps.readMaxBytes)),
          deps.readMaxBytes,
        );
        return answers.lookup(owner as string, input.jobId);
      })();
      const answer = await withDeadline(work, timeout.timeoutMs);
      let frame = answers.serialize(answer, "grpc");
      if (compression !== null && frame.byteLength - 5 >= COMPRESS_MIN_BYTES) {
        const packed = await compression.compress(frame.subarray(5));
        frame = Buffer.allocUnsafe(5 + packed.byteLength);
        frame[0] = compressedFlag;
        frame.writeUInt32BE(packed.byteLength, 1);
        frame.set(packed, 5);
      }
      recordOutcome(req, undefined, owner);
      respond(res, headers, frame, { "grpc-status": "0" });
    } catch (err) {
      const error = asConnectError(err, deps.log, PROCEDURE);
      recordOutcome(req, error.code, owner);
      // gRPC errors travel in trailers after a 200, as connect-node sends them.
      const trailers: Record<string, string> = {};
      setTrailerStatus(new Headers(), error).forEach((value, name) => {
        trailers[name] = value;
      });
      respond(res, headers, undefined, trailers);
    }
  };
}

function respond(
  res: NodeResponse,
  headers: Record<string, string>,
  body: Buffer | undefined,
  trailers: Record<string, string>,
) {
  // A caller that hung up (or reset the stream) gets nothing more.
  if (res.destroyed || res.writableEnded) return;
  out(res).writeHead(200, headers);
  out(res).addTrailers(trailers);
  if (body === undefined) out(res).end();
  else out(res).end(body);
}

/**
 * The single message of a unary gRPC request, checked as connect-node checks it: each
 * envelope within `maxBytes`, none cut short or compressed (a compressed request says so
 * in grpc-encoding and goes to connect-node), exactly one.
 */
function unaryRequest(body: Buffer, maxBytes: number): GetStatusRequest {
  let message: Uint8Array | undefined;
  let count = 0;
  for (let at = 0; at < body.length; ) {
    if (body.length - at < 5)
      throw new ConnectError("protocol error: incomplete envelope", Code.InvalidArgument);
    const flags = body[at] as number;
    const length = body.readUInt32BE(at + 1);
    if (length > maxBytes) {
      throw new ConnectError(
        `message size ${length} is larger than configured readMaxBytes ${maxBytes}`,
        Code.ResourceExhausted,
      );
    }
    if (body.length - at - 5 < length)
      throw new ConnectError("protocol error: incomplete envelope", Code.InvalidArgument);
    if ((flags & compressedFlag) === compressedFlag) {
      throw new ConnectError(
        "received compressed envelope, but do not know how to decompress",
        Code.InvalidArgument,
      );
    }
    message = body.subarray(at + 5, at + 5 + length);
    count += 1;
    at += 5 + length;
  }
  if (message === undefined)
    throw new ConnectError(
      "protocol error: missing input message for unary method",
      Code.Unimplemented,
    );
  if (count > 1)
    throw new ConnectError(
      "protocol error: received extra input message for unary method",
      Code.Unimplemented,
    );
  try {
    return fromBinary(GetStatusRequestSchema, message);
  } catch (err) {
    // connect-node's words; the code is the caller's error, as strict-binary.ts makes it there.
    throw new ConnectError(
      `parse binary: ${err instanceof Error ? err.message : String(err)}`,
      Code.InvalidArgument,
    );
  }
}
