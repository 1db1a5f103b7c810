import type http2 from "node:http2";
import { envelope } from "./trust.js";

// The malformed-request corpus (test/fault-malformed.test.ts) and the way to send one
// request and keep everything a client sees: status, headers, trailers, body. Seeded,
// so the lean-vs-connect-node differential test (test/lean-differential.test.ts) can
// send the very same requests to two servers.

export const SERVICE = "/downloads.v1.DownloadService";
const METHODS = ["Initiate", "GetStatus", "Cancel", "WatchJob"];

/** mulberry32: a small seeded PRNG, so a failing request can be sent again. */
export function seeded(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** One request as sent: over fetch (HTTP/1.1) or node:http2 (h2c). */
export interface RawRequest {
  kind: string;
  via: "fetch" | "h2";
  method: string;
  path: string;
  headers: Record<string, string>;
  body?: Buffer;
}

export interface RawResponse {
  status: number;
  headers: Record<string, string>;
  trailers: Record<string, string>;
  /** Decoded: fetch undoes Content-Encoding itself. */
  body: Buffer;
}

/** Random bytes from the seeded generator. */
function bytes(rand: () => number, n: number): Buffer {
  const out = Buffer.alloc(n);
  for (let i = 0; i < n; i++) out[i] = Math.floor(rand() * 256);
  return out;
}

/** One malformed request of a random kind; `token` is a valid bearer token. */
export function malformedRequest(rand: () => number, token: string): RawRequest {
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rand() * xs.length)] as T;
  const int = (n: number) => Math.floor(rand() * n);
  const badAuthorization = (): string | undefined =>
    pick([
      undefined,
      "",
      "Bearer",
      "Bearer ",
      `Bearer ${bytes(rand, int(40) + 1).toString("base64")}`,
      `bearer ${"x".repeat(int(4000) + 513)}`,
      `Basic ${bytes(rand, 12).toString("base64")}`,
      bytes(rand, 20).toString("hex"),
      `Bearer ${token.slice(0, -1)}`,
    ]);
  /** JSON that is well-formed but wrong for the method, or not JSON at all. */
  const badJson = (method: string): string => {
    const long = (n: number) => "z".repeat(n);
    return pick([
      () => bytes(rand, int(300) + 1).toString("latin1"),
      () => `{"fileIds":[1,2`,
      () => JSON.stringify({ fileIds: "1,2" }),
      () => JSON.stringify({ fileIds: [1.5, 2] }),
      () => JSON.stringify({ fileIds: [null] }),
      () => JSON.stringify({ fileIds: [-int(100) - 1] }),
      () => JSON.stringify({ fileIds: [2 ** 40] }),
      () => JSON.stringify({ fileIds: [] }),
      () => JSON.stringify({ fileIds: [7, 7] }),
      () => JSON.stringify({ fileIds: Array.from({ length: 101 + int(5000) }, (_, i) => i + 1) }),
      () => JSON.stringify({ fileIds: [1], requestId: long(129 + int(3000)) }),
      () => JSON.stringify({ fileIds: [1], callbackUrl: `http://${long(3000)}` }),
      () => JSON.stringify({ fileIds: [1], callbackUrl: "gopher://x" }),
      () => JSON.stringify({ jobId: 12345 }),
      () => JSON.stringify({ jobId: { nested: [1, 2, 3] } }),
      () => JSON.stringify({ jobId: long(int(60_000) + 100) }),
      () => JSON.stringify({ jobId: "../../etc/passwd" }),
      () => JSON.stringify({ jobId: "00000000-0000-0000-0000-000000000000", afterVersion: "x" }),
      () => JSON.stringify({ unknownField: true }),
      () => JSON.stringify([1, 2, 3]),
      () => JSON.stringify("string"),
      () => "null",
      () => `{"a":${"[".repeat(5000)}${"]".repeat(5000)}}`,
      () =>
        method === "Initiate" ? JSON.stringify({ fileIds: [0] }) : JSON.stringify({ jobId: "" }),
    ])();
  };
  const withAuth = (auth: string | undefined, extra: Record<string, string>) =>
    auth === undefined ? extra : { ...extra, authorization: auth };

  const method = pick(METHODS);
  const path = `${SERVICE}/${method}`;
  // Half carry a valid token, so that validation past auth is exercised too.
  const auth = rand() < 0.5 ? `Bearer ${token}` : badAuthorization();
  const unaryMethod = pick(["Initiate", "GetStatus", "Cancel"]);
  const kinds: (() => RawRequest)[] = [
    () => ({
      kind: "connect-json",
      via: "fetch",
      method: "POST",
      path: `${SERVICE}/${unaryMethod}`,
      headers: withAuth(auth, { "content-type": "application/json" }),
      body: Buffer.from(badJson(unaryMethod)),
    }),
    // Random binary could decode as a valid Initiate: only with a bad token there.
    () => ({
      kind: "connect-proto",
      via: "fetch",
      method: "POST",
      path: `${SERVICE}/${unaryMethod}`,
      headers: withAuth(unaryMethod === "Initiate" ? badAuthorization() : auth, {
        "content-type": "application/proto",
      }),
      body: bytes(rand, int(200)),
    }),
    () => {
      const q = pick([
        () => `encoding=json&message=${encodeURIComponent(badJson("GetStatus"))}`,
        () => `encoding=proto&base64=1&message=${bytes(rand, 30).toString("base64url")}`,
        () => `encoding=xml&message=x`,
        () => `connect=v9&encoding=json&message=%7B%7D`,
        () => `message=${"%".repeat(int(50) + 1)}`,
        () => "",
      ])();
      return {
        kind: "connect-get",
        via: "fetch",
        method: "GET",
        path: `${SERVICE}/GetStatus?${q}`,
        headers: withAuth(auth, {}),
      };
    },
    () => ({
      kind: "connect-stream",
      via: "fetch",
      method: "POST",
      path: `${SERVICE}/WatchJob`,
      headers: withAuth(auth, {
        "content-type": pick(["application/connect+json", "application/connect+proto"]),
      }),
      body: pick([
        () => envelope(0, badJson("WatchJob")),
        () => bytes(rand, int(100)),
        () => Buffer.concat([envelope(0, "{}"), envelope(0, "{}")]),
        () => Buffer.from([0, 0xff, 0xff, 0xff, 0xff, 1, 2]),
        () => envelope(1, bytes(rand, 20)),
      ])(),
    }),
    () => ({
      kind: "grpc-web",
      via: "fetch",
      method: "POST",
      path,
      headers: withAuth(method === "Initiate" ? badAuthorization() : auth, {
        "content-type": "application/grpc-web+proto",
        "x-grpc-web": "1",
      }),
      body: pick([() => bytes(rand, int(100)), () => Buffer.from([0, 0, 0, 0, 50, 1])])(),
    }),
    // Random binary could decode as a valid Initiate: only with a bad token there.
    () => ({
      kind: "grpc-h2c",
      via: "h2",
      method: "POST",
      path,
      headers: withAuth(method === "Initiate" ? badAuthorization() : auth, {
        "content-type": "application/grpc",
        te: "trailers",
      }),
      body: pick([
        () => bytes(rand, int(100)),
        () => Buffer.from([0, 0, 0, 1, 0]),
        () => Buffer.concat([Buffer.from([0, 0, 0, 0, 4]), bytes(rand, 4)]),
        () => Buffer.from([1, 0, 0, 0, 3, 1, 2, 3]),
      ])(),
    }),
    () => ({
      kind: "connect-h2c",
      via: "h2",
      method: "POST",
      path: `${SERVICE}/${unaryMethod}`,
      headers: withAuth(auth, { "content-type": "application/json" }),
      body: Buffer.from(badJson(unaryMethod), "latin1"),
    }),
    () => ({
      kind: "wrong-route",
      via: "fetch",
      method: pick(["POST", "PUT", "DELETE", "PATCH"]),
      path: pick([
        `${SERVICE}/Delete`,
        "/downloads.v2.DownloadService/Initiate",
        `${SERVICE}/`,
        "/%00",
      ]),
      headers: { "content-type": "application/json" },
      body: Buffer.from("{}"),
    }),
    () => ({
      kind: "wrong-content-type",
      via: "fetch",
      method: "POST",
      path,
      headers: withAuth(auth, {
        "content-type": pick([
          "text/plain",
          "application/xml",
          "multipart/form-data",
          "application/json; charset=latin1",
        ]),
      }),
      body: Buffer.from("{}"),
    }),
  ];
  return pick(kinds)();
}

