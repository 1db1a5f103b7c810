import { createHmac, createSecretKey, type KeyObject, timingSafeEqual } from "node:crypto";
import type { JobRecord } from "./jobs.js";

// Stable download links: `/d/<job id>?exp=<unix seconds>&sig=<HMAC>`. The server signs
// the job id and the time the ZIP is purged with DOWNLOAD_LINK_SECRET; whoever holds the
// link may fetch that one job's ZIP (a capability, no bearer token), and each GET is
// answered with a freshly presigned URL (server/http/download-link.ts). The link is a
// pure function of the record, so it never changes while the ZIP lives, and it dies with
// the ZIP (exp) or the job record, whichever goes first.

/** Why a link was refused: "missing"/"expired" ask for a link, "mismatch" forbids. */
export type LinkRefusal =
  | { kind: "missing"; message: string }
  | { kind: "expired"; message: string }
  | { kind: "mismatch"; message: string };

export const LINK_PATH_PREFIX = "/d/";

export class DownloadLinks {
  private readonly key: KeyObject;
  private readonly base: string;

  /** `publicUrl` (PUBLIC_URL) makes links absolute; without it they start with /d/. */
  constructor(secret: string, publicUrl?: string) {
    // A KeyObject: createHmac with a raw string imports the key on every call.
    this.key = createSecretKey(Buffer.from(secret, "utf8"));
    this.base = publicUrl === undefined ? "" : publicUrl.replace(/\/+$/, "");
  }

  private mac(jobId: string, exp: number): Buffer {
    return createHmac("sha256", this.key).update(`download-link v1\n${jobId}\n${exp}`).digest();
  }

  /** The link of a completed job whose ZIP still lives; undefined for any other job. */
  linkFor(rec: JobRecord): string | undefined {
    const r = rec.result;
    if (rec.state !== "COMPLETED" || r === undefined || r.expired === true) return undefined;
    // Records from before purge times were kept: the link lives as long as the record.
    const exp = Math.floor((r.expiresAt ?? rec.updatedAt + 7 * 24 * 3600 * 1000) / 1000);
    return this.link(rec.id, exp);
  }

  link(jobId: string, exp: number): string {
    const sig = this.mac(jobId, exp).toString("base64url");
    return `${this.base}${LINK_PATH_PREFIX}${jobId}?exp=${exp}&sig=${sig}`;
  }

  /** Checks a link's parameters for `jobId`; undefined when the link is good now. */
  verify(
    jobId: string,
    exp: string | null,
    sig: string | null,
    now = Date.now(),
  ): LinkRefusal | undefined {
    if (sig === null || sig === "" || exp === null || exp === "") {
      return {
        kind: "missing",
        message:
          "this download link has no signature (exp and sig are required): use link_url from the job exactly as given",
      };
    }
    const expSeconds = /^[0-9]{1,12}$/.test(exp) ? Number(exp) : Number.NaN;
    const given = Buffer.from(sig, "base64url");
    const want = Number.isNaN(expSeconds) ? undefined : this.mac(jobId, expSeconds);
    if (want === undefined || given.length !== want.length || !timingSafeEqual(given, want)) {
      return {
        kind: "mismatch",
        message:
          "the signature of this download link does not match: the link was altered, or signed with another DOWNLOAD_LINK_SECRET; read the job again for its link_url",
      };
    }
    if (expSeconds * 1000 <= now) {
      return {
        kind: "expired",
        message: `this download link expired at ${new Date(expSeconds * 1000).toISOString()} (the ZIP was due for deletion then): initiate the job again`,
      };
    }
    return undefined;
  }
}
