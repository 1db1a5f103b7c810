import { toJsonString } from "@bufbuild/protobuf";
import { describe, expect, test } from "vitest";
import { type JobExtras, toJobJson, toProtoJob } from "../core/job-to-proto.js";
import { type JobRecord, newJobRecord } from "../core/jobs.js";
import { JobSchema } from "../gen/downloads/v1/download_service_pb.js";

// toJobJson must write exactly what protobuf-es writes for the same record: every
// state, every optional part, the edge values of each field kind.

const base = newJobRecord(
  "3f0c0d9e-6b1a-4c53-9b9e-2f1d6a0b7c11",
  "owner-a",
  [70000, 70001, 5],
  1795770000000,
);
const at = (ms: number) => 1795770000000 + ms;

const records: [string, JobRecord, { url: string; expiresAt: number } | undefined][] = [
  ["a new job", base, undefined],
  [
    "a running job with fractional rates and an ETA of 0",
    {
      ...base,
      state: "PROCESSING",
      version: 4,
      attempts: 2,
      updatedAt: at(1500),
      startedAt: at(1000),
      progress: {
        filesDone: 1,
        filesTotal: 3,
        bytesDone: 1234.6,
        bytesTotal: 300_000_000_123,
        bytesPerSecond: 8_000_000.4,
        etaSeconds: 0,
      },
      files: [
        {
          fileId: 70000,
          state: "DONE",
          sizeBytes: 1234,
          bytesDone: 1234,
          entryName: 'report "Q3" – ü.pdf',
        },
        {
          fileId: 70001,
          state: "IN_PROGRESS",
          sizeBytes: 300_000_000_000,
          bytesDone: 0,
          entryName: "file-70001",
        },
        { fileId: 5, state: "PENDING", sizeBytes: 0, bytesDone: 0, entryName: "" },
      ],
    },
    undefined,
  ],
  [
    "a completed job with its URL",
    {
      ...base,
      state: "COMPLETED",
      version: 9,
      attempts: 1,
      updatedAt: at(2000),
      startedAt: at(7),
      endedAt: at(2000),
      progress: {
        filesDone: 3,
        filesTotal: 3,
        bytesDone: 10,
        bytesTotal: 10,
        bytesPerSecond: 0,
        etaSeconds: 3.6,
      },
      result: {
        key: "bundles/x.zip",
        fileName: "download-2026-11-27-3f0c0d9e.zip",
        sizeBytes: 22,
        sha256: "ab".repeat(32),
        expiresAt: at(86_400_000),
      },
    },
    {
      url: "http://127.0.0.1:9000/download-results/bundles/x.zip?X-Amz-Signature=00&a=%22",
      expiresAt: at(3_600_123),
    },
  ],
  [
    "a completed job whose result expired",
    {
      ...base,
      state: "COMPLETED",
      result: { key: "k", fileName: "f.zip", sizeBytes: 0, sha256: "", expired: true },
    },
    undefined,
  ],
  [
    "a failed job with missing files",
    {
      ...base,
      state: "FAILED",
      endedAt: at(999),
      error: {
        code: "not_found",
        message: "source files not found: 5.\nCheck the ids",
        retryable: false,
        missingFileIds: [5],
      },
    },
    undefined,
  ],
  [
    "a failed job, retryable, without missing files",
    { ...base, state: "FAILED", error: { code: "unavailable", message: "", retryable: true } },
    undefined,
  ],
  [
    "a cancelled job with a delivered webhook",
    {
      ...base,
      state: "CANCELLED",
      endedAt: at(10),
      callbackUrl: "https://hooks.example.test/done?x=1",
      webhook: {
        state: "DELIVERED",
        attempts: 2,
        lastStatus: 200,
        lastError: "",
        lastAttemptAt: at(20),
        deliveredAt: at(20_000),
      },
    },
    undefined,
  ],
  [
    "a job with a pending webhook never tried",
    {
      ...base,
      callbackUrl: "https://hooks.example.test/",
      webhook: { state: "PENDING", attempts: 0, lastStatus: 0 },
    },
    undefined,
  ],
  [
    "a job whose result is set while not completed",
    {
      ...base,
      state: "PROCESSING",
      result: { key: "k", fileName: "f", sizeBytes: 1, sha256: "s" },
    },
    undefined,
  ],
  [
    "a labelled job with a webhook, and an empty label value",
    {
      ...newJobRecord(base.id, base.owner, [1], at(0), "https://hooks.example.test/", {
        order: "ORD-7:a/b@c",
        team: "",
        a_b: "x",
      }),
      state: "FAILED",
      error: { code: "unavailable", message: "m", retryable: true },
    },
    undefined,
  ],
];

describe("toJobJson", () => {
  test.each(records)("%s: the JSON protobuf-es writes", (_what, rec, download) => {
    expect(JSON.stringify(toJobJson(rec, download))).toBe(
      toJsonString(JobSchema, toProtoJob(rec, download)),
    );
  });
});

// The parts made at read time (stable link, queue estimate) go through both writers too.
const completed = records.find(([what]) => what === "a completed job with its URL");
const extrasCases: [
  string,
  JobRecord,
  JobExtras,
  { url: string; expiresAt: number } | undefined,
][] = [
  [
    "a queued job with its position and predicted times",
    base,
    {
      estimate: {
        position: 3,
        predictedStartAt: at(12_345),
        predictedEndAt: at(20_000),
        runningJobs: 2,
        bytesPerSecond: 12_500_000.7,
        samples: 14,
      },
    },
    undefined,
  ],
  [
    "a queued job with a position and nothing measured yet",
    base,
    { estimate: { position: 1, runningJobs: 0, bytesPerSecond: 0, samples: 0 } },
    undefined,
  ],
  [
    "a running job with its predicted end",
    { ...base, state: "PROCESSING", startedAt: at(1000) },
    {
      estimate: {
        position: 0,
        predictedEndAt: at(90_000),
        runningJobs: 1,
        bytesPerSecond: 1,
        samples: 1,
      },
    },
    undefined,
  ],
  [
    "a completed job with its stable link",
    completed?.[1] as JobRecord,
    { linkUrl: "https://dl.example/d/3f0c0d9e-6b1a-4c53-9b9e-2f1d6a0b7c11?exp=1&sig=abc" },
    completed?.[2],
  ],
];

describe("toJobJson with read-time parts", () => {
  test.each(extrasCases)("%s: the JSON protobuf-es writes", (_what, rec, extras, download) => {
    expect(JSON.stringify(toJobJson(rec, download, extras))).toBe(
      toJsonString(JobSchema, toProtoJob(rec, download, extras)),
    );
  });
});

describe("toJobJson's times", () => {
  // Times are written from a cache of the text up to the second: every kind of fraction,
  // second and year boundaries, before 1970, and the same second twice (a cache hit).
  const times = [
    0, 1, 999, 1000, 1001, -1, -999, -1000, -1001, 1795770000000, 1795770000007, 1795770000070,
    1795770000700, 1795770000999, 1795770001000, 1798761599999, 1798761600000, 1795770000007,
    253402300798999,
  ];
  test.each(times)("%d ms: the text protobuf-es writes", (ms) => {
    const rec: JobRecord = { ...base, createdAt: ms, updatedAt: ms + 1, startedAt: ms + 500 };
    expect(JSON.stringify(toJobJson(rec))).toBe(toJsonString(JobSchema, toProtoJob(rec)));
  });
});
