import type { Readable } from "node:stream";
import {
  CreateBucketCommand,
  DeleteObjectCommand,
  GetObjectCommand,
  HeadBucketCommand,
  HeadObjectCommand,
  S3Client,
  S3ServiceException,
} from "@aws-sdk/client-s3";
import { Upload } from "@aws-sdk/lib-storage";
import { getSignedUrl } from "@aws-sdk/s3-request-presigner";
import { PathStylePresigner } from "./presign.js";

// Everything the service does with S3. Two clients: one for the endpoint this process
// reaches, one only for presigning with the endpoint the *browser* reaches, because a
// SigV4 URL signs the Host header.

export interface StorageOptions {
  endpoint?: string | undefined;
  publicEndpoint?: string | undefined;
  region: string;
  accessKeyId?: string | undefined;
  secretAccessKey?: string | undefined;
  forcePathStyle: boolean;
  sourceBucket: string;
  sourcePrefix: string;
  resultBucket: string;
  resultPrefix: string;
  presignExpirySeconds: number;
  uploadPartBytes: number;
  uploadQueueSize: number;
}

export interface SourceInfo {
  fileId: number;
  key: string;
  sizeBytes: number;
  /** Name from the object's `filename` metadata, if it has one. */
  fileName?: string;
}

export interface PresignedResult {
  url: string;
  expiresAt: number;
}

function makeClient(opts: StorageOptions, endpoint: string | undefined): S3Client {
  return new S3Client({
    region: opts.region,
    ...(endpoint !== undefined ? { endpoint } : {}),
    forcePathStyle: opts.forcePathStyle,
    ...(opts.accessKeyId !== undefined && opts.secretAccessKey !== undefined
      ? { credentials: { accessKeyId: opts.accessKeyId, secretAccessKey: opts.secretAccessKey } }
      : {}),
    // s3rver (and some S3-compatible servers) corrupt streaming uploads that carry the
    // SDK's default CRC trailers; ask for checksums only where the API requires them.
    requestChecksumCalculation: "WHEN_REQUIRED",
    responseChecksumValidation: "WHEN_REQUIRED",
  });
}

export function isNotFound(err: unknown): boolean {
  if (err instanceof S3ServiceException) {
    return (
      err.$metadata.httpStatusCode === 404 || err.name === "NotFound" || err.name === "NoSuchKey"
    );
  }
  return false;
}

export class Storage {
  readonly client: S3Client;
  private readonly signer: S3Client;
  /** The lean presigner, where it applies (path-style endpoint, static credentials). */
  private readonly pathStyle: PathStylePresigner | undefined;

  constructor(readonly opts: StorageOptions) {
    this.client = makeClient(opts, opts.endpoint);
    const publicEndpoint = opts.publicEndpoint ?? opts.endpoint;
    this.signer = makeClient(opts, publicEndpoint);
    this.pathStyle =
      publicEndpoint !== undefined &&
      opts.forcePathStyle &&
      opts.accessKeyId !== undefined &&
      opts.secretAccessKey !== undefined
        ? new PathStylePresigner({
            endpoint: publicEndpoint,
            region: opts.region,
            accessKeyId: opts.accessKeyId,
            secretAccessKey: opts.secretAccessKey,
          })
        : undefined;
  }

  sourceKey(fileId: number): string {
    return `${this.opts.sourcePrefix}${fileId}`;
  }

  /**
   * The result object of a job's `attempt`-th run. Each run writes its own object, so a
   * run that lost the job can never overwrite or delete the one the record names
   * (worker/processor.ts); the first run keeps the name results had before.
   */
  resultKey(jobId: string, attempt = 1): string {
    return attempt <= 1
      ? `${this.opts.resultPrefix}${jobId}.zip`
      : `${this.opts.resultPrefix}${jobId}.${attempt}.zip`;
  }

  /** HEADs a source object; returns undefined when it does not exist. */
  async headSource(fileId: number, signal?: AbortSignal): Promise<SourceInfo | undefined> {
    const key = this.sourceKey(fileId);
    try {
      const head = await this.client.send(
        new HeadObjectCommand({ Bucket: this.opts.sourceBucket, Key: key }),
        signal ? { abortSignal: signal } : {},
      );
      const name = head.Metadata?.filename;
      return {
        fileId,
        key,
        sizeBytes: head.ContentLength ?? 0,
        ...(name !== undefined && name !== "" ? { fileName: name } : {}),
      };
    } catch (err) {
      if (isNotFound(err)) return undefined;
      throw err;
    }
  }

  async openSource(key: string, signal?: AbortSignal): Promise<Readable> {
    const out = await this.client.send(
      new GetObjectCommand({ Bucket: this.opts.sourceBucket, Key: key }),
      signal ? { abortSignal: signal } : {},
    );
    return out.Body as Readable;
  }

