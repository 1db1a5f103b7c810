import { createHash } from "node:crypto";
import type { Interceptor } from "@connectrpc/connect";

// Small tools of the trust and fault tests: tokens for several owners, and the Connect
// streaming envelope for callers that speak the protocol by hand (like curl would).

/** AUTH_TOKENS for `{ owner: token }`, as an operator writes it: hashes only. */
export function authTokens(tokens: Record<string, string>): string {
  return Object.entries(tokens)
    .map(([owner, token]) => `${owner}:${createHash("sha256").update(token).digest("hex")}`)
    .join(",");
}

/** Sends `Authorization: Bearer <token>` on every call of a transport. */
export function bearer(token: string): Interceptor {
  return (next) => (req) => {
    req.header.set("authorization", `Bearer ${token}`);
    return next(req);
  };
}

/** One Connect envelope: flags byte, big-endian length, payload. */
export function envelope(flags: number, payload: string | Uint8Array): Buffer {
  const data = typeof payload === "string" ? Buffer.from(payload) : Buffer.from(payload);
  const head = Buffer.alloc(5);
  head[0] = flags;
  head.writeUInt32BE(data.length, 1);
  return Buffer.concat([head, data]);
}

/** The JSON messages of a Connect stream body, and its end-of-stream object. */
export function decodeConnectStream(body: Buffer): {
  messages: Record<string, unknown>[];
  end: { error?: { code: string; message?: string } } | undefined;
} {
  const messages: Record<string, unknown>[] = [];
  let end: { error?: { code: string } } | undefined;
  for (let at = 0; at + 5 <= body.length; ) {
    const length = body.readUInt32BE(at + 1);
    const data = JSON.parse(body.subarray(at + 5, at + 5 + length).toString() || "{}") as Record<
      string,
      unknown
    >;
    if ((body[at] as number) & 2) end = data as typeof end;
    else messages.push(data);
    at += 5 + length;
  }
  return { messages, end };
}
