import { ConfigError, loadConfig } from "../core/config.js";
import { HistoryDb } from "../core/history.js";

// `npm run history -- <command>`: what an operator does to the job history by hand.
//   migrate          applies the schema (workers do it when they start)
//   erase <owner>    deletes an owner's whole history (a privacy request)
//   prune [days]     deletes history past HISTORY_RETENTION_DAYS (or `days`) now

const USAGE = "usage: npm run history -- migrate | erase <owner> | prune [days]";

async function main(argv: string[]): Promise<number> {
  let cfg: ReturnType<typeof loadConfig>;
  try {
    cfg = loadConfig();
  } catch (err) {
    if (err instanceof ConfigError) {
      process.stderr.write(`${err.message}\n`);
      return 2;
    }
    throw err;
  }
  if (cfg.HISTORY_DATABASE_URL === undefined) {
    process.stderr.write("HISTORY_DATABASE_URL is not set: which PostgreSQL holds the history?\n");
    return 2;
  }
  const [command, arg] = argv;
  const db = new HistoryDb(cfg.HISTORY_DATABASE_URL);
  try {
    await db.migrate();
    switch (command) {
      case "migrate":
        process.stdout.write("history schema is up to date\n");
        return 0;
      case "erase": {
        if (arg === undefined || arg === "") {
          process.stderr.write(`erase needs the owner whose history goes\n${USAGE}\n`);
          return 2;
        }
        const n = await db.eraseOwner(arg);
        process.stdout.write(
          `erased ${n} jobs of ${arg}; later changes of older jobs are ignored\n`,
        );
        return 0;
      }
      case "prune": {
        const days = arg !== undefined ? Number(arg) : cfg.HISTORY_RETENTION_DAYS;
        if (!Number.isInteger(days) || days <= 0) {
          process.stderr.write(`prune needs a whole number of days above 0 (got ${arg ?? days})\n`);
          return 2;
        }
        process.stdout.write(`deleted ${await db.prune(days)} jobs older than ${days} days\n`);
        return 0;
      }
      default:
        process.stderr.write(`${USAGE}\n`);
        return 2;
    }
  } finally {
    await db.close();
  }
}

process.exitCode = await main(process.argv.slice(2));
