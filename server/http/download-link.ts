import type { ConnectNodeAdapterOptions } from "@connectrpc/connect-node";
import { type DownloadLinks, LINK_PATH_PREFIX } from "../../core/download-link.js";
import { hasLiveResult } from "../../core/job-to-proto.js";
import {
  InvalidInputError,
  JobNotFoundError,
  type JobRecord,
  parseJobId,
} from "../../core/jobs.js";
import type { PresignedResult } from "../../core/storage.js";

type Fallback = NonNullable<ConnectNodeAdapterOptions["fallback"]>;
type IncomingMessage = Parameters<Fallback>[0];
type ServerResponse = Parameters<Fallback>[1];

// GET /d/<job id>?exp=..&sig=.. (core/download-link.ts): the stable link of a completed
// job answers 302 to a freshly presigned URL of its ZIP. No bearer token: the signature
// is the credential, scoped to one job. Every refusal says why in plain text.

export interface DownloadLinkDeps {
  links: DownloadLinks | undefined;
  getJob(id: string): Promise<JobRecord>;
  presignResult(key: string, fileName: string): Promise<PresignedResult>;
  onError?: (err: unknown) => void;
}

export interface DownloadLinkRoute {
  /** Answers the request and returns true when its path is a download link's. */
  handle(req: IncomingMessage, res: ServerResponse): boolean;
}

function answer(
  res: ServerResponse,
  status: number,
  message: string,
  headers: Record<string, string> = {},
): void {
  const body = `${message}\n`;
  res.writeHead(status, {
    "content-type": "text/plain; charset=utf-8",
    "content-length": String(Buffer.byteLength(body)),
    // Neither the answer nor the presigned URL it points to may be kept by a cache.
    "cache-control": "no-store",
    "referrer-policy": "no-referrer",
    ...headers,
  });
  res.end(body);
}

export function createDownloadLinkRoute(deps: DownloadLinkDeps): DownloadLinkRoute {
  const serve = async (req: IncomingMessage, res: ServerResponse, url: URL) => {
    if (req.method !== "GET" && req.method !== "HEAD") {
      answer(res, 405, "download links answer GET (or HEAD) only", { allow: "GET, HEAD" });
      return;
    }
    if (deps.links === undefined) {
      answer(
        res,
        404,
        "download links are off on this server: set DOWNLOAD_LINK_SECRET (see docs/configuration.md)",
      );
      return;
    }
    let jobId: string;
    try {
      jobId = parseJobId(decodeURIComponent(url.pathname.slice(LINK_PATH_PREFIX.length)));
    } catch (err) {
      const why = err instanceof InvalidInputError ? err.message : "job id is malformed";
      answer(res, 400, `bad download link: ${why}`);
      return;
    }
    const refused = deps.links.verify(
      jobId,
      url.searchParams.get("exp"),
      url.searchParams.get("sig"),
    );
    if (refused !== undefined) {
      answer(res, refused.kind === "mismatch" ? 403 : 401, refused.message);
      return;
    }
    let rec: JobRecord;
    try {
      rec = await deps.getJob(jobId);
    } catch (err) {
      if (err instanceof JobNotFoundError) {
        answer(res, 404, `job ${jobId} no longer exists, nor its ZIP: initiate the job again`);
        return;
      }
      throw err;
    }
    if (rec.state !== "COMPLETED" || rec.result === undefined) {
      // A signed link names a completed job; its record has changed since (never, today).
      answer(res, 409, `job ${jobId} is ${rec.state.toLowerCase()}, it has no ZIP to download`);
      return;
    }
    if (!hasLiveResult(rec)) {
      answer(res, 410, `the ZIP of job ${jobId} was deleted by retention: initiate the job again`);
      return;
    }
    const download = await deps.presignResult(rec.result.key, rec.result.fileName);
    answer(res, 302, `found: ${download.url}`, { location: download.url });
  };

  return {
    handle(req, res) {
      const path = req.url ?? "";
      if (!path.startsWith(LINK_PATH_PREFIX)) return false;
      const url = new URL(path, "http://link.invalid");
      serve(req, res, url).catch((err: unknown) => {
        deps.onError?.(err);
        if (!res.headersSent) {
          answer(res, 503, "the download link cannot be served right now: try again shortly", {
            "retry-after": "2",
          });
        } else res.destroy();
      });
      return true;
    },
  };
}