  /** A multipart upload of `body` to the result bucket; never buffers more than the queue. */
  uploadResult(key: string, body: Readable, fileName: string): Upload {
    return new Upload({
      client: this.client,
      params: {
        Bucket: this.opts.resultBucket,
        Key: key,
        Body: body,
        ContentType: "application/zip",
        ContentDisposition: contentDisposition(fileName),
      },
      partSize: this.opts.uploadPartBytes,
      queueSize: this.opts.uploadQueueSize,
      leavePartsOnError: false,
    });
  }

  async deleteResult(key: string): Promise<void> {
    await this.client.send(new DeleteObjectCommand({ Bucket: this.opts.resultBucket, Key: key }));
  }

  async resultExists(key: string): Promise<boolean> {
    try {
      await this.client.send(new HeadObjectCommand({ Bucket: this.opts.resultBucket, Key: key }));
      return true;
    } catch (err) {
      if (isNotFound(err)) return false;
      throw err;
    }
  }

  /**
   * A GET URL for the public endpoint, made fresh on every read: a stored URL would
   * expire, and its host would be wrong behind another edge.
   */
  async presignResult(key: string, fileName: string, now = Date.now()): Promise<PresignedResult> {
    const expiresIn = this.opts.presignExpirySeconds;
    if (this.pathStyle !== undefined) {
      const url = this.pathStyle.presignGet({
        bucket: this.opts.resultBucket,
        key,
        expiresInSeconds: expiresIn,
        responseParams: {
          "response-content-disposition": contentDisposition(fileName),
          "response-content-type": "application/zip",
        },
        date: new Date(now),
      });
      return { url, expiresAt: now + expiresIn * 1000 };
    }
    const url = await getSignedUrl(
      this.signer,
      new GetObjectCommand({
        Bucket: this.opts.resultBucket,
        Key: key,
        ResponseContentDisposition: contentDisposition(fileName),
        ResponseContentType: "application/zip",
      }),
      { expiresIn },
    );
    return { url, expiresAt: now + expiresIn * 1000 };
  }

  /** Creates the source and result buckets if missing (local set-ups and tests). */
  async ensureBuckets(): Promise<void> {
    for (const Bucket of [this.opts.sourceBucket, this.opts.resultBucket]) {
      try {
        await this.client.send(new HeadBucketCommand({ Bucket }));
      } catch {
        await this.client.send(new CreateBucketCommand({ Bucket }));
      }
    }
  }

  /** Cheap reachability check for readiness; `signal` bounds it. */
  async ping(signal?: AbortSignal): Promise<void> {
    await this.client.send(
      new HeadBucketCommand({ Bucket: this.opts.resultBucket }),
      signal ? { abortSignal: signal } : {},
    );
  }

  destroy(): void {
    this.client.destroy();
    this.signer.destroy();
  }
}

function contentDisposition(fileName: string): string {
  const ascii = fileName.replace(/[^\x20-\x7e]|["\\]/g, "_");
  return `attachment; filename="${ascii}"; filename*=UTF-8''${encodeURIComponent(fileName)}`;
}

export function storageOptionsFrom(cfg: {
  S3_ENDPOINT?: string | undefined;
  S3_PUBLIC_ENDPOINT?: string | undefined;
  S3_REGION: string;
  S3_ACCESS_KEY_ID?: string | undefined;
  S3_SECRET_ACCESS_KEY?: string | undefined;
  S3_FORCE_PATH_STYLE: boolean;
  SOURCE_BUCKET: string;
  SOURCE_PREFIX: string;
  RESULT_BUCKET: string;
  RESULT_PREFIX: string;
  PRESIGN_EXPIRY_SECONDS: number;
  UPLOAD_PART_BYTES: number;
  UPLOAD_QUEUE_SIZE: number;
}): StorageOptions {
  return {
    endpoint: cfg.S3_ENDPOINT,
    publicEndpoint: cfg.S3_PUBLIC_ENDPOINT,
    region: cfg.S3_REGION,
    accessKeyId: cfg.S3_ACCESS_KEY_ID,
    secretAccessKey: cfg.S3_SECRET_ACCESS_KEY,
    forcePathStyle: cfg.S3_FORCE_PATH_STYLE,
    sourceBucket: cfg.SOURCE_BUCKET,
    sourcePrefix: cfg.SOURCE_PREFIX,
    resultBucket: cfg.RESULT_BUCKET,
    resultPrefix: cfg.RESULT_PREFIX,
    presignExpirySeconds: cfg.PRESIGN_EXPIRY_SECONDS,
    uploadPartBytes: cfg.UPLOAD_PART_BYTES,
    uploadQueueSize: cfg.UPLOAD_QUEUE_SIZE,
  };
}
