import type { JobStore } from "./job-store.js";
import type { JobRecord } from "./jobs.js";
import type { RedisKeys } from "./keys.js";
import type { RedisClient } from "./redis.js";

// Queue position and predicted times. The workers measure every completed run
// (recordRun: its seconds, files and bytes) into exponentially weighted least-squares
// sums in Redis (core/lua/record-run.lua), so recent runs, made under today's load, weigh
// most. The API fits run time = a + b·files + c·megabytes to those sums (fitRunModel) and
// plays the queue forward (QueueForecaster): the running jobs end when their own rate
// and the model say, each slot then takes the next waiting job in the order the workers
// take them (queueOrder). Nothing here is a constant of the machine: without
// measurements a job gets its position and no times.

/** A queued or running job's estimate, as the Job message carries it (estimate). */
export interface JobEstimate {
  /** 1 for the next job to start; 0 when running. */
  position: number;
  predictedStartAt?: number;
  predictedEndAt?: number;
  runningJobs: number;
  /** The per-job read rate the model assumes (bytes/s); 0 when unknown. */
  bytesPerSecond: number;
  /** Runs measured so far (all of them; older ones weigh less). */
  samples: number;
}

/** Weight of the previous sums at each new run: about the last 5 runs count most. */
export const RUN_DECAY = 0.8;
/** File sizes remembered for sizing queued jobs (one hash field each). */
const FILE_SIZES_CAP = 200_000;
/**
 * A running job's own read rate counts only once it has run this long: before, its rate
 * still holds the time spent on first bytes and is far below what the job will do.
 */
const SETTLED_RATE_MS = 2000;
/** At most this many never-seen files of a new job are sized at Initiate... */
const SIZE_AT_INITIATE_MAX = 64;
/** ...this many at a time, and Initiate waits at most this long for them. */
const SIZE_AT_INITIATE_CONCURRENCY = 16;
const SIZE_AT_INITIATE_WAIT_MS = 250;
const MB = 1_000_000;

/** A worker's record of one completed run: how long it took for how much. */
export async function recordRun(store: JobStore, rec: JobRecord, runMs: number): Promise<void> {
  const list = rec.files ?? [];
  const files = rec.progress.filesTotal || list.length;
  const bytes = rec.progress.bytesTotal || list.reduce((n, f) => n + f.sizeBytes, 0);
  const sizes = list.filter((f) => f.sizeBytes > 0).flatMap((f) => [f.fileId, f.sizeBytes]);
  await store.scripts.djRecordRun(
    store.keys.runStats,
    store.keys.fileSizes,
    String(RUN_DECAY),
    String(files),
    String(bytes / MB),
    String(runMs / 1000),
    String(FILE_SIZES_CAP),
    ...sizes.map(String),
  );
}

/** Run time in seconds = coef[0] + coef[1]·files + coef[2]·megabytes. */
export interface RunModel {
  coef: [number, number, number];
  /** Mean bytes of one source file in the measured runs. */
  meanFileBytes: number;
  samples: number;
}

const NAMES = ["n", "f", "m"] as const;

/**
 * Least squares on the weighted sums, with every coefficient kept at or above zero: of
 * the fits on each subset of the three terms whose coefficients are all positive, the
 * one with the smallest residual. (With runs that all have one file, files and the
 * constant cannot be told apart; any split predicts the same.)
 */
