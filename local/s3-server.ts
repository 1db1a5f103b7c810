import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { unlink } from "node:fs/promises";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import S3rver from "s3rver";
import { freePort } from "./ports.js";

// The embedded S3 server (s3rver) for the local default and the tests. It speaks the S3
// protocol over HTTP, so the service code is the same as against MinIO or AWS. Its
// credentials are fixed by s3rver itself.

export const LOCAL_S3_CREDENTIALS = { accessKeyId: "S3RVER", secretAccessKey: "S3RVER" } as const;

// s3rver knows its access keys in one registry per process (it checks that a request's
// key exists, not its signature): tests add keys to stand for an IAM role's rotating
// temporary credentials, and revoke the old ones to prove they are no longer used.
const s3rverAccount = (
  createRequire(import.meta.url)("s3rver/lib/models/account.js") as {
    DUMMY_ACCOUNT: {
      createKeyPair(accessKeyId: string, secretAccessKey: string): void;
      revokeAccessKey(accessKeyId: string): void;
    };
  }
).DUMMY_ACCOUNT;

// s3rver's DeleteObject also removes the object's folder once it is empty. A PutObject of
// another key under that folder which made the folder just before then opens its file in
// a folder that is gone, and the write stream's ENOENT has no listener: the whole process
// dies of an uncaught exception (seen when a cancelled job's ZIP is deleted while another
// job's ZIP is being written under the same bundles/ prefix). Real S3 has no folders to
// race on, so deleting here removes the object's three files and leaves folders alone.
type ResourcePath = (bucket: string, key: string, kind: string) => string;
const s3rverStore = (
  createRequire(import.meta.url)("s3rver/lib/stores/filesystem.js") as {
    prototype: {
      getResourcePath: ResourcePath;
      deleteObject(bucket: string, key: string): Promise<void>;
    };
  }
).prototype;
s3rverStore.deleteObject = async function deleteKeepingFolders(bucket: string, key: string) {
  const path: ResourcePath = this.getResourcePath.bind(this);
  await Promise.all(
    ["object", "object.md5", "metadata.json"].map((kind) =>
      unlink(path(bucket, key, kind)).catch((err: NodeJS.ErrnoException) => {
        if (err.code !== "ENOENT") throw err;
      }),
    ),
  );
};

/** Lets the embedded S3 servers of this process accept another access key. */
export function addLocalS3AccessKey(accessKeyId: string, secretAccessKey: string): void {
  s3rverAccount.createKeyPair(accessKeyId, secretAccessKey);
}

/** The embedded S3 servers of this process refuse `accessKeyId` from now on (403). */
export function revokeLocalS3AccessKey(accessKeyId: string): void {
  s3rverAccount.revokeAccessKey(accessKeyId);
}

export interface LocalS3 {
  endpoint: string;
  port: number;
  /** Where s3rver keeps the objects: <dir>/<bucket>/<key>._S3rver_object. */
  dir: string;
  stop(): Promise<void>;
}

export async function startS3(
  opts: { port?: number; dir?: string; buckets?: string[] } = {},
): Promise<LocalS3> {
  const port = opts.port ?? (await freePort());
  const temp = opts.dir === undefined;
  const directory = temp ? mkdtempSync(join(tmpdir(), "dj-s3-")) : resolve(opts.dir as string);
  mkdirSync(directory, { recursive: true });
  const server = new S3rver({
    port,
    address: "127.0.0.1",
    silent: true,
    directory,
    configureBuckets: (opts.buckets ?? []).map((name) => ({ name, configs: [] })),
  });
  await server.run();
  return {
    endpoint: `http://127.0.0.1:${port}`,
    port,
    dir: directory,
    async stop() {
      await server.close();
      if (temp) rmSync(directory, { recursive: true, force: true });
    },
  };
}
