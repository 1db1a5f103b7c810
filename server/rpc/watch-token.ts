import { createHmac, createSecretKey, type KeyObject, timingSafeEqual } from "node:crypto";
import type { Duration } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import { InvalidInputError, parseJobId } from "../../core/jobs.js";

// Scoped watch tokens: a capability for one job, made by its owner (CreateWatchToken)
// and signed by the server, that lets a page on another origin follow the job's events
// and read its download link without the owner's bearer token. The token is
// `<job id>.<expiry, unix seconds>.<HMAC-SHA256, base64url>`; the HMAC also covers the
// owner, so a token stops working if the id ever named another owner's job, and the
// owner is never written in it. Nothing is stored: a token lives until its expiry.

const DEFAULT_TTL_MS = 10 * 60_000;
const MAX_TTL_MS = 60 * 60_000;

export interface WatchGrant {
  jobId: string;
  /** When the token stops working, ms since the epoch. */
  expiresAt: number;
}

/** Why a presented token was refused, as the caller is told (and which code). */
function refused(message: string, code = Code.Unauthenticated): ConnectError {
  return new ConnectError(message, code);
}

export class WatchTokens {
  private readonly key: KeyObject | undefined;

  constructor(secret: string | undefined) {
    this.key = secret === undefined ? undefined : createSecretKey(Buffer.from(secret, "utf8"));
  }

  private sign(jobId: string, owner: string, expSeconds: number): string {
    if (this.key === undefined) throw new Error("watch tokens are off");
    return createHmac("sha256", this.key)
      .update(`download-jobs watch token\n${jobId}\n${owner}\n${expSeconds}`)
      .digest("base64url");
  }

  /** The token for `owner`'s job; `ttl` unset is 10 minutes. */
  create(
    jobId: string,
    owner: string,
    ttl: Duration | undefined,
    now = Date.now(),
  ): { token: string; expiresAt: number } {
    if (this.key === undefined)
      throw new ConnectError(
        "scoped watch tokens are off on this server: set WATCH_TOKEN_SECRET (the same on every API instance)",
        Code.FailedPrecondition,
      );
    const ttlMs =
      ttl === undefined
        ? DEFAULT_TTL_MS
        : Number(ttl.seconds) * 1000 + Math.floor(ttl.nanos / 1_000_000);
    if (ttlMs <= 0 || ttlMs > MAX_TTL_MS)
      throw new InvalidInputError(
        `ttl must be above 0 and at most ${MAX_TTL_MS / 1000} s (got ${ttlMs / 1000} s); leave it unset for ${DEFAULT_TTL_MS / 1000} s`,
      );
    const expSeconds = Math.ceil((now + ttlMs) / 1000);
    return {
      token: `${jobId}.${expSeconds}.${this.sign(jobId, owner, expSeconds)}`,
      expiresAt: expSeconds * 1000,
    };
  }

  /**
   * What a presented token grants for `jobId`, before its owner is known: its form and
   * scope. Malformed or expired is UNAUTHENTICATED, another job's PERMISSION_DENIED,
   * each with a message saying which. The signature is checked by `verify` once the
   * job's owner has been read.
   */
  inspect(token: string, jobId: string, now = Date.now()): WatchGrant & { sig: string } {
    if (this.key === undefined)
      throw refused("scoped watch tokens are off on this server (WATCH_TOKEN_SECRET is unset)");
    const parts = token.split(".");
    const [id, exp, sig] = parts;
    if (
      parts.length !== 3 ||
      id === undefined ||
      sig === undefined ||
      !/^\d{1,12}$/.test(exp ?? "")
    )
      throw refused("watch token is malformed: expected <job id>.<expiry>.<signature>");
    try {
      parseJobId(id);
    } catch {
      throw refused("watch token is malformed: it names no valid job id");
    }
    if (id !== jobId)
      throw refused(
        `watch token is for job ${id}, not ${jobId}: ask the job's owner for a token for this job`,
        Code.PermissionDenied,
      );
    const expiresAt = Number(exp) * 1000;
    if (expiresAt <= now)
      throw refused(
        `watch token expired at ${new Date(expiresAt).toISOString()}: ask the job's owner for a new one`,
      );
    return { jobId: id, expiresAt, sig };
  }

  /** Whether the inspected token was signed by this server for `owner`'s job. */
  verify(grant: WatchGrant & { sig: string }, owner: string): void {
    const want = Buffer.from(this.sign(grant.jobId, owner, grant.expiresAt / 1000));
    const got = Buffer.from(grant.sig);
    if (got.length !== want.length || !timingSafeEqual(got, want))
      throw refused(
        "watch token signature is not valid: it was altered or made by a server with another WATCH_TOKEN_SECRET",
      );
  }
}
