import { execFile } from "node:child_process";
import { resolve } from "node:path";
import { promisify } from "node:util";
import { create, createFileRegistry, fromBinary } from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema, FileDescriptorSetSchema } from "@bufbuild/protobuf/wkt";
import { createClient } from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { createJob } from "../core/job-transitions.js";
import { newJobId } from "../core/jobs.js";
import * as v1 from "../gen/grpc/reflection/v1/reflection_pb.js";
import * as v1alpha from "../gen/grpc/reflection/v1alpha/reflection_pb.js";
import { type ApiStack, startApiStack } from "./helpers/api.js";

// gRPC server reflection, checked the way users meet it: buf curl with no --schema
// (it must discover every method and encode a call from what the server sends), and
// the protocol itself through a generated client, decoding the descriptors it gets.

const run = promisify(execFile);
const ROOT = resolve(import.meta.dirname, "..");
const BUF = resolve(ROOT, "node_modules/.bin/buf");

let st: ApiStack;
let sessions: Http2SessionManager;

beforeAll(async () => {
  // About reflection, not auth: every caller is the anonymous owner.
  st = await startApiStack({ AUTH_DISABLED: "true" });
  sessions = new Http2SessionManager(st.server.url);
});
afterAll(async () => {
  sessions?.abort();
  await st?.stop();
});

/** buf curl over gRPC/h2c, run outside the repository so no proto/ can help it. */
const bufCurl = (args: string[]) =>
  run(BUF, ["curl", "--protocol", "grpc", "--http2-prior-knowledge", ...args], {
    cwd: "/",
    timeout: 120_000,
  });

describe("buf curl without --schema", () => {
  test.each([["grpc-v1"], ["grpc-v1alpha"]])(
    "lists every method over reflection %s",
    async (version) => {
      const { stdout } = await bufCurl([
        "--reflect-protocol",
        version,
        "--list-methods",
        st.server.url,
      ]);
      const methods = stdout.trim().split("\n").sort();
      expect(methods).toEqual([
        "downloads.v1.DownloadService/Cancel",
        "downloads.v1.DownloadService/CreateWatchToken",
        "downloads.v1.DownloadService/DeleteJob",
        "downloads.v1.DownloadService/GetJobStatistics",
        "downloads.v1.DownloadService/GetStatus",
        "downloads.v1.DownloadService/Initiate",
        "downloads.v1.DownloadService/ListJobHistory",
        "downloads.v1.DownloadService/ListJobs",
        "downloads.v1.DownloadService/RetryJob",
        "downloads.v1.DownloadService/WatchJob",
        "grpc.health.v1.Health/Check",
        "grpc.health.v1.Health/Watch",
        "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
      ]);
    },
  );

  test("initiates a job and reads it back, message types learned from the server", async () => {
    const init = await bufCurl([
      "--data",
      '{"fileIds":[70000,70001]}',
      `${st.server.url}/downloads.v1.DownloadService/Initiate`,
    ]);
    const { job } = JSON.parse(init.stdout) as {
      job: { jobId: string; state: string; fileIds: number[] };
    };
    expect(job.state).toBe("JOB_STATE_QUEUED");
    expect(job.fileIds).toEqual([70000, 70001]);
    expect(await st.store.get(job.jobId)).toMatchObject({
      state: "QUEUED",
      fileIds: [70000, 70001],
    });

    const status = await bufCurl([
      "--data",
      JSON.stringify({ jobId: job.jobId }),
      `${st.server.url}/downloads.v1.DownloadService/GetStatus`,
    ]);
    expect(JSON.parse(status.stdout)).toMatchObject({
      job: { jobId: job.jobId, state: "JOB_STATE_QUEUED", version: 1 },
    });
  });

  test("streams WatchJob until the terminal state", async () => {
    const id = (await createJob(st.store, newJobId(), [1], "anonymous")).id;
    const watching = bufCurl([
      "--data",
      JSON.stringify({ jobId: id }),
      `${st.server.url}/downloads.v1.DownloadService/WatchJob`,
    ]);
    // The snapshot is the state when the server reads it, after subscribing: advance the
    // job only once the QUEUED snapshot has reached buf curl (it prints each message as
    // it arrives).
    let seen = "";
    watching.child.stdout?.on("data", (d: Buffer) => (seen += d.toString()));
    await waitForWatchers(id);
    await expect.poll(() => seen).toContain("JOB_STATE_QUEUED");
    await st.startJob(id);
    await st.fail(id);
    const { stdout } = await watching;
    // buf curl prints one JSON document per message.
    const states = [...stdout.matchAll(/"state":\s*"(JOB_STATE_\w+)"/g)].map((m) => m[1]);
    expect(states).toEqual(["JOB_STATE_QUEUED", "JOB_STATE_PROCESSING", "JOB_STATE_FAILED"]);
  });
});

