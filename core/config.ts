import { z } from "zod";

// The only reader of process.env. Entry points call loadConfig() once and pass the
// values on; a bad value stops the process with the variable's name and what it wanted.

const flag = z
  .enum(["true", "false", "1", "0", "yes", "no"], {
    error: "expected true or false",
  })
  .transform((v) => v === "true" || v === "1" || v === "yes");

const int = (min: number, max = Number.MAX_SAFE_INTEGER) =>
  z.coerce
    .number({ error: "expected an integer" })
    .int({ error: "expected an integer" })
    .min(min, { error: `expected an integer >= ${min}` })
    .max(max, { error: `expected an integer <= ${max}` });

const url = z.url({ error: "expected a URL such as http://127.0.0.1:9000" });

/** One AUTH_TOKENS entry: the owner a token acts for and the SHA-256 of the token. */
export interface AuthToken {
  owner: string;
  /** Lower-case hex SHA-256 of the token, as `printf %s "$TOKEN" | sha256sum` prints it. */
  sha256: string;
  /** `max_priority=N`: the highest Initiate priority the owner may ask for (0-9). */
  maxPriority?: number;
  /** `weight=N`: the owner's share of the workers against others' when queues are long. */
  weight?: number;
}

const OWNER = /^[A-Za-z0-9_.@-]{1,64}$/;

/** The highest Initiate priority there is; 0 is the default and the lowest. */
export const MAX_JOB_PRIORITY = 9;
/** The largest per-owner scheduling weight. */
export const MAX_OWNER_WEIGHT = 100;

const TOKEN_FORMAT =
  "expected owner:sha256hex pairs separated by commas, each optionally followed by " +
  ":max_priority=N (0-9) and :weight=N (1-100) (owner: letters, digits, _ . @ -; " +
  'the hash of the token, from: printf %s "$TOKEN" | sha256sum)';

// `owner:sha256hex[:max_priority=N][:weight=N]` entries separated by commas or white
// space. Clear tokens are refused on purpose: the configuration must never hold a
// credential. The settings after the hash belong to the owner, so every token of one
// owner that states one must state the same value.
const authTokens = z.string().transform((raw, ctx): AuthToken[] => {
  const out: AuthToken[] = [];
  const seen = new Set<string>();
  for (const item of raw.split(/[\s,]+/).filter((s) => s !== "")) {
    const [owner = "", hash = "", ...settings] = item.split(":");
    const sha256 = hash.toLowerCase();
    if (!OWNER.test(owner) || !/^[0-9a-f]{64}$/.test(sha256)) {
      ctx.addIssue({ code: "custom", message: TOKEN_FORMAT });
      return z.NEVER;
    }
    const entry: AuthToken = { owner, sha256 };
    for (const setting of settings) {
      const m = /^(max_priority|weight)=(\d{1,3})$/.exec(setting);
      const value = Number(m?.[2]);
      const ok =
        m?.[1] === "max_priority"
          ? value <= MAX_JOB_PRIORITY
          : m?.[1] === "weight" && value >= 1 && value <= MAX_OWNER_WEIGHT;
      if (m === null || !ok) {
        ctx.addIssue({
          code: "custom",
          message: `owner ${owner}: "${setting}" is not a setting; ${TOKEN_FORMAT}`,
        });
        return z.NEVER;
      }
      if (m[1] === "max_priority") entry.maxPriority = value;
      else entry.weight = value;
    }
    if (seen.has(sha256)) {
      ctx.addIssue({
        code: "custom",
        message: `the same token hash is listed twice (owner ${owner})`,
      });
      return z.NEVER;
    }
    for (const other of out) {
      if (other.owner !== owner) continue;
      for (const k of ["maxPriority", "weight"] as const) {
        if (entry[k] !== undefined && other[k] !== undefined && entry[k] !== other[k]) {
          ctx.addIssue({
            code: "custom",
            message: `owner ${owner}: its tokens state different ${k === "weight" ? "weight" : "max_priority"} values; state it once, or the same on each`,
          });
          return z.NEVER;
        }
      }
    }
    seen.add(sha256);
    out.push(entry);
  }
  return out;
});

/** What the scheduler knows of an owner: its priority ceiling and its weight. */
export interface OwnerSettings {
  maxPriority: number;
  weight: number;
}