export function fitRunModel(stats: Record<string, string>): RunModel | undefined {
  const num = (k: string) => Number(stats[k] ?? 0);
  const samples = num("runs");
  const w = num("xnn");
  if (samples < 1 || !(w > 0)) return undefined;
  const S = (i: number, j: number) => num(`x${NAMES[Math.min(i, j)]}${NAMES[Math.max(i, j)]}`) || 0;
  const b = (i: number) => num(`y${NAMES[i]}`);
  const yy = num("yy");
  let best: { coef: [number, number, number]; sse: number } | undefined;
  // Bytes first: among fits as good as each other (few runs), the one that scales with
  // size predicts other sizes best.
  for (const mask of [4, 5, 6, 7, 1, 2, 3]) {
    const idx = [0, 1, 2].filter((i) => (mask >> i) & 1);
    // Normal equations of the subset, with a touch of ridge so collinear terms solve.
    const A = idx.map((i) => idx.map((j) => S(i, j) + (i === j ? S(i, i) * 1e-9 + 1e-12 : 0)));
    const v = idx.map((i) => b(i));
    const sol = solve(A, v);
    if (sol === undefined || sol.some((c) => !(c >= 0))) continue;
    const coef: [number, number, number] = [0, 0, 0];
    idx.forEach((i, k) => {
      coef[i] = sol[k] as number;
    });
    let sse = yy;
    for (let i = 0; i < 3; i++) {
      const ci = coef[i] as number;
      sse -= 2 * ci * b(i);
      for (let j = 0; j < 3; j++) sse += ci * (coef[j] as number) * S(i, j);
    }
    if (best === undefined || sse < best.sse - 1e-9 * Math.max(yy, 1e-9)) best = { coef, sse };
  }
  if (best === undefined) return undefined;
  return { coef: best.coef, meanFileBytes: (num("mf") / w) * MB, samples };
}

/** Gaussian elimination with partial pivoting; undefined when singular. */
function solve(A: number[][], v: number[]): number[] | undefined {
  const n = v.length;
  const M = A.map((row, i) => [...row, v[i] as number]);
  for (let c = 0; c < n; c++) {
    let p = c;
    for (let r = c + 1; r < n; r++) if (Math.abs(M[r]?.[c] ?? 0) > Math.abs(M[p]?.[c] ?? 0)) p = r;
    const pivot = M[p]?.[c] ?? 0;
    if (Math.abs(pivot) < 1e-300) return undefined;
    [M[c], M[p]] = [M[p] as number[], M[c] as number[]];
    for (let r = 0; r < n; r++) {
      if (r === c) continue;
      const f = (M[r]?.[c] ?? 0) / pivot;
      const row = M[r] as number[];
      const top = M[c] as number[];
      for (let k = c; k <= n; k++) row[k] = (row[k] as number) - f * (top[k] as number);
    }
  }
  return M.map((row, i) => (row[n] ?? 0) / (row[i] ?? 1));
}

/** `model` with its per-megabyte cost halfway to the median of `rates` (bytes/s), if any. */
export function withLiveRate(model: RunModel, rates: readonly number[]): RunModel {
  if (rates.length === 0) return model;
  const sorted = [...rates].sort((a, b) => a - b);
  const live = MB / (sorted[Math.floor(sorted.length / 2)] as number);
  const [a, perFile, perMb] = model.coef;
  return { ...model, coef: [a, perFile, perMb > 0 ? (perMb + live) / 2 : live] };
}

/** Predicted run time of a job of `files` files and `bytes` bytes, in ms. */
export function predictRunMs(model: RunModel, files: number, bytes: number): number {
  const [a, perFile, perMb] = model.coef;
  return (a + perFile * files + perMb * (bytes / MB)) * 1000;
}

/** The per-job read rate the model implies (bytes/s); 0 when bytes cost nothing measurable. */
export function modelBytesPerSecond(model: RunModel): number {
  return model.coef[2] > 0 ? MB / model.coef[2] : 0;
}

/**
 * The waiting jobs in the order the workers will take them, the next one first: at most
 * `limit` of them, and how many wait in all. This is the one place that knows how the
 * queue lays its waiting jobs out (BullMQ: the `wait` list is taken from its right end,
 * then the `prioritized` set by score).
 */
export async function queueOrder(
  redis: RedisClient,
  keys: RedisKeys,
  limit: number,
): Promise<{ ids: string[]; waiting: number }> {
  const [wait, waitLen, prio, prioLen] = (await redis
    .multi()
    .lrange(keys.bundleJobs("wait"), -limit, -1)
    .llen(keys.bundleJobs("wait"))
    .zrange(keys.bundleJobs("prioritized"), 0, limit - 1)
    .zcard(keys.bundleJobs("prioritized"))
    .exec()) as [Error | null, unknown][];
  const ids = [...((wait?.[1] as string[]) ?? [])].reverse();
  ids.push(...((prio?.[1] as string[]) ?? []));
  return {
    ids: ids.slice(0, limit),
    waiting: Number(waitLen?.[1] ?? 0) + Number(prioLen?.[1] ?? 0),
  };
}

