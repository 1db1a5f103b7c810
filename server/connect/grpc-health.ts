import { setTimeout as sleep } from "node:timers/promises";
import {
  Code,
  ConnectError,
  createContextKey,
  type HandlerContext,
  type ServiceImpl,
} from "@connectrpc/connect";
import type { Readiness } from "../../core/health.js";
import {
  type Health,
  HealthCheckResponse_ServingStatus as Status,
} from "../../gen/grpc/health/v1/health_pb.js";

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
  /**
   * Watch needs no token and would never end: without caps, one client holds a stream
   * (and its memory) per call for ever. Defaults: 1000 in the process, 8 per
   * connection, 5 min each.
   */
  watchLimits?: HealthWatchLimits;
}

export interface HealthWatchLimits {
  /** Open Watch streams in the process; more are refused with RESOURCE_EXHAUSTED. */
  maxStreams: number;
  /** Open Watch streams on one connection (see connectionKey). */
  maxPerConnection: number;
  /** A Watch stream ends (OK) after this; gRPC health clients then watch again. */
  maxStreamMs: number;
}

/**
 * The connection a call came on (the HTTP/1.1 socket or the HTTP/2 session), set by the
 * server's contextValues; calls without one count against the process cap only.
 */
export const connectionKey = createContextKey<object | undefined>(undefined, {
  description: "the call's connection",
});

/** For connectNodeAdapter's contextValues: what connectionKey wants from a request. */
export function connectionOf(req: {
  socket?: object | null;
  stream?: { session?: object | undefined };
}): object | undefined {
  return req.stream?.session ?? req.socket ?? undefined;
}

export function createHealthService(opts: HealthServiceOptions): ServiceImpl<typeof Health> {
  const known = (service: string) => service === "" || opts.services().includes(service);
  const status = async (): Promise<Status> => {
    if (opts.stopping.aborted) return Status.NOT_SERVING;
    const report = await opts.readiness.run();
    return report.ready && !opts.stopping.aborted ? Status.SERVING : Status.NOT_SERVING;
  };
  const intervalMs = opts.watchIntervalMs ?? 5_000;
  const limits = opts.watchLimits ?? {
    maxStreams: 1000,
    maxPerConnection: 8,
    maxStreamMs: 300_000,
  };
  let watching = 0;
  const perConnection = new WeakMap<object, number>();

  /** Takes a Watch slot or refuses the call; the returned function gives it back. */
  const admit = (ctx: HandlerContext): (() => void) => {
    const conn = ctx.values.get(connectionKey);
    const onConn = conn === undefined ? 0 : (perConnection.get(conn) ?? 0);
    if (watching >= limits.maxStreams)
      throw new ConnectError("too many health watches on this server", Code.ResourceExhausted);
    if (conn !== undefined && onConn >= limits.maxPerConnection)
      throw new ConnectError(
        `at most ${limits.maxPerConnection} health watches per connection`,
        Code.ResourceExhausted,
      );
    watching++;
    if (conn !== undefined) perConnection.set(conn, onConn + 1);
    return () => {
      watching--;
      if (conn === undefined) return;
      const left = (perConnection.get(conn) ?? 1) - 1;
      if (left === 0) perConnection.delete(conn);
      else perConnection.set(conn, left);
    };
  };

  return {
    async check(req) {
      // The protocol's answer for a name the server does not serve.
      if (!known(req.service))
        throw new ConnectError(`unknown service ${req.service}`, Code.NotFound);
      return { status: await status() };
    },

    // Sends the status at once and then on every change; the stream stays open until
    // the client goes away, the server stops (after a last NOT_SERVING) or its
    // lifetime is over.
    async *watch(req, ctx) {
      const release = admit(ctx);
      const lifetime = AbortSignal.timeout(limits.maxStreamMs);
      const until = AbortSignal.any([ctx.signal, opts.stopping, lifetime]);
      try {
        if (!known(req.service)) {
          yield { status: Status.SERVICE_UNKNOWN };
          await sleep(2 ** 31 - 1, undefined, { signal: until }).catch(() => undefined);
          return;
        }
        let last: Status | undefined;
        while (!ctx.signal.aborted && !lifetime.aborted) {
          const now = await status();
          if (now !== last) {
            yield { status: now };
            last = now;
          }
          if (opts.stopping.aborted) return;
          await sleep(intervalMs, undefined, { signal: until }).catch(() => undefined);
        }
      } finally {
        release();
      }
    },
  };
}