/**
 * Each owner's settings from its AUTH_TOKENS entries; owners that state nothing (and the
 * anonymous owner of AUTH_DISABLED) get the defaults.
 */
export function ownerSettingsFrom(
  tokens: readonly AuthToken[],
  defaults: OwnerSettings,
): (owner: string) => OwnerSettings {
  const byOwner = new Map<string, OwnerSettings>();
  for (const t of tokens) {
    const s = byOwner.get(t.owner) ?? { ...defaults };
    if (t.maxPriority !== undefined) s.maxPriority = t.maxPriority;
    if (t.weight !== undefined) s.weight = t.weight;
    byOwner.set(t.owner, s);
  }
  return (owner) => byOwner.get(owner) ?? defaults;
}

// Host names or CIDR ranges a webhook may reach although they are private.
const hostList = z.string().transform((raw) => raw.split(/[\s,]+/).filter((s) => s !== ""));

// Seed nodes of a Redis Cluster: host:port or redis:// URLs, separated by commas.
const clusterNodes = z.string().transform((raw, ctx): string[] => {
  const nodes = raw.split(/[\s,]+/).filter((s) => s !== "");
  const bad = nodes.filter((n) => !/^rediss?:\/\/./.test(n) && !/^[^\s:/]+:\d{1,5}$/.test(n));
  if (nodes.length === 0 || bad.length > 0) {
    ctx.addIssue({
      code: "custom",
      message: "expected host:port (or redis://host:port) seed nodes separated by commas",
    });
    return z.NEVER;
  }
  return nodes;
});

// Sentinels of a Redis primary/replica set: host:port, or redis://[user:password@]host:port
// when the Sentinels require a password, separated by commas; rediss:// for TLS to the
// Sentinels and to the primary and replicas they name (every Sentinel or none).
const sentinels = z.string().transform((raw, ctx): string[] => {
  const nodes = raw.split(/[\s,]+/).filter((s) => s !== "");
  const bad = nodes.filter(
    (n) => !/^rediss?:\/\/[^\s/]+:\d{1,5}\/?$/.test(n) && !/^[^\s:/]+:\d{1,5}$/.test(n),
  );
  if (nodes.length === 0 || bad.length > 0) {
    ctx.addIssue({
      code: "custom",
      message:
        "expected host:port of each Sentinel (or redis://:password@host:port when they require one, rediss:// for TLS), separated by commas (e.g. 10.0.0.5:26379)",
    });
    return z.NEVER;
  }
  const tls = nodes.filter((n) => n.startsWith("rediss://")).length;
  if (tls > 0 && tls < nodes.length) {
    ctx.addIssue({
      code: "custom",
      message: `${tls} of ${nodes.length} Sentinels are rediss:// URLs: TLS is for every Sentinel and every data node or for none, so write all of them as rediss:// (or none)`,
    });
    return z.NEVER;
  }
  return nodes;
});