/** A job's 1-based place in queueOrder's order, read directly; undefined if not waiting. */
export async function queuePosition(
  redis: RedisClient,
  keys: RedisKeys,
  jobId: string,
): Promise<number | undefined> {
  const [pos, len, rank] = (await redis
    .multi()
    .lpos(keys.bundleJobs("wait"), jobId)
    .llen(keys.bundleJobs("wait"))
    .zrank(keys.bundleJobs("prioritized"), jobId)
    .exec()) as [Error | null, unknown][];
  const waitLen = Number(len?.[1] ?? 0);
  if (pos?.[1] !== null && pos?.[1] !== undefined) return waitLen - Number(pos[1]);
  if (rank?.[1] !== null && rank?.[1] !== undefined) return waitLen + Number(rank[1]) + 1;
  return undefined;
}

interface Planned {
  position: number;
  startAt?: number;
  endAt?: number;
}

interface Snapshot {
  at: number;
  generation: number;
  model: RunModel | undefined;
  running: number;
  waiting: number;
  planned: Map<string, Planned>;
  /** When the last planned job starts, and the mean run time of those planned (ms). */
  tail: { position: number; startAt: number; meanMs: number } | undefined;
}

export interface ForecastOptions {
  /** How long one look at the queue serves every answer of this process. */
  refreshMs?: number;
  /**
   * A source file's size (a HEAD at S3), for the files of a new job that no worker has
   * seen yet (sizeNewJob); undefined when it cannot be told.
   */
  sourceSize?: (fileId: number) => Promise<number | undefined>;
  /** Waiting jobs planned one by one; later ones are extrapolated from these. */
  detailLimit?: number;
  now?: () => number;
}

type ActiveFields = [string | null, string | null, string | null];

/**
 * Plans the queue at most once per refreshMs per API process, whatever the number of
 * callers: every queued job's answer is then a lookup (generation tells a cached answer
 * that the plan changed).
 */
export class QueueForecaster {
  private snap: Snapshot | undefined;
  private pending: Promise<Snapshot> | undefined;
  private gen = 0;
  private readonly refreshMs: number;
  private readonly detailLimit: number;
  private readonly now: () => number;

  constructor(
    private readonly store: JobStore,
    private readonly opts: ForecastOptions = {},
  ) {
    this.refreshMs = opts.refreshMs ?? 1000;
    this.detailLimit = opts.detailLimit ?? 200;
    this.now = opts.now ?? Date.now;
  }

  /** Changes whenever the plan is made again: answers made from an older one are stale. */
  get generation(): number {
    return this.gen;
  }

  /** The estimate of a job as `rec` shows it; undefined once it has ended. */
  async estimate(rec: JobRecord): Promise<JobEstimate | undefined> {
    if (rec.state !== "QUEUED" && rec.state !== "PROCESSING") return undefined;
    const snap = await this.snapshot();
    const base = {
      runningJobs: snap.running,
      bytesPerSecond: snap.model ? modelBytesPerSecond(snap.model) : 0,
      samples: snap.model?.samples ?? 0,
    };
    if (rec.state === "PROCESSING") {
      const end = snap.model ? this.now() + remainingMs(snap.model, rec, this.now()) : undefined;
      return {
        position: 0,
        ...base,
        ...(end !== undefined ? { predictedEndAt: seconds(end) } : {}),
      };
    }
    const planned = snap.planned.get(rec.id) ?? (await this.extrapolate(snap, rec));
    return {
      ...base,
      position: planned.position,
      ...(planned.startAt !== undefined ? { predictedStartAt: seconds(planned.startAt) } : {}),
      ...(planned.endAt !== undefined ? { predictedEndAt: seconds(planned.endAt) } : {}),
    };
  }

