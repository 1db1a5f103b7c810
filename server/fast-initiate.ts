import { create, fromBinary, fromJsonString, toBinary } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  hasLiveResult,
  INITIATE_OUTCOME,
  initiateOutcomeJson,
  toJobJson,
  toProtoJob,
} from "../core/job-to-proto.js";
import {
  type InitiateRequest,
  InitiateRequestSchema,
  InitiateResponseSchema,
} from "../gen/downloads/v1/download_service_pb.js";
import {
  asConnectError,
  type FastPathDeps,
  type NodeRequest,
  type NodeResponse,
  out,
  plainJson,
  readBody,
  recordOutcome,
  timeoutOf,
  withDeadline,
  writeUnaryError,
} from "./fast-connect.js";

// Initiate over the Connect unary protocol (a JSON or binary POST), without connect-node.
// Every job starts with this call, and connect-node's own machinery around it (abort
// controllers and their DOMExceptions, header objects, interceptor chain) cost about as
// much API time as the admission and the queue write together: the job-overhead
// benchmark's largest share after the socket writes. The call itself is the same one
// download-service.ts makes: JobService.initiate, with the Idempotency-Key header, and
// the same error codes, details and Retry-After (errors.ts).

const PROCEDURE = "/downloads.v1.DownloadService/Initiate";

export function createFastInitiate(deps: FastPathDeps) {
  return async function initiate(
    req: NodeRequest,
    res: NodeResponse,
    binary: boolean,
  ): Promise<void> {
    let owner: string | undefined;
    try {
      owner = deps.authenticate(req.headers);
      const timeout = timeoutOf(req.headers);
      if (timeout.error !== undefined) throw timeout.error;
      const caller = owner;
      const work = (async () => {
        const input = parseBody(await readBody(req, deps.readMaxBytes), binary);
        const { job, outcome } = await deps.initiate(caller, {
          fileIds: input.fileIds,
          requestId: input.requestId,
          idempotencyKey: headerValue(req.headers["idempotency-key"]),
          callbackUrl: input.callbackUrl,
        });
        // Only a reused result is complete at once; its URL is made now, as on every read.
        const download = hasLiveResult(job)
          ? await deps.presigner.presignResult(job.result.key, job.result.fileName)
          : undefined;
        return { job, download, outcome };
      })();
      const answer = await withDeadline(work, timeout.ms);
      const body = binary
        ? Buffer.from(
            toBinary(
              InitiateResponseSchema,
              create(InitiateResponseSchema, {
                job: toProtoJob(answer.job, answer.download),
                outcome: INITIATE_OUTCOME[answer.outcome],
              }),
            ),
          )
        : // The JSON straight from the record (core/job-to-proto.ts toJobJson); outcome is never the default.
          Buffer.from(
            `{"job":${JSON.stringify(toJobJson(answer.job, answer.download))},"outcome":"${initiateOutcomeJson(answer.outcome)}"}`,
          );
      recordOutcome(req, undefined, owner);
      out(res).writeHead(200, {
        "content-type": binary ? "application/proto" : "application/json",
        "content-length": String(body.byteLength),
      });
      out(res).end(body);
    } catch (err) {
      const error = asConnectError(err, deps.log, PROCEDURE);
      recordOutcome(req, error.code, owner);
      writeUnaryError(res, error);
    }
  };
}

/** As Headers.get reads it for connect-node's handler: repeated values joined by ", ". */
function headerValue(value: string | string[] | undefined): string | null {
  if (value === undefined) return null;
  return Array.isArray(value) ? value.join(", ") : value;
}

function parseBody(data: Buffer, binary: boolean): InitiateRequest {
  if (binary) {
    try {
      return fromBinary(InitiateRequestSchema, data);
    } catch (err) {
      // connect-node's words; the code is the caller's error, as strict-binary.ts makes it there.
      throw new ConnectError(
        `parse binary: ${err instanceof Error ? err.message : String(err)}`,
        Code.InvalidArgument,
      );
    }
  }
  const text = data.toString("utf8");
  const plain = plainJson(text, { fileIds: "int32[]", requestId: "string", callbackUrl: "string" });
  if (plain !== undefined) return create(InitiateRequestSchema, plain);
  try {
    return fromJsonString(InitiateRequestSchema, text, { ignoreUnknownFields: false });
  } catch (err) {
    throw ConnectError.from(err, Code.InvalidArgument);
  }
}
