import { GetObjectCommand, S3Client } from "@aws-sdk/client-s3";
import { getSignedUrl } from "@aws-sdk/s3-request-presigner";
import { describe, expect, test } from "vitest";
import { PathStylePresigner } from "../core/presign.js";

// The lean presigner must make exactly the URL the AWS SDK makes for the same request
// and the same instant: same path, same parameters, same signature.

const credentials = {
  accessKeyId: "AKIDEXAMPLE",
  secretAccessKey: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
};

async function sdkUrl(
  endpoint: string,
  region: string,
  bucket: string,
  key: string,
  params: Record<string, string>,
  date: Date,
) {
  // As core/storage.ts configures its clients.
  const client = new S3Client({
    region,
    endpoint,
    forcePathStyle: true,
    credentials,
    requestChecksumCalculation: "WHEN_REQUIRED",
    responseChecksumValidation: "WHEN_REQUIRED",
  });
  try {
    return await getSignedUrl(
      client,
      new GetObjectCommand({
        Bucket: bucket,
        Key: key,
        ...(params["response-content-disposition"] !== undefined
          ? { ResponseContentDisposition: params["response-content-disposition"] }
          : {}),
        ...(params["response-content-type"] !== undefined
          ? { ResponseContentType: params["response-content-type"] }
          : {}),
      }),
      { expiresIn: 900, signingDate: date },
    );
  } finally {
    client.destroy();
  }
}

describe("PathStylePresigner", () => {
  const cases: [string, string, string, string, Record<string, string>][] = [
    [
      "http://127.0.0.1:9000",
      "us-east-1",
      "download-results",
      "bundles/0b6f.zip",
      { "response-content-type": "application/zip" },
    ],
    [
      "https://s3.example.test",
      "eu-central-1",
      "results",
      "a b/c+d/ü~*'()!.zip",
      {
        "response-content-disposition": `attachment; filename="_ber.zip"; filename*=UTF-8''${encodeURIComponent("über (1).zip")}`,
        "response-content-type": "application/zip",
      },
    ],
    ["http://minio:9000/", "us-west-2", "b", "deep/er/key.zip", {}],
    [
      "https://s3.example.test:8443",
      "ap-south-1",
      "b2",
      "x.zip",
      { "response-content-type": "application/zip" },
    ],
  ];

  test.each(cases)(
    "%s %s %s/%s: the SDK's URL, byte for byte",
    async (endpoint, region, bucket, key, params) => {
      const date = new Date(Date.UTC(2026, 10, 27, 9, 41, 7));
      const expected = await sdkUrl(endpoint, region, bucket, key, params, date);
      const signer = new PathStylePresigner({ endpoint, region, ...credentials });
      expect(
        signer.presignGet({ bucket, key, expiresInSeconds: 900, responseParams: params, date }),
      ).toBe(expected);
    },
  );

  test("a new day gets a new signing key, and so another signature", async () => {
    const signer = new PathStylePresigner({
      endpoint: "http://127.0.0.1:9000",
      region: "us-east-1",
      ...credentials,
    });
    for (const date of [
      new Date(Date.UTC(2026, 10, 27, 23, 59, 59)),
      new Date(Date.UTC(2026, 10, 28, 0, 0, 1)),
    ]) {
      const expected = await sdkUrl("http://127.0.0.1:9000", "us-east-1", "b", "k.zip", {}, date);
      expect(signer.presignGet({ bucket: "b", key: "k.zip", expiresInSeconds: 900, date })).toBe(
        expected,
      );
    }
  });
});
