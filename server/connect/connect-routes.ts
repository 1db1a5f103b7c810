import type { ConnectRouter, HandlerContext } from "@connectrpc/connect";
import { Health } from "../../gen/grpc/health/v1/health_pb.js";
import { ownerOf } from "../auth.js";
import type { RpcCall, RpcRow, StreamRow, UnaryRow } from "../rpc/download-rpcs.js";
import { STREAM_HEADERS } from "../wire/stream-headers.js";
import { createHealthService, type HealthServiceOptions } from "./grpc-health.js";
import { addReflection } from "./reflection.js";

// The first way in: connect-node serves every row of the RPC table
// (rpc/download-rpcs.ts) over every protocol it speaks, and also the gRPC health and
// reflection services. The rows parse nothing and know no Redis, BullMQ or S3; domain
// errors propagate, and the interceptor (rpc-interceptor.ts) turns them into codes.

function callOf(ctx: HandlerContext): RpcCall {
  return {
    owner: ownerOf(ctx),
    header: (name) => ctx.requestHeader.get(name),
    signal: ctx.signal,
    get: ctx.requestMethod === "GET",
    deadline: deadlineOf(ctx.timeoutMs()),
  };
}

function deadlineOf(timeoutMs: number | undefined): number | undefined {
  return timeoutMs === undefined ? undefined : Date.now() + timeoutMs;
}

export function connectRoutes(
  rows: readonly RpcRow[],
  extra: { health?: Omit<HealthServiceOptions, "services"> } = {},
): (router: ConnectRouter) => void {
  return (router) => {
    for (const row of rows) {
      if (row.method.methodKind === "unary") {
        const run = (row as UnaryRow).run;
        router.rpc(row.method, async (req, ctx) => {
          const answer = await run(callOf(ctx), req);
          for (const [name, value] of Object.entries(answer.header ?? {}))
            ctx.responseHeader.set(name, value);
          return answer.reply.message();
        });
      } else {
        const run = (row as StreamRow).run;
        router.rpc(row.method, async function* (req, ctx) {
          for (const [name, value] of Object.entries(STREAM_HEADERS))
            ctx.responseHeader.set(name, value);
          for await (const reply of run(callOf(ctx), req)) yield reply.message();
        });
      }
    }
    if (extra.health !== undefined) {
      const services = () => [...new Set(router.handlers.map((h) => h.service.typeName))];
      router.service(Health, createHealthService({ ...extra.health, services }));
    }
    // Last, so that reflection lists everything above and itself.
    addReflection(router);
  };
}