  /** A queued job the plan does not list: newer than the plan, or beyond its detail. */
  private async extrapolate(snap: Snapshot, rec: JobRecord): Promise<Planned> {
    const { redis, keys } = this.store;
    // Not waiting any more, yet still QUEUED: a worker has taken it and is looking at
    // its files (the record turns PROCESSING next).
    const position = (await queuePosition(redis, keys, rec.id)) ?? 1;
    if (snap.model === undefined) return { position };
    const sizes = await knownSizes(redis, keys, rec.fileIds);
    const runMs = predictRunMs(
      snap.model,
      rec.fileIds.length,
      sizeOf(snap.model, rec.fileIds, sizes),
    );
    const slots = Math.max(1, snap.running);
    const t = snap.tail ?? { position: 0, startAt: snap.at, meanMs: runMs };
    const startAt = Math.max(
      this.now(),
      t.startAt + (Math.max(0, position - t.position) * t.meanMs) / slots,
    );
    return { position, startAt, endAt: startAt + runMs };
  }

  /**
   * Sizes the files of a new job that no worker has seen yet, so that its first estimate
   * (Initiate's answer) is made from its own files rather than the mean file: asks S3 for
   * at most SIZE_AT_INITIATE_MAX of them and waits at most SIZE_AT_INITIATE_WAIT_MS
   * (what is not known by then uses the mean; the sizes still land for later answers).
   * Never fails: without sizes the estimate is only coarser.
   */
  async sizeNewJob(fileIds: readonly number[]): Promise<void> {
    const sourceSize = this.opts.sourceSize;
    if (sourceSize === undefined || fileIds.length === 0) return;
    const { redis, keys } = this.store;
    const learn = async () => {
      const known = await knownSizes(redis, keys, fileIds);
      const unknown = [...new Set(fileIds)].filter((id) => !known.has(id));
      if (unknown.length === 0 || (await redis.hlen(keys.fileSizes)) >= FILE_SIZES_CAP) return;
      const todo = unknown.slice(0, SIZE_AT_INITIATE_MAX);
      const sizes: string[] = [];
      const next = async (): Promise<void> => {
        for (let id = todo.shift(); id !== undefined; id = todo.shift()) {
          const size = await sourceSize(id).catch(() => undefined);
          if (size !== undefined && size > 0) sizes.push(String(id), String(size));
        }
      };
      await Promise.all(Array.from({ length: SIZE_AT_INITIATE_CONCURRENCY }, next));
      if (sizes.length > 0) await redis.hset(keys.fileSizes, ...sizes);
    };
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([
      learn().catch(() => undefined),
      new Promise<void>((resolve) => {
        timer = setTimeout(resolve, SIZE_AT_INITIATE_WAIT_MS);
      }),
    ]);
    clearTimeout(timer);
  }

  /** The generation of a plan no older than refreshMs (made now if need be). */
  async currentGeneration(): Promise<number> {
    return (await this.snapshot()).generation;
  }

  private async snapshot(): Promise<Snapshot> {
    const snap = this.snap;
    if (snap !== undefined && this.now() - snap.at < this.refreshMs) return snap;
    this.pending ??= this.plan().finally(() => {
      this.pending = undefined;
    });
    return this.pending;
  }