/** Sends a request to `base` (fetch) or over `session` (h2), and keeps what came back. */
export async function send(
  base: string,
  session: http2.ClientHttp2Session,
  req: RawRequest,
): Promise<RawResponse> {
  if (req.via === "fetch") {
    const res = await fetch(`${base}${req.path}`, {
      method: req.method,
      headers: req.headers,
      ...(req.body !== undefined ? { body: new Uint8Array(req.body) } : {}),
    });
    const headers: Record<string, string> = {};
    res.headers.forEach((value, name) => {
      headers[name] = value;
    });
    return {
      status: res.status,
      headers,
      trailers: {},
      body: Buffer.from(await res.arrayBuffer()),
    };
  }
  return new Promise((ok, fail) => {
    const stream = session.request({ ":method": req.method, ":path": req.path, ...req.headers });
    const out: RawResponse = { status: 0, headers: {}, trailers: {}, body: Buffer.alloc(0) };
    const chunks: Buffer[] = [];
    const flat = (h: http2.IncomingHttpHeaders) =>
      Object.fromEntries(
        Object.entries(h)
          .filter(([name]) => !name.startsWith(":"))
          .map(([name, value]) => [name, Array.isArray(value) ? value.join(", ") : String(value)]),
      );
    stream.on("response", (h) => {
      out.status = Number(h[":status"]);
      out.headers = flat(h);
    });
    stream.on("trailers", (t) => {
      out.trailers = flat(t);
    });
    stream.on("data", (d: Buffer) => chunks.push(d));
    stream.on("end", () => ok({ ...out, body: Buffer.concat(chunks) }));
    stream.on("error", fail);
    stream.end(req.body);
  });
}
