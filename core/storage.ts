import type { Readable } from "node:stream";
import {
  AbortMultipartUploadCommand,
  CompleteMultipartUploadCommand,
  CreateBucketCommand,
  CreateMultipartUploadCommand,
  DeleteObjectCommand,
  GetObjectCommand,
  HeadBucketCommand,
  HeadObjectCommand,
  ListPartsCommand,
  S3Client,
  S3ServiceException,
  UploadPartCommand,
} from "@aws-sdk/client-s3";
import { Upload } from "@aws-sdk/lib-storage";
import { getSignedUrl } from "@aws-sdk/s3-request-presigner";
import { PathStylePresigner } from "./presign.js";
import { ChangedObjectError, classifyS3Error, SourceError } from "./s3-errors.js";

// Everything the service does with S3. Three clients: one for the endpoint this process
// reaches, one for reading sources (no SDK retries: the bundle's reader retries itself,
// resumes where a body stopped and shrinks its window when S3 says SlowDown), and one
// only for presigning with the endpoint the *browser* reaches, because a SigV4 URL signs
// the Host header. Without static keys every client uses the AWS SDK's default
// credential chain (environment, shared config/SSO, web identity (IRSA), ECS container
// credentials, EC2 instance metadata), refreshed by the SDK before they expire.

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
  /** TCP connect deadline of every S3 call; 0 = none. */
  connectTimeoutMs?: number;
  /** Deadline for the response headers of HEAD and GET calls; 0 = none. */
  firstByteTimeoutMs?: number;
  /** A socket that moves no byte this long is dropped (uploads too); 0 = none. */
  stallMs?: number;
}

export interface SourceInfo {
  fileId: number;
  key: string;
  sizeBytes: number;
  /** Name from the object's `filename` metadata, if it has one. */
  fileName?: string;
  /** The version read: every GET asks for it (If-Match), so a changed object is noticed. */
  etag?: string;
  /** Last-Modified (ms since the epoch): the ZIP entry's time. */
  lastModified?: number;
}

/** A byte range of a source object; `end` is inclusive, as in the Range header. */
export interface SourceRange {
  start: number;
  end: number;
  etag?: string | undefined;
}

export interface PresignedResult {
  url: string;
  expiresAt: number;
}

