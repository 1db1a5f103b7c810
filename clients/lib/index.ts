// The library's public entry for packages that import it (the app itself imports the
// modules directly). Node programs that need gRPC import "./node.js" instead of client.

export * from "../../gen/downloads/v1/download_service_pb.js";
export {
  bearerToken,
  createDownloadClient,
  type DownloadClient,
  type DownloadClientOptions,
} from "./client.js";
export {
  type JobsFilter,
  type JobsPage,
  type JobsPageOptions,
  listAllJobs,
  listJobsPage,
} from "./jobs.js";
export {
  isTerminalJob,
  type WatchEvent,
  type WatchOptions,
  waitForJob,
  watchJob,
} from "./watch.js";