/** Polls until the API has subscribed to the job's channel, i.e. the watch is in place. */
async function waitForWatchers(jobId: string): Promise<void> {
  await expect
    .poll(
      async () =>
        ((await st.redis.pubsub("NUMSUB", st.store.channel(jobId))) as [string, number])[1],
    )
    .toBe(1);
}

describe.each([
  ["v1", v1.ServerReflection],
  ["v1alpha", v1alpha.ServerReflection],
] as const)("the reflection protocol, %s", (_version, service) => {
  /** Sends the questions on one stream and returns the answers in order. */
  async function ask(questions: v1.ServerReflectionRequest["messageRequest"][]) {
    const client = createClient(
      service,
      createGrpcTransport({ baseUrl: st.server.url, sessionManager: sessions }),
    );
    async function* requests() {
      for (const messageRequest of questions) yield { host: "api", messageRequest } as never;
    }
    const answers = [];
    for await (const res of client.serverReflectionInfo(requests())) answers.push(res);
    return answers;
  }

  const fileNames = (res: { messageResponse: { case: string | undefined; value?: unknown } }) => {
    expect(res.messageResponse.case).toBe("fileDescriptorResponse");
    const value = res.messageResponse.value as { fileDescriptorProto: Uint8Array[] };
    return value.fileDescriptorProto.map((b) => fromBinary(FileDescriptorProtoSchema, b).name);
  };

  test("answers a symbol with its file and every file it imports, once per stream", async () => {
    const [first, second, third] = await ask([
      { case: "fileContainingSymbol", value: "downloads.v1.DownloadService.WatchJob" },
      { case: "fileContainingSymbol", value: "downloads.v1.JobState" },
      { case: "fileByFilename", value: "google/protobuf/timestamp.proto" },
    ]);
    expect(first?.validHost).toBe("api");
    expect(first?.originalRequest?.messageRequest.case).toBe("fileContainingSymbol");
    expect(fileNames(first as never)).toEqual([
      "downloads/v1/download_service.proto",
      "google/protobuf/duration.proto",
      "google/protobuf/timestamp.proto",
    ]);
    // The asked-for file always comes back; a dependency the stream already has does not.
    expect(fileNames(second as never)).toEqual(["downloads/v1/download_service.proto"]);
    expect(fileNames(third as never)).toEqual(["google/protobuf/timestamp.proto"]);
  });

  test("sends descriptors a client can build a working registry from", async () => {
    const [res] = await ask([
      { case: "fileByFilename", value: "downloads/v1/download_service.proto" },
    ]);
    const value = res?.messageResponse.value as { fileDescriptorProto: Uint8Array[] };
    const files = value.fileDescriptorProto.map((b) => fromBinary(FileDescriptorProtoSchema, b));
    const registry = createFileRegistry(create(FileDescriptorSetSchema, { file: files.reverse() }));
    const svc = registry.getService("downloads.v1.DownloadService");
    expect(svc?.methods.map((m) => `${m.name}:${m.methodKind}`)).toEqual([
      "Initiate:unary",
      "GetStatus:unary",
      "WatchJob:server_streaming",
      "Cancel:unary",
      "ListJobHistory:unary",
      "GetJobStatistics:unary",
      "ListJobs:unary",
      "DeleteJob:unary",
      "RetryJob:unary",
      "CreateWatchToken:unary",
    ]);
    expect(registry.getMessage("downloads.v1.Job")?.field.createTime?.message?.typeName).toBe(
      "google.protobuf.Timestamp",
    );
  });

  test("lists the services and reports what it does not know as NOT_FOUND", async () => {
    const [list, noSymbol, noFile, noExtension, extensionNumbers, noType] = await ask([
      { case: "listServices", value: "" },
      { case: "fileContainingSymbol", value: "downloads.v1.Nope" },
      { case: "fileByFilename", value: "nope.proto" },
      {
        case: "fileContainingExtension",
        value: { containingType: "downloads.v1.Job", extensionNumber: 100 } as never,
      },
      { case: "allExtensionNumbersOfType", value: "downloads.v1.Job" },
      { case: "allExtensionNumbersOfType", value: "downloads.v1.Nope" },
    ]);
    expect(list?.messageResponse).toMatchObject({ case: "listServicesResponse" });
    const listed = list?.messageResponse.value as { service: { name: string }[] };
    const names = listed.service.map((s) => s.name);
    expect(names).toEqual([
      "downloads.v1.DownloadService",
      "grpc.health.v1.Health",
      "grpc.reflection.v1.ServerReflection",
      "grpc.reflection.v1alpha.ServerReflection",
    ]);
    for (const res of [noSymbol, noFile, noExtension, noType]) {
      expect(res?.messageResponse).toMatchObject({
        case: "errorResponse",
        value: { errorCode: 5 },
      });
    }
    expect(extensionNumbers?.messageResponse).toMatchObject({
      case: "allExtensionNumbersResponse",
      value: { baseTypeName: "downloads.v1.Job", extensionNumber: [] },
    });
  });
});
