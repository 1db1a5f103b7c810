import { timingSafeEqual } from "node:crypto";
import type { IncomingMessage, ServerResponse } from "node:http";
import { createBullBoard } from "@bull-board/api";
import { BullMQAdapter } from "@bull-board/api/bullMQAdapter";
import { HonoAdapter } from "@bull-board/hono";
import type { ConnectNodeAdapterOptions } from "@connectrpc/connect-node";
import { getRequestListener } from "@hono/node-server";
import { serveStatic } from "@hono/node-server/serve-static";
import { Queue } from "bullmq";
import { Hono } from "hono";
import { MAINTENANCE_QUEUE_NAME, WEBHOOK_QUEUE_NAME } from "../../core/queue.js";
import type { RedisClient } from "../../core/redis.js";
import { bearerToken, tokenDigest } from "../auth.js";

// Bull Board, read-only, at /admin/queues on the API port, for operators: what is
// waiting, running, failed and why. It is off unless ADMIN_TOKEN_SHA256 is set, and
// every request to it must carry the admin token, as a bearer token (scripts) or as
// the basic-auth password (a browser asks for it). Only GET is let through: the board
// runs in read-only mode too, so neither a click nor a crafted request retries, cleans,
// pauses or removes anything.

export const ADMIN_BASE_PATH = "/admin/queues";

type Fallback = NonNullable<ConnectNodeAdapterOptions["fallback"]>;
type NodeRequest = Parameters<Fallback>[0];
type NodeResponse = Parameters<Fallback>[1];

export interface AdminBoardOptions {
  /** Lower-case hex SHA-256 of the admin token (ADMIN_TOKEN_SHA256). */
  tokenSha256: string;
  /** The API's bundle queue; the board reads the other queues on the same connection. */
  bundles: Queue;
  connection: RedisClient;
  prefix: string;
}

export interface AdminBoard {
  /** Serves the request if it is for the board; false for any other path. */
  handle(req: NodeRequest, res: NodeResponse): boolean;
  close(): Promise<void>;
}

export function createAdminBoard(opts: AdminBoardOptions): AdminBoard {
  const others = [WEBHOOK_QUEUE_NAME, MAINTENANCE_QUEUE_NAME].map(
    (name) => new Queue(name, { connection: opts.connection, prefix: opts.prefix }),
  );
  const serverAdapter = new HonoAdapter(serveStatic).setBasePath(ADMIN_BASE_PATH);
  createBullBoard({
    queues: [opts.bundles, ...others].map((q) => new BullMQAdapter(q, { readOnlyMode: true })),
    serverAdapter,
    options: { uiConfig: { boardTitle: "download-jobs queues" } },
  });
  const app = new Hono().route(ADMIN_BASE_PATH, serverAdapter.registerPlugin());
  const listener = getRequestListener(app.fetch);
  const expected = Buffer.from(opts.tokenSha256, "hex");

  return {
    handle(req, res) {
      const url = req.url ?? "";
      if (
        url !== ADMIN_BASE_PATH &&
        !url.startsWith(`${ADMIN_BASE_PATH}/`) &&
        !url.startsWith(`${ADMIN_BASE_PATH}?`)
      ) {
        return false;
      }
      // Both response kinds have these methods; TypeScript cannot call them on the union.
      const out = res as unknown as ServerResponse;
      const token = adminToken(req.headers.authorization);
      if (token === undefined || !timingSafeEqual(tokenDigest(token), expected)) {
        out.writeHead(401, {
          "content-type": "text/plain",
          // A browser shows its password prompt; the user name is ignored.
          "www-authenticate": 'Basic realm="download-jobs admin", charset="UTF-8"',
        });
        out.end("admin token required\n");
        return true;
      }
      if (req.method !== "GET" && req.method !== "HEAD") {
        out.writeHead(405, { "content-type": "text/plain", allow: "GET, HEAD" });
        out.end("the queue dashboard is read-only\n");
        return true;
      }
      // Hono's listener serves HTTP/1.1 and HTTP/2 requests alike.
      void listener(req as IncomingMessage, out);
      return true;
    },
    async close() {
      await Promise.all(others.map((q) => q.close().catch(() => undefined)));
    },
  };
}

/** The bearer token, or the password of basic auth (whatever the user name). */
function adminToken(header: string | undefined): string | undefined {
  const bearer = bearerToken(header);
  if (bearer !== undefined) return bearer;
  const m = /^\s*basic\s+([A-Za-z0-9+/=]+)\s*$/i.exec(header ?? "");
  if (m?.[1] === undefined) return undefined;
  const decoded = Buffer.from(m[1], "base64").toString("utf8");
  const colon = decoded.indexOf(":");
  return colon === -1 || decoded.length > 1024 ? undefined : decoded.slice(colon + 1);
}
