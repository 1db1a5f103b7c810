import { createServer } from "node:http";
import type { ConnectRouter } from "@connectrpc/connect";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import { DownloadService } from "../gen/downloads/v1/download_service_pb.js";

// The memory baseline for a watch: a bare connect-node server whose WatchJob holds the
// stream open after one empty message and does nothing else (no Redis, no state). Same HTTP/1.1 stack, same
// generated service. PORT from the environment; prints "listening <port>".

function routes(router: ConnectRouter): void {
  router.service(DownloadService, {
    async initiate() {
      return {};
    },
    async getStatus() {
      return {};
    },
    async cancel() {
      return {};
    },
    async *watchJob(_req, ctx) {
      // One empty message, as the real stream sends its snapshot; then nothing.
      yield {};
      await new Promise<void>((resolve) =>
        ctx.signal.addEventListener("abort", () => resolve(), { once: true }),
      );
    },
  });
}

const server = createServer(connectNodeAdapter({ routes }));
server.listen(Number(process.env.PORT ?? 0), "127.0.0.1", () => {
  const addr = server.address();
  process.stdout.write(`listening ${typeof addr === "object" && addr ? addr.port : 0}\n`);
});
process.on("SIGTERM", () => process.exit(0));
