import { createClient } from "@connectrpc/connect";
import {
  createConnectTransport,
  createGrpcTransport,
  createGrpcWebTransport,
} from "@connectrpc/connect-node";
import { DownloadService } from "../../gen/downloads/v1/download_service_pb.js";
import { bearerToken, type DownloadClient, type DownloadClientOptions } from "./client.js";

// The same factory for Node programs, on Node's own http/http2 stack, which adds gRPC.

export interface NodeDownloadClientOptions
  extends Omit<DownloadClientOptions, "protocol" | "fetch"> {
  /** "connect" (default), "grpc-web" or "grpc" (always HTTP/2; cleartext h2c for http://). */
  protocol?: "connect" | "grpc-web" | "grpc";
  /** HTTP version for Connect and gRPC-Web; "1.1" by default, as most proxies speak to clients. */
  httpVersion?: "1.1" | "2";
}

export function createDownloadClient(opts: NodeDownloadClientOptions): DownloadClient {
  const common = {
    baseUrl: opts.baseUrl,
    interceptors: opts.token !== undefined && opts.token !== "" ? [bearerToken(opts.token)] : [],
    ...(opts.useBinaryFormat !== undefined ? { useBinaryFormat: opts.useBinaryFormat } : {}),
  };
  const httpVersion = opts.httpVersion ?? "1.1";
  switch (opts.protocol ?? "connect") {
    case "grpc":
      return createClient(DownloadService, createGrpcTransport(common));
    case "grpc-web":
      return createClient(DownloadService, createGrpcWebTransport({ ...common, httpVersion }));
    case "connect":
      return createClient(
        DownloadService,
        createConnectTransport({ ...common, httpVersion, useHttpGet: true }),
      );
  }
}
