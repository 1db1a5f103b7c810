import { startS3 } from "../local/s3-server.js";

// The embedded S3 server (s3rver) in a process of its own, so that in the bundling
// benchmark it does not share an event loop with the benchmark itself. S3_DIR (data
// folder) and BUCKETS (comma-separated) from the environment; prints "listening <port>".

const s3 = await startS3({
  ...(process.env.S3_DIR !== undefined ? { dir: process.env.S3_DIR } : {}),
  buckets: (process.env.BUCKETS ?? "download-sources,download-results").split(","),
});
process.stdout.write(`listening ${s3.port}\n`);
process.on("SIGTERM", () => {
  s3.stop().then(
    () => process.exit(0),
    () => process.exit(1),
  );
});
