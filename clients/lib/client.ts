import { type Client, createClient, type Interceptor } from "@connectrpc/connect";
import { createConnectTransport, createGrpcWebTransport } from "@connectrpc/connect-web";
import { DownloadService } from "../../gen/downloads/v1/download_service_pb.js";

// The client factory for browsers (and Node, whose global fetch connect-web uses too).
// Only fetch-based transports live here so a bundler pulls in nothing from Node;
// gRPC (HTTP/2 with trailers, which fetch cannot read) is in node.ts.

export type DownloadClient = Client<typeof DownloadService>;

export interface DownloadClientOptions {
  /** Where the API is, e.g. "http://127.0.0.1:8080" or "https://downloads.example.com". */
  baseUrl: string;
  /** "connect" (default) or "grpc-web". */
  protocol?: "connect" | "grpc-web";
  /** Sent as `authorization: Bearer <token>` on every call; unset or "" sends none. */
  token?: string | undefined;
  /** Protobuf binary instead of JSON on the wire (smaller, not readable in devtools). */
  useBinaryFormat?: boolean;
  /** A fetch of your own (tests, instrumented fetch, a polyfill). */
  fetch?: typeof globalThis.fetch;
}

/** An interceptor that adds the bearer token to every request. */
export function bearerToken(token: string): Interceptor {
  return (next) => (req) => {
    req.header.set("authorization", `Bearer ${token}`);
    return next(req);
  };
}

export function createDownloadClient(opts: DownloadClientOptions): DownloadClient {
  const common = {
    baseUrl: opts.baseUrl,
    interceptors: opts.token !== undefined && opts.token !== "" ? [bearerToken(opts.token)] : [],
    ...(opts.useBinaryFormat !== undefined ? { useBinaryFormat: opts.useBinaryFormat } : {}),
    ...(opts.fetch !== undefined ? { fetch: opts.fetch } : {}),
  };
  const transport =
    opts.protocol === "grpc-web"
      ? createGrpcWebTransport(common)
      : // GetStatus is NO_SIDE_EFFECTS: over GET, a poll is a plain cacheable request
        // that proxies and CDNs can serve, and watchJob's polling fallback uses it.
        createConnectTransport({ ...common, useHttpGet: true });
  return createClient(DownloadService, transport);
}
