// The library's public entry for packages that import it (the app itself imports the
// modules directly). Node programs that need gRPC import "./node.js" instead of client.
export { bearerToken, createDownloadClient, type DownloadClient, type DownloadClientOptions } from "./client.js";
export { isTerminalJob, waitForJob, watchJob, type WatchEvent, type WatchOptions } from "./watch.js";
export * from "../../gen/downloads/v1/download_service_pb.js";
