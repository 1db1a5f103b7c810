import type { ConnectRouter } from "@connectrpc/connect";
import { DownloadService } from "../gen/downloads/v1/download_service_pb.js";
import { Health } from "../gen/grpc/health/v1/health_pb.js";
import { createDownloadService, type DownloadServiceDeps } from "./download-service.js";
import { createHealthService, type HealthServiceOptions } from "./health.js";
import { addReflection } from "./reflection.js";

export function routes(
  deps: DownloadServiceDeps,
  extra: { health?: Omit<HealthServiceOptions, "services"> } = {},
): (router: ConnectRouter) => void {
  return (router) => {
    router.service(DownloadService, createDownloadService(deps));
    if (extra.health !== undefined) {
      const services = () => [...new Set(router.handlers.map((h) => h.service.typeName))];
      router.service(Health, createHealthService({ ...extra.health, services }));
    }
    // Last, so that reflection lists everything above and itself.
    addReflection(router);
  };
}
