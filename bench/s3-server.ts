import { type S3Behaviour, startRealisticS3 } from "../local/realistic-s3.js";
import { startS3 } from "../local/s3-server.js";

// The embedded S3 server (s3rver) in a process of its own, so that in the bundling
// benchmark it does not share an event loop with the benchmark itself. S3_DIR (data
// folder) and BUCKETS (comma-separated) from the environment; prints "listening <port>".
//
// With FIXTURE_TARGET set it runs the realistic-S3 fixture instead, in front of that
// endpoint: FIXTURE_BEHAVIOUR (JSON S3Behaviour) and GENERATED ("bucket/prefix" then
// "first-last:size" ranges of generated file ids, separated by spaces). On SIGTERM it
// prints "stats <json>" before it exits.

const target = process.env.FIXTURE_TARGET;
if (target !== undefined && target !== "") {
  const behaviour = JSON.parse(process.env.FIXTURE_BEHAVIOUR ?? "{}") as S3Behaviour;
  const [where = "download-sources/files/", ...ranges] = (process.env.GENERATED ?? "").split(" ");
  const slash = where.indexOf("/");
  const sizes = ranges.map((r) => {
    const [ids = "", size = "0"] = r.split(":");
    const [first = "0", last = first] = ids.split("-");
    return { first: Number(first), last: Number(last), size: Number(size) };
  });
  const fixture = await startRealisticS3(target, behaviour, 42, {
    bucket: where.slice(0, slash),
    prefix: where.slice(slash + 1),
    sizeOf: (id) => sizes.find((s) => id >= s.first && id <= s.last)?.size,
  });
  process.stdout.write(`listening ${new URL(fixture.endpoint).port}\n`);
  process.on("SIGTERM", () => {
    const { byKey: _k, bySessionToken: _t, ...stats } = fixture.stats;
    process.stdout.write(`stats ${JSON.stringify(stats)}\n`, () => {
      fixture.close().then(
        () => process.exit(0),
        () => process.exit(1),
      );
    });
  });
} else {
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
}
