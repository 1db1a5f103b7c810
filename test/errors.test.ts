import { S3ServiceException } from "@aws-sdk/client-s3";
import { Code, ConnectError, createClient, createRouterTransport } from "@connectrpc/connect";
import { describe, expect, test } from "vitest";
import type { JobService } from "../core/job-service.js";
import {
  BackendUnavailableError,
  IdempotencyMismatchError,
  InvalidInputError,
  JobNotFoundError,
  JobStateError,
  newJobId,
  OverloadedError,
  QuotaExceededError,
} from "../core/jobs.js";
import { createLogger } from "../core/logger.js";
import { DownloadService } from "../gen/downloads/v1/download_service_pb.js";
import { authInterceptor, createAuthenticator } from "../server/auth.js";
import { connectRoutes } from "../server/connect/connect-routes.js";
import { rpcInterceptor } from "../server/connect/rpc-interceptor.js";
import { downloadRpcs } from "../server/rpc/download-rpcs.js";
import { toConnectError } from "../server/rpc/errors.js";
import { JobPresenter } from "../server/rpc/presenter.js";
import type { WatchHub } from "../server/watch-hub.js";

// The one mapping from domain and backend errors to Connect codes. The common cases
// are also covered end to end (api-*.test.ts); here are the ones a live test cannot
// easily provoke: other socket failures, S3 answers, wrapped causes.

function errno(code: string): Error {
  return Object.assign(new Error(`connect ${code} 127.0.0.1:6379`), { code });
}

describe("toConnectError", () => {
  test.each([
    ["bad input", new InvalidInputError("file_ids is empty"), Code.InvalidArgument],
    ["an unknown job", new JobNotFoundError(newJobId()), Code.NotFound],
    [
      "a finished job",
      new JobStateError(newJobId(), "COMPLETED", "job is completed"),
      Code.FailedPrecondition,
    ],
    ["an unreachable backend", new BackendUnavailableError("down"), Code.Unavailable],
    [
      "ioredis giving up",
      Object.assign(new Error("Reached the max retries"), { name: "MaxRetriesPerRequestError" }),
      Code.Unavailable,
    ],
    ["a closed ioredis connection", new Error("Connection is closed."), Code.Unavailable],
    [
      "Redis still loading its append-only file",
      new Error("LOADING Redis is loading the dataset in memory"),
      Code.Unavailable,
    ],
    ["an owner's quota", new QuotaExceededError("too many", 5000), Code.ResourceExhausted],
    ["a full queue", new OverloadedError("at capacity", 10_000), Code.Unavailable],
    [
      "a reused idempotency key",
      new IdempotencyMismatchError("other parameters"),
      Code.InvalidArgument,
    ],
    ["a refused connection", errno("ECONNREFUSED"), Code.Unavailable],
    ["a reset connection", errno("ECONNRESET"), Code.Unavailable],
    [
      "happy eyeballs failing on every address",
      new AggregateError([errno("ECONNREFUSED")], "connect failed"),
      Code.Unavailable,
    ],
    [
      "a wrapped network cause",
      new Error("upload failed", { cause: errno("ETIMEDOUT") }),
      Code.Unavailable,
    ],
    [
      "S3 answering 503",
      new S3ServiceException({
        name: "SlowDown",
        $fault: "server",
        $metadata: { httpStatusCode: 503 },
        message: "slow down",
      }),
      Code.Unavailable,
    ],
  ])("maps %s", (_what, err, code) => {
    expect(toConnectError(err)?.code).toBe(code);
  });

  test("leaves anything unexpected alone, including S3 client errors", () => {
    expect(toConnectError(new TypeError("x is undefined"))).toBeUndefined();
    expect(
      toConnectError(
        new S3ServiceException({
          name: "AccessDenied",
          $fault: "client",
          $metadata: { httpStatusCode: 403 },
          message: "no",
        }),
      ),
    ).toBeUndefined();
  });

  test("keeps a ConnectError as it is", () => {
    const err = new ConnectError("shutting down", Code.Unavailable);
    expect(toConnectError(err)).toBe(err);
  });
});

describe("the interceptor, through an in-memory router", () => {
  const failing = (err: unknown) => {
    const jobs = {
      get: () => Promise.reject(err),
      cancel: () => Promise.reject(err),
      initiate: () => Promise.reject(err),
    } as unknown as JobService;
    return createClient(
      DownloadService,
      createRouterTransport(
        connectRoutes(
          downloadRpcs({
            jobs,
            hub: {} as WatchHub,
            presenter: new JobPresenter({ presignResult: () => Promise.reject(err) }, 300),
          }),
        ),
        {
          // As the server wires it; every caller is the anonymous owner here.
          router: {
            interceptors: [
              rpcInterceptor(createLogger("silent", "test")),
              authInterceptor(createAuthenticator({ tokens: [], disabled: true })),
            ],
          },
        },
      ),
    );
  };

  test("maps domain errors for every handler", async () => {
    const client = failing(new JobNotFoundError("x"));
    const err = ConnectError.from(
      await client.getStatus({ jobId: newJobId() }).catch((e: unknown) => e),
    );
    expect(err.code).toBe(Code.NotFound);
  });

  test("answers an unexpected error with INTERNAL and keeps its detail out of the response", async () => {
    const client = failing(new TypeError("secret internal detail"));
    const err = ConnectError.from(
      await client.cancel({ jobId: newJobId() }).catch((e: unknown) => e),
    );
    expect(err.code).toBe(Code.Internal);
    expect(err.rawMessage).not.toContain("secret");
  });
});