  private async plan(): Promise<Snapshot> {
    const { redis, keys } = this.store;
    const [stats, active, order] = await Promise.all([
      redis.hgetall(keys.runStats),
      redis.lrange(keys.bundleJobs("active"), 0, -1),
      queueOrder(redis, keys, this.detailLimit),
    ]);
    const now = this.now();
    let model = fitRunModel(stats);
    const planned = new Map<string, Planned>();
    const running = active.length;
    let tail: Snapshot["tail"];
    if (model === undefined) {
      order.ids.forEach((id, i) => {
        planned.set(id, { position: i + 1 });
      });
    } else {
      // Each slot is free when its running job is predicted to end.
      const pipe = redis.pipeline();
      for (const id of active) pipe.hmget(keys.job(id), "state", "progress", "startedAt");
      for (const id of order.ids) pipe.hget(keys.job(id), "fileIds");
      const replies = ((await pipe.exec()) ?? []).map(([, v]) => v);
      const free: number[] = [];
      const rates: number[] = [];
      for (let i = 0; i < active.length; i++) {
        const [state, progress, startedAt] = (replies[i] as ActiveFields) ?? [];
        if (state !== "PROCESSING" || progress === null) {
          free.push(now);
          continue;
        }
        const rec = {
          progress: JSON.parse(progress),
          ...(startedAt !== null ? { startedAt: Number(startedAt) } : {}),
        } as Pick<JobRecord, "progress" | "startedAt">;
        free.push(now + remainingMs(model, rec, now));
        const settled = rec.startedAt !== undefined && now - rec.startedAt >= SETTLED_RATE_MS;
        if (settled && rec.progress.bytesPerSecond > 0) rates.push(rec.progress.bytesPerSecond);
      }
      if (free.length === 0) free.push(now);
      // The jobs waiting will share what the running ones get now: the fit's rate is
      // brought halfway to the running jobs' own recent rate.
      const shared = withLiveRate(model, rates);
      model = shared;
      const fileIds = order.ids.map(
        (_, i) => JSON.parse((replies[active.length + i] as string | null) ?? "[]") as number[],
      );
      const sizes = await knownSizes(redis, keys, [...new Set(fileIds.flat())]);
      let sum = 0;
      order.ids.forEach((id, i) => {
        const ids = fileIds[i] ?? [];
        const runMs = predictRunMs(shared, ids.length, sizeOf(shared, ids, sizes));
        sum += runMs;
        // The slot that frees first takes the next job.
        let k = 0;
        for (let s = 1; s < free.length; s++) if ((free[s] as number) < (free[k] as number)) k = s;
        const startAt = free[k] as number;
        free[k] = startAt + runMs;
        planned.set(id, { position: i + 1, startAt, endAt: startAt + runMs });
        tail = { position: i + 1, startAt, meanMs: sum / (i + 1) };
      });
    }
    this.gen += 1;
    this.snap = {
      at: now,
      generation: this.gen,
      model,
      running,
      waiting: order.waiting,
      planned,
      tail,
    };
    return this.snap;
  }
}

/**
 * A predicted time in whole seconds: finer would be noise, and an answer that changes
 * only when its estimate moves by a second lets a poll's ETag stay the same meanwhile.
 */
function seconds(ms: number): number {
  return Math.round(ms / 1000) * 1000;
}

/** Sizes the workers have seen of `fileIds` (absent: never seen). */
async function knownSizes(
  redis: RedisClient,
  keys: RedisKeys,
  fileIds: readonly number[],
): Promise<Map<number, number>> {
  const out = new Map<number, number>();
  if (fileIds.length === 0) return out;
  const values = await redis.hmget(keys.fileSizes, ...fileIds.map(String));
  fileIds.forEach((id, i) => {
    const v = values[i];
    if (v !== null && v !== undefined) out.set(id, Number(v));
  });
  return out;
}

/** A job's bytes: the known sizes, and the measured mean for files never seen. */
function sizeOf(model: RunModel, fileIds: readonly number[], sizes: Map<number, number>): number {
  let bytes = 0;
  for (const id of fileIds) bytes += sizes.get(id) ?? model.meanFileBytes;
  return bytes;
}

/**
 * What is left of a running job, in ms: the model's whole run less the time it has run,
 * and the job's own recent rate over its bytes left, trusted more as the job advances.
 */
export function remainingMs(
  model: RunModel,
  rec: Pick<JobRecord, "progress" | "startedAt">,
  now: number,
): number {
  // From the progress alone: a running job's per-file state lives apart (job-store.ts).
  const p = rec.progress;
  const bytesTotal = p.bytesTotal;
  const whole = predictRunMs(model, p.filesTotal, bytesTotal);
  const elapsed = rec.startedAt !== undefined ? Math.max(0, now - rec.startedAt) : 0;
  const byModel = whole - elapsed;
  const done = bytesTotal > 0 ? Math.min(1, p.bytesDone / bytesTotal) : 0;
  const byRate =
    p.bytesPerSecond > 0 && bytesTotal > 0
      ? ((bytesTotal - p.bytesDone) / p.bytesPerSecond) * 1000
      : undefined;
  if (byRate === undefined) return Math.max(byModel, whole * 0.05);
  if (byModel <= 0) return byRate;
  return (1 - done) * byModel + done * byRate;
}
