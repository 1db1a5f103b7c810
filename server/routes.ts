import type { ConnectRouter } from "@connectrpc/connect";
import { DownloadService } from "../gen/downloads/v1/download_service_pb.js";
import { createDownloadService, type DownloadServiceDeps } from "./download-service.js";

export function routes(deps: DownloadServiceDeps): (router: ConnectRouter) => void {
  return (router) => {
    router.service(DownloadService, createDownloadService(deps));
  };
}