function makeClient(
  opts: StorageOptions,
  endpoint: string | undefined,
  extra: { maxAttempts?: number; socketTimeout?: number } = {},
): S3Client {
  const { socketTimeout, ...rest } = extra;
  return new S3Client({
    region: opts.region,
    ...(endpoint !== undefined ? { endpoint } : {}),
    forcePathStyle: opts.forcePathStyle,
    ...rest,
    requestHandler: {
      connectionTimeout: opts.connectTimeoutMs ?? 0,
      // Uploads and control calls: S3 may think a while before answering a part or a
      // CompleteMultipartUpload, so their idle deadline is looser than a source body's.
      socketTimeout: socketTimeout ?? (opts.stallMs ?? 0) * 3,
      // HEAD and GET pass their first-byte deadline per call (uploads would trip it
      // while sending a part); it must throw, not only warn.
      throwOnRequestTimeout: true,
    },
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

/** Static keys from the configuration, or the SDK's default credential chain. */
export function hasStaticKeys(opts: StorageOptions): boolean {
  return opts.accessKeyId !== undefined && opts.secretAccessKey !== undefined;
}

export class Storage {
  readonly client: S3Client;
  /** Source reads only: one attempt per call, the bundle's reader decides what next. */
  readonly reader: S3Client;
  private readonly signer: S3Client;
  /** The lean presigner, where it applies (path-style endpoint, static credentials). */
  private readonly pathStyle: PathStylePresigner | undefined;

  constructor(readonly opts: StorageOptions) {
    this.client = makeClient(opts, opts.endpoint, { maxAttempts: 5 });
    // The reader watches its bodies itself: an idle socket there is often ours (a full
    // read-ahead window), not the server's stall.
    this.reader = makeClient(opts, opts.endpoint, { maxAttempts: 1, socketTimeout: 0 });
    const publicEndpoint = opts.publicEndpoint ?? opts.endpoint;
    this.signer = makeClient(opts, publicEndpoint);
    this.pathStyle =
      publicEndpoint !== undefined && opts.forcePathStyle && hasStaticKeys(opts)
        ? new PathStylePresigner({
            endpoint: publicEndpoint,
            region: opts.region,
            accessKeyId: opts.accessKeyId as string,
            secretAccessKey: opts.secretAccessKey as string,
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

  private callOptions(signal?: AbortSignal): {
    abortSignal?: AbortSignal;
    requestTimeout?: number;
  } {
    return {
      ...(signal ? { abortSignal: signal } : {}),
      ...(this.opts.firstByteTimeoutMs ? { requestTimeout: this.opts.firstByteTimeoutMs } : {}),
    };
  }

  /**
   * HEADs a source object; undefined when it does not exist. Any other permanent
   * failure (access denied, archived) is a SourceError naming the file.
   */
  async headSource(fileId: number, signal?: AbortSignal): Promise<SourceInfo | undefined> {
    const key = this.sourceKey(fileId);
    try {
      const head = await this.client.send(
        new HeadObjectCommand({ Bucket: this.opts.sourceBucket, Key: key }),
        this.callOptions(signal),
      );
      const name = head.Metadata?.filename;
      return {
        fileId,
        key,
        sizeBytes: head.ContentLength ?? 0,
        ...(name !== undefined && name !== "" ? { fileName: name } : {}),
        ...(head.ETag !== undefined ? { etag: head.ETag } : {}),
        ...(head.LastModified !== undefined ? { lastModified: head.LastModified.getTime() } : {}),
      };
    } catch (err) {
      if (isNotFound(err)) return undefined;
      const failure = classifyS3Error(err);
      if (failure.permanent && !signal?.aborted) {
        throw new SourceError(
          fileId,
          failure.code,
          false,
          `source file ${fileId} ${failure.reason}`,
          { cause: err },
        );
      }
      throw err;
    }
  }

  /** The whole object (no deadline, no resume): for callers outside the bundle. */
  async openSource(key: string, signal?: AbortSignal): Promise<Readable> {
    const out = await this.client.send(
      new GetObjectCommand({ Bucket: this.opts.sourceBucket, Key: key }),
      this.callOptions(signal),
    );
    return out.Body as Readable;
  }

  /**
   * One GET of a byte range, one attempt, with the first-byte deadline, conditional on
   * the ETag (If-Match): S3 answers 412 when the object changed; a server that ignores
   * If-Match is caught by comparing the answer's ETag.
   */
  async getSourceRange(
    key: string,
    range: SourceRange,
    signal?: AbortSignal,
  ): Promise<{ body: Readable; etag?: string }> {
    const out = await this.reader.send(
      new GetObjectCommand({
        Bucket: this.opts.sourceBucket,
        Key: key,
        Range: `bytes=${range.start}-${range.end}`,
        ...(range.etag !== undefined ? { IfMatch: range.etag } : {}),
      }),
      this.callOptions(signal),
    );
    const body = out.Body as Readable;
    if (range.etag !== undefined && out.ETag !== undefined && out.ETag !== range.etag) {
      body.destroy();
      throw new ChangedObjectError(`ETag ${out.ETag} is not ${range.etag}`);
    }
    return { body, ...(out.ETag !== undefined ? { etag: out.ETag } : {}) };
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

  // A multipart upload driven part by part (worker/stored-bundle.ts), so that a run that
  // takes over a crashed one can go on with the same upload: the parts S3 holds stay.

  async createResultUpload(key: string, fileName: string): Promise<string> {
    const out = await this.client.send(
      new CreateMultipartUploadCommand({
        Bucket: this.opts.resultBucket,
        Key: key,
        ContentType: "application/zip",
        ContentDisposition: contentDisposition(fileName),
      }),
    );
    if (out.UploadId === undefined) throw new Error(`no upload id for ${key}`);
    return out.UploadId;
  }

  /** Uploads part `n` (from 1); resolves to its ETag. */
  async uploadResultPart(
    key: string,
    uploadId: string,
    n: number,
    body: Buffer,
    signal?: AbortSignal,
  ): Promise<string> {
    const out = await this.client.send(
      new UploadPartCommand({
        Bucket: this.opts.resultBucket,
        Key: key,
        UploadId: uploadId,
        PartNumber: n,
        Body: body,
        ContentLength: body.length,
      }),
      signal ? { abortSignal: signal } : {},
    );
    if (out.ETag === undefined) throw new Error(`no ETag for part ${n} of ${key}`);
    return out.ETag;
  }

  /** The parts S3 holds for an upload, by number; throws (NoSuchUpload) when it is gone. */
  async listResultParts(key: string, uploadId: string): Promise<Map<number, string>> {
    const parts = new Map<number, string>();
    let marker: string | undefined;
    for (;;) {
      const out = await this.client.send(
        new ListPartsCommand({
          Bucket: this.opts.resultBucket,
          Key: key,
          UploadId: uploadId,
          ...(marker !== undefined ? { PartNumberMarker: marker } : {}),
        }),
      );
      for (const p of out.Parts ?? []) {
        if (p.PartNumber !== undefined && p.ETag !== undefined) parts.set(p.PartNumber, p.ETag);
      }
      if (!out.IsTruncated || out.NextPartNumberMarker === undefined) return parts;
      marker = out.NextPartNumberMarker;
    }
  }

  async completeResultUpload(key: string, uploadId: string, etags: string[]): Promise<void> {
    await this.client.send(
      new CompleteMultipartUploadCommand({
        Bucket: this.opts.resultBucket,
        Key: key,
        UploadId: uploadId,
        MultipartUpload: { Parts: etags.map((ETag, i) => ({ ETag, PartNumber: i + 1 })) },
      }),
    );
  }

  /** A result object's bytes (a resumed upload is hashed whole once it is complete). */
  async openResult(key: string, signal?: AbortSignal): Promise<Readable> {
    const out = await this.client.send(
      new GetObjectCommand({ Bucket: this.opts.resultBucket, Key: key }),
      signal ? { abortSignal: signal } : {},
    );
    return out.Body as Readable;
  }

  async abortResultUpload(key: string, uploadId: string): Promise<void> {
    await this.client.send(
      new AbortMultipartUploadCommand({
        Bucket: this.opts.resultBucket,
        Key: key,
        UploadId: uploadId,
      }),
    );
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
    // Temporary credentials (a role): the URL dies with them whatever X-Amz-Expires says,
    // so it is made to expire no later, and the caller is told the earlier time. Read
    // before and after signing: a refresh in between must not lend the URL a longer life.
    const before = await this.signer.config.credentials();
    const lifetime = (c: { expiration?: Date | undefined }) =>
      c.expiration === undefined ? Number.POSITIVE_INFINITY : c.expiration.getTime() - now;
    const seconds = Math.max(1, Math.min(expiresIn, Math.floor(lifetime(before) / 1000)));
    const url = await getSignedUrl(
      this.signer,
      new GetObjectCommand({
        Bucket: this.opts.resultBucket,
        Key: key,
        ResponseContentDisposition: contentDisposition(fileName),
        ResponseContentType: "application/zip",
      }),
      { expiresIn: seconds, signingDate: new Date(now) },
    );
    const after = await this.signer.config.credentials();
    const expiresAt = now + Math.min(seconds * 1000, lifetime(before), lifetime(after));
    return { url, expiresAt };
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
    this.reader.destroy();
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
  S3_CONNECT_TIMEOUT_MS?: number;
  S3_FIRST_BYTE_TIMEOUT_MS?: number;
  S3_STALL_MS?: number;
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
    connectTimeoutMs: cfg.S3_CONNECT_TIMEOUT_MS ?? 0,
    firstByteTimeoutMs: cfg.S3_FIRST_BYTE_TIMEOUT_MS ?? 0,
    stallMs: cfg.S3_STALL_MS ?? 0,
  };
}
