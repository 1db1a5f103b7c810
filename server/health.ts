import { setTimeout as sleep } from "node:timers/promises";
import { Code, ConnectError, type ServiceImpl } from "@connectrpc/connect";
import type { Readiness } from "../core/health.js";
import {
  type Health,
  HealthCheckResponse_ServingStatus as Status,
} from "../gen/grpc/health/v1/health_pb.js";

// The standard gRPC health service (grpc.health.v1.Health), for load balancers and
// orchestrators that probe over gRPC (Envoy's grpc_health_check, Kubernetes' grpc
// probe, grpc-health-probe). Its answer is the same readiness as /readyz.

export interface HealthServiceOptions {
  readiness: Readiness;
  /** Aborted when the server starts to stop: everything reports NOT_SERVING from then on. */
  stopping: AbortSignal;
  /** Full names of the services this server serves (read on each call). */
  services(): string[];
  /** How often a Watch stream re-checks readiness; default 5 s. */
  watchIntervalMs?: number;
}

export function createHealthService(opts: HealthServiceOptions): ServiceImpl<typeof Health> {
  const known = (service: string) => service === "" || opts.services().includes(service);
  const status = async (): Promise<Status> => {
    if (opts.stopping.aborted) return Status.NOT_SERVING;
    const report = await opts.readiness.run();
    return report.ready && !opts.stopping.aborted ? Status.SERVING : Status.NOT_SERVING;
  };
  const intervalMs = opts.watchIntervalMs ?? 5_000;

  return {
    async check(req) {
      // The protocol's answer for a name the server does not serve.
      if (!known(req.service))
        throw new ConnectError(`unknown service ${req.service}`, Code.NotFound);
      return { status: await status() };
    },

    // Sends the status at once and then on every change; the stream stays open until
    // the client goes away or the server stops (after a last NOT_SERVING).
    async *watch(req, ctx) {
      if (!known(req.service)) {
        yield { status: Status.SERVICE_UNKNOWN };
        await sleep(2 ** 31 - 1, undefined, {
          signal: AbortSignal.any([ctx.signal, opts.stopping]),
        }).catch(() => undefined);
        return;
      }
      const until = AbortSignal.any([ctx.signal, opts.stopping]);
      let last: Status | undefined;
      while (!ctx.signal.aborted) {
        const now = await status();
        if (now !== last) {
          yield { status: now };
          last = now;
        }
        if (opts.stopping.aborted) return;
        await sleep(intervalMs, undefined, { signal: until }).catch(() => undefined);
      }
    },
  };
}