const schema = z.object({
  PORT: int(0, 65535).default(8080),
  HOST: z.string().min(1).default("127.0.0.1"),
  REDIS_URL: z
    .string()
    .regex(/^rediss?:\/\//, { error: "expected redis://host:port or rediss://..." })
    .optional(),
  QUEUE_PREFIX: z
    .string()
    .regex(/^[A-Za-z0-9_{}.-]+$/, { error: "expected letters, digits, _ . - { } only" })
    .default("dj"),
  S3_ENDPOINT: url.optional(),
  S3_PUBLIC_ENDPOINT: url.optional(),
  S3_REGION: z.string().min(1).default("us-east-1"),
  S3_ACCESS_KEY_ID: z.string().min(1).optional(),
  S3_SECRET_ACCESS_KEY: z.string().min(1).optional(),
  S3_FORCE_PATH_STYLE: flag.default(true),
  S3_CONNECT_TIMEOUT_MS: int(0).default(3000),
  S3_FIRST_BYTE_TIMEOUT_MS: int(0).default(10_000),
  S3_STALL_MS: int(0).default(10_000),
  S3_READ_ATTEMPTS: int(1, 100).default(6),
  S3_PROFILE: z
    .enum(["loopback", "realistic", "throttled", "hostile"], {
      error: "expected loopback, realistic, throttled or hostile",
    })
    .optional(),
  READ_AHEAD_BYTES: int(1024 * 1024).default(32 * 1024 * 1024),
  READ_AHEAD_OBJECTS: int(1, 1000).default(16),
  READ_RANGE_BYTES: int(1024 * 1024).default(8 * 1024 * 1024),
  MAX_JOB_SECONDS: int(0).default(3600),
  SOURCE_BUCKET: z
    .string()
    .min(3, { error: "bucket names have at least 3 characters" })
    .default("download-sources"),
  SOURCE_PREFIX: z.string().default("files/"),
  RESULT_BUCKET: z
    .string()
    .min(3, { error: "bucket names have at least 3 characters" })
    .default("download-results"),
  RESULT_PREFIX: z.string().default("bundles/"),
  PRESIGN_EXPIRY_SECONDS: int(1, 7 * 24 * 3600).default(900),
  JOB_RECORD_TTL_SECONDS: int(60).default(7 * 24 * 3600),
  MAX_FILES_PER_JOB: int(1, 100_000).default(100),
  MAX_REQUEST_BYTES: int(1024).default(65_536),
  WATCH_HEARTBEAT_MS: int(100).default(15_000),
  // A queued job's stream gets its fresh queue estimate this often (0: only with the
  // ordinary heartbeats); never less often than WATCH_HEARTBEAT_MS.
  WATCH_QUEUED_HEARTBEAT_MS: int(0)
    .refine((v) => v === 0 || v >= 100, { error: "expected 0 (off) or at least 100" })
    .default(2_000),
  // 0 is off; otherwise at least a second, or clients would spend their time reconnecting.
  WATCH_MAX_STREAM_MS: int(0)
    .refine((v) => v === 0 || v >= 1000, { error: "expected 0 (off) or at least 1000" })
    .default(0),
  // GetStatus long-poll cap: below every proxy's idle limit (nginx and ALB 60 s, Envoy's
  // default route timeout 15 s) so that a waiting poll is answered before it is cut.
  STATUS_MAX_WAIT_MS: int(0, 120_000).default(25_000),
  // Signs scoped watch tokens (CreateWatchToken); the same on every API instance. No
  // default: unset turns the tokens off.
  WATCH_TOKEN_SECRET: z
    .string()
    .min(32, { error: "expected at least 32 characters (e.g. openssl rand -hex 32)" })
    .optional(),
  HTTP_HEADERS_TIMEOUT_MS: int(100).default(10_000),
  HTTP_REQUEST_TIMEOUT_MS: int(100).default(30_000),
  HTTP2_IDLE_TIMEOUT_MS: int(100).default(60_000),
  HTTP2_MAX_CONCURRENT_STREAMS: int(1, 2 ** 31 - 1).default(250),
  HTTP2_MAX_RESETS_PER_10S: int(1).default(200),
  HEALTH_WATCH_MAX_STREAMS: int(0).default(1000),
  HEALTH_WATCH_MAX_PER_CONNECTION: int(0).default(8),
  HEALTH_WATCH_MAX_STREAM_MS: int(1000).default(300_000),
  WORKER_CONCURRENCY: int(1, 1000).default(4),
  JOB_ATTEMPTS: int(1, 100).default(3),
  JOB_BACKOFF_MS: int(0).default(1000),
  JOB_LOCK_MS: int(1000).default(6000),
  JOB_STALLED_INTERVAL_MS: int(500).default(3000),
  JOB_MAX_STALLED: int(0, 100).default(3),
  PROGRESS_INTERVAL_MS: int(0).default(200),
  UPLOAD_PART_BYTES: int(5 * 1024 * 1024).default(8 * 1024 * 1024),
  UPLOAD_QUEUE_SIZE: int(1, 64).default(4),
  ZIP_LEVEL: int(0, 9).default(0),
  THROTTLE_BYTES_PER_SECOND: int(0).default(0),
  SHUTDOWN_GRACE_MS: int(0, 60_000).default(8000),
  LOG_LEVEL: z.enum(["fatal", "error", "warn", "info", "debug", "trace", "silent"]).default("info"),
  DATA_DIR: z.string().min(1).default(".data"),
  SEED_SAMPLES: flag.default(true),
  READY_TIMEOUT_MS: int(50, 30_000).default(2000),
  WORKER_HEALTH_PORT: int(0, 65535).default(0),
  AUTH_TOKENS: authTokens.optional(),
  AUTH_DISABLED: flag.default(false),
  IDEMPOTENCY_TTL_SECONDS: int(60).default(24 * 3600),
  DEDUP_IN_FLIGHT: flag.default(true),
  REUSE_RESULTS: flag.default(true),
  MAX_ACTIVE_JOBS_PER_OWNER: int(0).default(5),
  // The priority ceiling of owners whose AUTH_TOKENS entry states no max_priority (and
  // of everyone with AUTH_DISABLED).
  DEFAULT_MAX_PRIORITY: int(0, MAX_JOB_PRIORITY).default(0),
  // false: queued jobs of one priority start in arrival order, whoever owns them.
  FAIR_SCHEDULING: flag.default(true),
  INITIATE_RATE_PER_MINUTE: int(0).default(60),
  MAX_QUEUE_DEPTH: int(0).default(10_000),
  MAX_JOB_BYTES: int(0).default(10 * 1024 * 1024 * 1024),
  RESULT_TTL_SECONDS: int(1).default(24 * 3600),
  RETENTION_INTERVAL_MS: int(100).default(60_000),
  WEBHOOK_SECRET: z.string().min(16, { error: "expected at least 16 characters" }).optional(),
  WEBHOOK_ALLOW_PRIVATE: flag.default(false),
  WEBHOOK_ALLOWED_HOSTS: hostList.optional(),
  WEBHOOK_TIMEOUT_MS: int(100).default(10_000),
  WEBHOOK_ATTEMPTS: int(1, 100).default(8),
  WEBHOOK_BACKOFF_MS: int(0).default(2000),
  // One owner's webhook deliveries in flight at once, across all workers; 0 = no cap.
  WEBHOOK_MAX_IN_FLIGHT_PER_OWNER: int(0).default(4),
  WEB_ROOT: z.string().default("clients/web/dist"),
  REDIS_CLUSTER_NODES: clusterNodes.optional(),
  REDIS_SENTINELS: sentinels.optional(),
  REDIS_SENTINEL_NAME: z
    .string()
    .regex(/^[A-Za-z0-9_.-]{1,64}$/, {
      error: "expected the primary's name as the Sentinels know it (sentinel monitor <name> ...)",
    })
    .optional(),
  // The primary's and replicas' credentials when they are found through the Sentinels
  // (a REDIS_URL or REDIS_CLUSTER_NODES URL carries its own).
  REDIS_USERNAME: z.string().min(1).optional(),
  REDIS_PASSWORD: z.string().min(1).optional(),
  // 0 is off: Initiate answers once the primary has the job. Otherwise it also waits
  // until that many replicas hold it (WAIT), or fails with UNAVAILABLE.
  REDIS_MIN_REPLICAS_ACK: int(0, 100).default(0),
  REDIS_REPLICAS_ACK_TIMEOUT_MS: int(1, 60_000).default(500),
  LOG_FORMAT: z.enum(["pretty", "json"]).optional(),
  NODE_ENV: z.string().optional(),
  ADMIN_TOKEN_SHA256: z
    .string()
    .regex(/^[0-9a-fA-F]{64}$/, {
      error: 'expected the hex SHA-256 of the admin token, from: printf %s "$TOKEN" | sha256sum',
    })
    .transform((v) => v.toLowerCase())
    .optional(),
  // Unset: no history. Set on the workers (they write it) and on the API (the history
  // RPCs read it); every process appends to the outbox once a worker with it has started
  // (core/lua/transition.lua).
  HISTORY_DATABASE_URL: z
    .string()
    .regex(/^postgres(ql)?:\/\/./, {
      error: "expected postgres://user:password@host:5432/database",
    })
    .optional(),
  HISTORY_RETENTION_DAYS: int(0).default(400),
  // What the API's key for ListJobHistory page tokens is derived from. Unset: the
  // HISTORY_DATABASE_URL, which every API instance of a deployment shares.
  HISTORY_PAGE_TOKEN_SECRET: z
    .string()
    .min(32, { error: "expected at least 32 characters, e.g. from: openssl rand -hex 32" })
    .optional(),
  HISTORY_OUTBOX_MAX_ENTRIES: int(1000).default(1_000_000),
  // Signs the stable download links (/d/<job>?exp=..&sig=..); unset: no links. Give the
  // API and the workers (webhook bodies carry the link) the same value.
  DOWNLOAD_LINK_SECRET: z
    .string()
    .min(32, { error: "expected at least 32 characters, e.g. from: openssl rand -hex 32" })
    .optional(),
  // The API's address as users reach it (https://downloads.example.com): links are made
  // absolute with it. Unset: links are relative to the API (/d/...).
  PUBLIC_URL: url.optional(),
  OTEL_TRACES_EXPORTER: z
    .enum(["otlp", "console", "none"], { error: "expected otlp, console or none" })
    .optional(),
  OTEL_EXPORTER_OTLP_ENDPOINT: url.optional(),
  OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: url.optional(),
  OTEL_BSP_SCHEDULE_DELAY: int(1).default(5000),
});

// Variables whose empty value means "off" rather than "use the default".
const EMPTY_MEANS_OFF = new Set(["WEB_ROOT"]);

export type Config = z.infer<typeof schema>;

export class ConfigError extends Error {
  override name = "ConfigError";
}

/** Parses the environment once; throws ConfigError naming every bad variable. */
export function loadConfig(env: NodeJS.ProcessEnv = process.env): Config {
  const input = Object.fromEntries(
    Object.entries(env).filter(([k, v]) => v !== undefined && (v !== "" || EMPTY_MEANS_OFF.has(k))),
  );
  const parsed = schema.safeParse(input);
  if (!parsed.success) {
    const lines = parsed.error.issues.map((i) => `  ${i.path.join(".")}: ${i.message}`);
    throw new ConfigError(`invalid configuration:\n${lines.join("\n")}`);
  }
  const cfg = parsed.data;
  // Without static keys the AWS SDK's default credential chain (a role) is used; half a
  // pair is a mistake, not a request for the chain.
  if ((cfg.S3_ACCESS_KEY_ID === undefined) !== (cfg.S3_SECRET_ACCESS_KEY === undefined)) {
    throw new ConfigError(
      "invalid configuration:\n  S3_ACCESS_KEY_ID, S3_SECRET_ACCESS_KEY: set both, or neither to use the AWS default credential chain (IAM role)",
    );
  }
  if (cfg.REDIS_SENTINELS !== undefined) {
    if (cfg.REDIS_URL !== undefined || cfg.REDIS_CLUSTER_NODES !== undefined) {
      throw new ConfigError(
        "invalid configuration:\n  REDIS_SENTINELS: set it alone, without REDIS_URL or REDIS_CLUSTER_NODES",
      );
    }
    if (cfg.REDIS_SENTINEL_NAME === undefined) {
      throw new ConfigError(
        "invalid configuration:\n  REDIS_SENTINEL_NAME: required with REDIS_SENTINELS (the name in the Sentinels' 'sentinel monitor <name>' line)",
      );
    }
  }
  if (
    (cfg.REDIS_USERNAME !== undefined || cfg.REDIS_PASSWORD !== undefined) &&
    cfg.REDIS_SENTINELS === undefined
  ) {
    throw new ConfigError(
      "invalid configuration:\n  REDIS_USERNAME, REDIS_PASSWORD: only with REDIS_SENTINELS; put credentials in REDIS_URL (redis://user:password@host:port) or in each REDIS_CLUSTER_NODES URL",
    );
  }
  if (cfg.REDIS_CLUSTER_NODES !== undefined) {
    if (cfg.REDIS_URL !== undefined) {
      throw new ConfigError(
        "invalid configuration:\n  REDIS_URL, REDIS_CLUSTER_NODES: set one of them, not both",
      );
    }
    // BullMQ's Lua scripts touch several keys of a queue at once, which a cluster allows
    // only within one hash slot: the `{tag}` in the prefix puts every key in the same one.
    if (!hasHashTag(cfg.QUEUE_PREFIX)) {
      throw new ConfigError(
        `invalid configuration:\n  QUEUE_PREFIX: with REDIS_CLUSTER_NODES the prefix needs a hash tag such as {dj} (got ${cfg.QUEUE_PREFIX})`,
      );
    }
  }
  return cfg;
}

/** Redis Cluster hashes only the part between the first `{` and the next `}`, if not empty. */
export function hasHashTag(key: string): boolean {
  const open = key.indexOf("{");
  if (open === -1) return false;
  const close = key.indexOf("}", open + 1);
  return close > open + 1;
}
