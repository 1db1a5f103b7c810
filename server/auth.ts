import { createHash, timingSafeEqual } from "node:crypto";
import type { IncomingHttpHeaders } from "node:http2";
import {
  Code,
  ConnectError,
  createContextKey,
  type HandlerContext,
  type Interceptor,
} from "@connectrpc/connect";
import type { Logger } from "pino";
import type { AuthToken } from "../core/config.js";

// Bearer tokens -> owners. The configuration holds only SHA-256 digests of the tokens
// (AUTH_TOKENS), so neither the environment nor a leaked config file gives a token
// away. The presented token is hashed and its digest compared with every configured
// one in constant time, so response timing tells nothing about how close a guess was.
//
// An entry may carry the owner's scheduling settings after the hash,
// `owner:sha256:max_priority=5:weight=2` (core/config.ts, ownerSettingsFrom): the
// highest Initiate priority it may ask for and its share of the workers under load.
//
// The same `authorization` header arrives in every protocol we serve: Connect and
// gRPC-Web (HTTP headers) and gRPC (metadata are HTTP/2 headers).

/** Who a request acts for: every job belongs to exactly one owner. */
export type Owner = string;

/** The owner of every call, and so of every job, when AUTH_DISABLED=true. */
export const ANONYMOUS_OWNER: Owner = "anonymous";

export interface Authenticator {
  /** True when AUTH_DISABLED=true: every caller is the one anonymous owner. */
  readonly disabled: boolean;
  /**
   * The owner of the bearer token in `headers` (web Headers, as interceptors see them,
   * or Node's raw header object, as a plain http handler sees them). Throws ConnectError
   * UNAUTHENTICATED when the header is missing, malformed or the token is unknown.
   */
  authenticate(headers: Headers | IncomingHttpHeaders): Owner;
}

const UNAUTHENTICATED_MESSAGE =
  "missing or invalid bearer token: send the header `Authorization: Bearer <token>`";
// Tokens longer than this are not ours; hashing them anyway would let a caller make us
// hash megabytes per request.
const MAX_TOKEN_LENGTH = 512;

function headerValue(headers: Headers | IncomingHttpHeaders): string | undefined {
  if (typeof (headers as Headers).get === "function")
    return (headers as Headers).get("authorization") ?? undefined;
  const raw = (headers as IncomingHttpHeaders).authorization;
  return Array.isArray(raw) ? raw[0] : raw;
}

/** The token of an `Authorization: Bearer <token>` header value, or undefined. */
export function bearerToken(value: string | undefined): string | undefined {
  if (value === undefined) return undefined;
  const m = /^\s*bearer\s+(\S+)\s*$/i.exec(value);
  const token = m?.[1];
  return token !== undefined && token.length <= MAX_TOKEN_LENGTH ? token : undefined;
}

/** The digest AUTH_TOKENS holds for a token: `printf %s "$TOKEN" | sha256sum`. */
export function tokenDigest(token: string): Buffer {
  return createHash("sha256").update(token, "utf8").digest();
}

export function createAuthenticator(opts: {
  tokens: readonly AuthToken[];
  disabled: boolean;
  log?: Logger;
}): Authenticator {
  if (opts.disabled) {
    opts.log?.warn(
      "AUTH_DISABLED=true: every caller is the anonymous owner and can read every job",
    );
    return { disabled: true, authenticate: () => ANONYMOUS_OWNER };
  }
  if (opts.tokens.length === 0) {
    throw new Error(
      "AUTH_TOKENS is empty: configure at least one owner:sha256 pair, or set AUTH_DISABLED=true",
    );
  }
  const entries = opts.tokens.map((t) => ({
    owner: t.owner,
    digest: Buffer.from(t.sha256, "hex"),
  }));
  return {
    disabled: false,
    authenticate(headers) {
      const token = bearerToken(headerValue(headers));
      if (token === undefined)
        throw new ConnectError(UNAUTHENTICATED_MESSAGE, Code.Unauthenticated);
      const digest = tokenDigest(token);
      let owner: Owner | undefined;
      // Compare with every entry, matched or not, so the time taken does not depend on
      // which entry (if any) matched.
      for (const e of entries) {
        if (timingSafeEqual(digest, e.digest) && owner === undefined) owner = e.owner;
      }
      if (owner === undefined)
        throw new ConnectError(UNAUTHENTICATED_MESSAGE, Code.Unauthenticated);
      return owner;
    },
  };
}

/** Where the auth interceptor leaves the owner for the handlers. */
export const ownerKey = createContextKey<Owner | undefined>(undefined, {
  description: "authenticated owner",
});

/** The owner the auth interceptor found; a handler reached without it is a wiring bug. */
export function ownerOf(ctx: HandlerContext): Owner {
  const owner = ctx.values.get(ownerKey);
  if (owner === undefined)
    throw new Error("no owner in the handler context: the auth interceptor did not run");
  return owner;
}

/**
 * Authenticates every Connect, gRPC and gRPC-Web call before its handler runs; the
 * handlers read the owner with ownerOf(ctx). Place it inside rpcInterceptor, so that
 * the RPC log line records UNAUTHENTICATED like any other code.
 */
export function authInterceptor(
  auth: Authenticator,
  protects: (serviceTypeName: string) => boolean = () => true,
): Interceptor {
  return (next) => async (req) => {
    if (protects(req.service.typeName))
      req.contextValues.set(ownerKey, auth.authenticate(req.header));
    return next(req);
  };
}
