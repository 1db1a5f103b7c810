import {
  DeleteObjectCommand,
  GetObjectCommand,
  ListObjectsV2Command,
  PutObjectCommand,
  S3Client,
} from "@aws-sdk/client-s3";
import { afterAll, beforeAll, expect, test } from "vitest";
import { LOCAL_S3_CREDENTIALS, type LocalS3, startS3 } from "../local/s3-server.js";

// The embedded S3 server the tests and `npm start` use must behave like S3 where the
// service leans on it. A DeleteObject racing a PutObject of another key under the same
// prefix is what every cancelled job does beside the jobs still writing their ZIPs under
// bundles/; s3rver itself would crash the process there (see local/s3-server.ts).

let s3: LocalS3;
let client: S3Client;

beforeAll(async () => {
  s3 = await startS3({ buckets: ["race"] });
  client = new S3Client({
    endpoint: s3.endpoint,
    region: "us-east-1",
    forcePathStyle: true,
    credentials: LOCAL_S3_CREDENTIALS,
  });
});

afterAll(async () => {
  client?.destroy();
  await s3?.stop();
});

test("deleting one object while another is written under the same prefix keeps both requests whole", async () => {
  const rounds = 300;
  for (let i = 0; i < rounds; i++) {
    await Promise.all([
      client.send(
        new PutObjectCommand({
          Bucket: "race",
          Key: `bundles/k${i}`,
          Body: Buffer.alloc(512, i % 256),
        }),
      ),
      client.send(new DeleteObjectCommand({ Bucket: "race", Key: `bundles/k${i - 1}` })),
    ]);
  }
  const listed = await client.send(
    new ListObjectsV2Command({ Bucket: "race", Prefix: "bundles/" }),
  );
  expect((listed.Contents ?? []).map((o) => o.Key)).toEqual([`bundles/k${rounds - 1}`]);
  const last = await client.send(
    new GetObjectCommand({ Bucket: "race", Key: `bundles/k${rounds - 1}` }),
  );
  const bytes = await last.Body?.transformToByteArray();
  expect(bytes && Buffer.from(bytes)).toEqual(Buffer.alloc(512, (rounds - 1) % 256));
});
