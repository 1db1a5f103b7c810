import type { Logger } from "pino";
import { FilesFollower, type JobStore } from "../core/job-store.js";
import {
  BackendUnavailableError,
  isTerminal,
  JobNotFoundError,
  type JobRecord,
} from "../core/jobs.js";
import { onSubscriptionsRestored, type RedisClient, untilSubscribable } from "../core/redis.js";

// One Redis subscriber connection per API process, fanned out in memory to every
// WatchJob stream. A connection (or a BullMQ QueueEvents) per stream does not survive
// ten thousand watchers; here a stream costs one small object and a Set entry.
//
// Per-job channels are subscribed with reference counting: the first watcher of a job
// subscribes, the last one to leave unsubscribes. Each published record is decoded once
// and the same object is handed to every stream of that job.
//
// Pub/sub is not a log: what is published while the subscription is down (a reconnect,
// a failover to a replica, the cluster moving its pub/sub connection) is gone. Two
// things make a watcher miss nothing anyway: a message whose version is more than one
// past the last one seen means something was lost, and a subscription that was
// re-established may have lost anything; both re-read the job's record and send it.

/** How long an unwatched channel may stay subscribed, so that its UNSUBSCRIBE is shared. */
const UNSUBSCRIBE_BATCH_MS = 100;

/** Channels per SUBSCRIBE when every watched job is subscribed again at once. */
const RESUBSCRIBE_CHUNK = 1000;

/** A failed re-read of a record (Redis still failing over) is tried again after this. */
const REFRESH_RETRY_MS = 500;

/**
 * A watched job that nothing was heard of for this many heartbeat intervals is re-read:
 * a safety net under the gap and reconnect checks, for a change lost in a way neither
 * sees (the last message before a job's end, lost without a reconnect being noticed).
 */
const SILENT_HEARTBEATS_BEFORE_REREAD = 4;

/** At most this many of those re-reads per tick of the heartbeat timer. */
const SILENT_REREADS_PER_TICK = 200;

export type WatchEvent =
  | { job: JobRecord; heartbeat?: undefined }
  | { heartbeat: Beat; job?: undefined };

export interface Beat {
  time: number;
  version: number;
  /**
   * The stream's job as last sent, while it is queued: the queue moves on without a new
   * version, so the transport adds the job's fresh estimate to the heartbeat.
   */
  queued?: JobRecord;
}

export interface WatchHubOptions {
  /** A heartbeat is sent on a stream after this long without a message. */
  heartbeatMs: number;
  /**
   * A stream whose job is queued gets its heartbeat this much sooner (0 or absent: no
   * sooner), each one carrying the record, so the answer can say where the job stands.
   */
  queuedHeartbeatMs?: number;
  /**
   * A stream older than this ends cleanly (OK) right after a message, so the client
   * reconnects with the latest version before a proxy's hard request limit cuts it;
   * 0 (the default) is off.
   */
  maxStreamMs?: number;
  /** How long a new watch waits for its channel subscription before UNAVAILABLE. */
  subscribeTimeoutMs?: number;
  log: Logger;
}

/** The state of one stream; kept small on purpose, there may be tens of thousands. */
interface Watcher {
  /** Highest version sent on this stream (or the caller's after_version). */
  last: number;
  /** The job's version as this stream knows it, reported in heartbeats. */
  version: number;
  /** The job as last sent on this stream while it is QUEUED; undefined otherwise. */
  queued: JobRecord | undefined;
  /** Records not yet sent, oldest first; consecutive ones in one state are coalesced. */
  pending: JobRecord[];
  sentAt: number;
  /** When the stream is to end (WATCH_MAX_STREAM_MS); Infinity when it never does. */
  endAt: number;
  heartbeatDue: boolean;
  failure: unknown;
  wake: (() => void) | undefined;
}

interface Topic {
  jobId: string;
  watchers: Set<Watcher>;
  /** Resolves to undefined once subscribed, or to the error that prevented it. */
  subscribed: Promise<Error | undefined>;
  /** Highest version of the job this process has received or read; 0 before any. */
  version: number;
  /** A re-read of the record is under way (one at a time per job). */
  refreshing: boolean;
  /** The job's per-file state: messages carry only the files that changed. */
  files: FilesFollower;
  /** A message of this version could not be offered: a re-read must reach it. */
  readAtLeast: number;
  /**
   * Another re-read was asked for while one was under way: that one may have read the
   * record before the change that prompted this request, so it runs again once done.
   */
  again: boolean;
  /** When a message or a re-read of this job last arrived (Date.now()). */
  heardAt: number;
}

/** One open stream, as watch() and follow() hold it. */
interface Stream {
  jobId: string;
  w: Watcher;
  signal: AbortSignal;
  onAbort: () => void;
  channel: string;
  topic: Topic;
}

/** An event for a stream, and whether the stream ends after it. */
interface Step {
  event: WatchEvent;
  end: boolean;
}

function wake(w: Watcher): void {
  const resolve = w.wake;
  w.wake = undefined;
  resolve?.();
}

/**
 * Queues a record for a stream. Never drops a state change; within one state only the
 * latest matters. An end is never dropped either, even at a version the stream has
 * passed: an open stream has sent no end yet, so the record went back (its latest writes
 * were lost with a failed primary, and the job went on from an older version), and
 * without it the watcher would wait for ever.
 */
function offer(w: Watcher, rec: JobRecord): void {
  const end = isTerminal(rec.state);
  if (rec.version <= w.last && !end) return;
  const n = w.pending.length;
  const tail = n > 0 ? w.pending[n - 1] : undefined;
  if (tail !== undefined) {
    if (isTerminal(tail.state)) return;
    if (rec.version <= tail.version && !end) return;
    if (tail.state === rec.state) {
      w.pending[n - 1] = rec;
      wake(w);
      return;
    }
  }
  w.pending.push(rec);
  wake(w);
}

export class WatchHub {
  private readonly topics = new Map<string, Topic>();
  /** Channels to subscribe in this turn of the event loop, and the promise of their SUBSCRIBE. */
  private subscribing: { channels: string[]; done: Promise<Error | undefined> } | undefined;
  /**
   * Channels no watcher needs any more, unsubscribed together shortly: with their
   * subscription (which may not have taken effect yet) and the subscription connection's
   * generation when they were left (see join).
   */
  private readonly unsubscribing = new Map<
    string,
    { subscribed: Promise<Error | undefined>; generation: number }
  >();
  /** Counts the subscription connection's restorations (resync). */
  private generation = 0;
  private unsubscribeTimer: NodeJS.Timeout | undefined;
  private readonly watchers = new Set<Watcher>();
  private readonly subscribeTimeoutMs: number;
  private readonly maxStreamMs: number;
  private readonly tickMs: number;
  private readonly queuedBeatMs: number;
  private ticker: NodeJS.Timeout | undefined;
  private closedWith: unknown;
  /**
   * Every (UN)SUBSCRIBE goes through this chain, one at a time: a burst of new watches
   * then shares one command, and none is written during a connection's handshake
   * (see untilSubscribable).
   */
  private commands: Promise<unknown> = Promise.resolve();

  constructor(
    private readonly sub: RedisClient,
    private readonly store: JobStore,
    private readonly opts: WatchHubOptions,
  ) {
    this.subscribeTimeoutMs = opts.subscribeTimeoutMs ?? 3000;
    this.maxStreamMs = opts.maxStreamMs ?? 0;
    // One shared ticker instead of a timer per stream; a heartbeat (or the end of an
    // expired stream) is late by at most one tick (a fifth of the shorter interval,
    // never more than a second).
    const shortest =
      this.maxStreamMs > 0 ? Math.min(opts.heartbeatMs, this.maxStreamMs) : opts.heartbeatMs;
    // A queued job's estimate may come up to half its interval late.
    this.queuedBeatMs = Math.min(opts.heartbeatMs, opts.queuedHeartbeatMs || opts.heartbeatMs);
    this.tickMs = Math.max(
      10,
      Math.min(1000, Math.floor(shortest / 5), Math.floor(this.queuedBeatMs / 2)),
    );
    sub.on("message", (channel: string, message: string) => this.onMessage(channel, message));
    onSubscriptionsRestored(sub, () => this.resync());
  }

  /** Streams currently open and jobs currently subscribed, for tests and metrics. */
  get size(): { watchers: number; jobs: number } {
    return { watchers: this.watchers.size, jobs: this.topics.size };
  }

  /**
   * The snapshot (unless the caller has already seen its version, then a heartbeat at
   * once), then every change, then nothing after a terminal state. Throws
   * JobNotFoundError before the first event for an unknown job, or one that belongs to
   * someone other than `owner` (when given). Ends when `signal` aborts (the client hung
   * up) and releases everything it held.
   */
  async *watch(
    jobId: string,
    afterVersion: number,
    signal: AbortSignal,
    owner?: string,
  ): AsyncGenerator<WatchEvent> {
    const stream = this.enter(jobId, afterVersion, signal);
    const { w } = stream;
    try {
      const first = await this.open(stream, owner);
      if (first === undefined) return;
      yield first.event;
      if (first.end) return;
      for (;;) {
        if (w.failure !== undefined) throw w.failure;
        if (signal.aborted) return;
        const next = this.step(w);
        if (next !== undefined) {
          yield next.event;
          if (next.end) return;
          continue;
        }
        await new Promise<void>((resolve) => {
          w.wake = resolve;
        });
      }
    } finally {
      this.exit(stream);
    }
  }

  /**
   * watch() handing each event straight to `sink` instead of through an async
   * generator: the transport writes it in the same turn as the message that brought it,
   * with no promise hop per event (the fan-out's hot path). `sink` returns a promise
   * when it cannot take the next event yet (a full socket); the events due meanwhile are
   * held and coalesced as for a slow reader. Resolves once the stream is over (its end
   * sent, `signal` aborted); rejects as watch() throws.
   *
   * (Added for the lean transport; watch() stays as it was, for connect-node and the
   * long-poll.)
   */
  async follow(
    jobId: string,
    afterVersion: number,
    signal: AbortSignal,
    owner: string | undefined,
    sink: (event: WatchEvent) => undefined | Promise<unknown>,
  ): Promise<void> {
    const stream = this.enter(jobId, afterVersion, signal);
    const { w } = stream;
    try {
      let next = await this.open(stream, owner);
      while (next !== undefined) {
        const busy = sink(next.event);
        if (busy !== undefined) await busy;
        if (next.end) return;
        for (;;) {
          if (w.failure !== undefined) throw w.failure;
          if (signal.aborted) return;
          next = this.step(w);
          if (next !== undefined) break;
          await new Promise<void>((resolve) => {
            w.wake = resolve;
          });
        }
      }
    } finally {
      this.exit(stream);
    }
  }

  /** A new stream's watcher, joined to its job's topic (and so counted) at once. */
  private enter(jobId: string, afterVersion: number, signal: AbortSignal): Stream {
    if (this.closedWith !== undefined) throw this.closedWith;
    const now = Date.now();
    const w: Watcher = {
      last: afterVersion,
      version: 0,
      queued: undefined,
      pending: [],
      sentAt: now,
      endAt: this.maxStreamMs > 0 ? now + this.maxStreamMs : Number.POSITIVE_INFINITY,
      heartbeatDue: false,
      failure: undefined,
      wake: undefined,
    };
    const onAbort = () => wake(w);
    signal.addEventListener("abort", onAbort, { once: true });
    const channel = this.store.channel(jobId);
    return { jobId, w, signal, onAbort, channel, topic: this.join(channel, jobId, w) };
  }

  private exit(stream: Stream): void {
    stream.signal.removeEventListener("abort", stream.onAbort);
    this.leave(stream.channel, stream.topic, stream.w);
  }

  /**
   * The stream's first event: its snapshot, or a heartbeat when the caller has seen
   * that version; undefined when the caller left meanwhile.
   */
  private async open(stream: Stream, owner: string | undefined): Promise<Step | undefined> {
    const { w, topic, jobId, signal } = stream;
    // Subscribe before reading the snapshot, or a change between the two is lost.
    await this.awaitSubscribed(topic);
    const snapshot = await this.store.get(jobId);
    topic.version = Math.max(topic.version, snapshot.version);
    topic.files.base(snapshot);
    // Someone else's job looks exactly like a missing one.
    if (owner !== undefined && snapshot.owner !== owner) throw new JobNotFoundError(jobId);
    if (w.failure !== undefined) throw w.failure;
    if (signal.aborted) return undefined;
    w.version = snapshot.version;
    let event: WatchEvent;
    if (snapshot.version > w.last) {
      w.last = snapshot.version;
      event = this.sent(w, { job: snapshot });
    } else {
      // The caller has seen this version: tell it at once that the stream is alive.
      w.queued = snapshot.state === "QUEUED" ? snapshot : undefined;
      event = this.sent(w, { heartbeat: this.beat(w) });
    }
    return { event, end: isTerminal(snapshot.state) || this.expired(w) };
  }

  /** The stream's next event if one is due now (a change, or a heartbeat). */
  private step(w: Watcher): Step | undefined {
    for (let rec = w.pending.shift(); rec !== undefined; rec = w.pending.shift()) {
      if (rec.version <= w.last && !isTerminal(rec.state)) continue;
      w.last = Math.max(w.last, rec.version);
      w.version = rec.version;
      return { event: this.sent(w, { job: rec }), end: isTerminal(rec.state) || this.expired(w) };
    }
    if (w.heartbeatDue) {
      // Ending right after a message: the client holds the latest version to resume from.
      const event = this.sent(w, { heartbeat: this.beat(w) });
      return { event, end: this.expired(w) };
    }
    return undefined;
  }

  private beat(w: Watcher): Beat {
    const beat: Beat = { time: Date.now(), version: w.version };
    if (w.queued !== undefined) beat.queued = w.queued;
    return beat;
  }

  /**
   * Ends every open stream with `reason` (the server passes UNAVAILABLE so clients
   * reconnect elsewhere) and refuses new ones. The caller closes the connection.
   */
  close(reason: unknown): void {
    this.closedWith = reason;
    for (const w of this.watchers) {
      w.failure = reason;
      wake(w);
    }
    this.stopTicker();
    clearTimeout(this.unsubscribeTimer);
  }

  private expired(w: Watcher): boolean {
    return Date.now() >= w.endAt;
  }

  private sent(w: Watcher, event: WatchEvent): WatchEvent {
    w.sentAt = Date.now();
    w.heartbeatDue = false;
    if (event.job !== undefined) w.queued = event.job.state === "QUEUED" ? event.job : undefined;
    return event;
  }

  private join(channel: string, jobId: string, w: Watcher): Topic {
    let topic = this.topics.get(channel);
    if (topic === undefined) {
      const created: Topic = {
        jobId,
        watchers: new Set(),
        subscribed: Promise.resolve(undefined),
        version: 0,
        refreshing: false,
        files: new FilesFollower(),
        readAtLeast: 0,
        again: false,
        heardAt: Date.now(),
      };
      // Still subscribed from a watcher that left a moment ago: keep that subscription
      // (and wait for it, if its SUBSCRIBE is still on the way). Not across a restored
      // connection, though: the client library re-subscribes it there by itself, but
      // nothing says when that has taken effect, and a snapshot read before it could
      // miss a change. Subscribing again costs one shared command.
      const left = this.unsubscribing.get(channel);
      this.unsubscribing.delete(channel);
      created.subscribed =
        left !== undefined && left.generation === this.generation
          ? left.subscribed
          : this.subscribeSoon(channel);
      created.subscribed.then((err) => {
        // Let the next watcher try again rather than inherit a failed subscription.
        if (err !== undefined && this.topics.get(channel) === created) this.topics.delete(channel);
      });
      this.topics.set(channel, created);
      topic = created;
    }
    topic.watchers.add(w);
    this.watchers.add(w);
    if (this.ticker === undefined) {
      this.ticker = setInterval(() => this.tick(), this.tickMs);
      this.ticker.unref();
    }
    return topic;
  }

  /**
   * Subscribes `channel` together with every other channel asked for in the same turn
   * of the event loop: one SUBSCRIBE (one write, one round trip) for a burst of new
   * watches instead of one each. Resolves to undefined once subscribed, or to the error.
   */
  private subscribeSoon(channel: string): Promise<Error | undefined> {
    let batch = this.subscribing;
    if (batch === undefined) {
      const channels: string[] = [];
      // The batch takes channels until its command is about to be written.
      const done = new Promise<void>((resolve) => setImmediate(resolve)).then(() =>
        this.command(() => {
          if (this.subscribing === batch) this.subscribing = undefined;
          return this.sub.subscribe(...channels);
        }),
      );
      batch = {
        channels,
        done: done.then(
          () => undefined,
          (err: unknown) => (err instanceof Error ? err : new Error(String(err))),
        ),
      };
      this.subscribing = batch;
    }
    batch.channels.push(channel);
    return batch.done;
  }

  private leave(channel: string, topic: Topic, w: Watcher): void {
    topic.watchers.delete(w);
    this.watchers.delete(w);
    if (topic.watchers.size === 0 && this.topics.get(channel) === topic) {
      this.topics.delete(channel);
      if (this.closedWith === undefined) this.unsubscribeLater(channel, topic.subscribed);
    }
    if (this.watchers.size === 0) this.stopTicker();
  }

  /**
   * Unsubscribes a channel nobody watches any more, batched with the others of the next
   * UNSUBSCRIBE_BATCH_MS: a finished job's channel carries nothing more, so there is no
   * hurry, and one command for a few dozen channels spares a write per job. A watcher
   * that comes back to the channel meanwhile takes it over (join).
   */
  private unsubscribeLater(channel: string, subscribed: Promise<Error | undefined>): void {
    this.unsubscribing.set(channel, { subscribed, generation: this.generation });
    if (this.unsubscribeTimer !== undefined) return;
    this.unsubscribeTimer = setTimeout(() => {
      this.unsubscribeTimer = undefined;
      const channels = [...this.unsubscribing.keys()];
      this.unsubscribing.clear();
      // Commands on one connection run in order, so a channel subscribed again after
      // this still ends up subscribed, provided its SUBSCRIBE is written after this
      // UNSUBSCRIBE: the batch still taking channels is queued before it, so it takes
      // no more (a watcher of one of these channels joining it would be subscribed,
      // then unsubscribed, and would never hear of its job again).
      if (channels.length > 0 && this.closedWith === undefined) {
        this.subscribing = undefined;
        this.command(() => this.sub.unsubscribe(...channels)).catch((err: unknown) =>
          this.opts.log.debug({ err }, "unsubscribe failed"),
        );
      }
    }, UNSUBSCRIBE_BATCH_MS);
    this.unsubscribeTimer.unref();
  }

  /** Runs a subscription command after the previous one has settled. */
  private command<T>(send: () => Promise<T>): Promise<T> {
    const result = this.commands.then(() => untilSubscribable(this.sub)).then(send);
    this.commands = result.catch(() => undefined);
    return result;
  }

  private async awaitSubscribed(topic: Topic): Promise<void> {
    // While the events connection is down a new watch would see no change until it is
    // back: better UNAVAILABLE now, so the client retries (perhaps on another instance).
    if (this.sub.status !== "ready") {
      throw new BackendUnavailableError(`job events connection is ${this.sub.status}`);
    }
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<Error>((resolve) => {
      timer = setTimeout(
        () => resolve(new Error(`no subscription after ${this.subscribeTimeoutMs} ms`)),
        this.subscribeTimeoutMs,
      );
    });
    try {
      const err = await Promise.race([topic.subscribed, timeout]);
      if (err !== undefined) {
        throw new BackendUnavailableError(`cannot follow job events: ${err.message}`, {
          cause: err,
        });
      }
    } finally {
      clearTimeout(timer);
    }
  }

  private onMessage(channel: string, message: string): void {
    const topic = this.topics.get(channel);
    if (topic === undefined) return;
    let rec: JobRecord | undefined;
    let flat: Record<string, string>;
    try {
      flat = JSON.parse(message) as Record<string, string>;
      rec = topic.files.event(flat);
    } catch (err) {
      this.opts.log.warn({ err, channel }, "undecodable job event");
      return;
    }
    if (rec === undefined) {
      // Its files are a change to a version not known here: read the whole record.
      const version = Number(flat.version);
      topic.version = Math.max(topic.version, version);
      topic.readAtLeast = Math.max(topic.readAtLeast, version);
      this.refresh(topic);
      return;
    }
    // Every change is published with a version one higher than the last: a jump means
    // a message was lost (a failover, a reconnect) and the record has to be read.
    const gap = topic.version > 0 && rec.version > topic.version + 1;
    topic.version = Math.max(topic.version, rec.version);
    topic.heardAt = Date.now();
    for (const w of topic.watchers) offer(w, rec);
    if (gap) this.refresh(topic);
  }

  /**
   * After the subscription connection came back: subscribe every watched channel again
   * (ioredis re-subscribes by itself, but on a cluster it gives up silently if that
   * fails), then re-read every watched job, so what was published meanwhile still
   * reaches its watchers.
   */
  private resync(): void {
    if (this.closedWith !== undefined) return;
    this.generation += 1;
    const topics = [...this.topics.entries()];
    this.opts.log.info({ jobs: topics.length }, "job events connection restored, re-reading");
    const subscribed: Promise<unknown>[] = [];
    for (let i = 0; i < topics.length; i += RESUBSCRIBE_CHUNK) {
      const channels = topics.slice(i, i + RESUBSCRIBE_CHUNK).map(([channel]) => channel);
      subscribed.push(this.command(() => this.sub.subscribe(...channels)));
    }
    Promise.allSettled(subscribed).then(() => {
      for (const [, topic] of topics) this.refresh(topic);
    });
  }

  /**
   * Re-reads one job's record and offers it to its watchers; retried while Redis fails.
   * Asked for while a re-read is under way, it runs once more after that one: the read
   * under way may have been answered before the change that prompted this request.
   */
  private refresh(topic: Topic): void {
    if (topic.watchers.size === 0 || this.closedWith !== undefined) return;
    if (topic.refreshing) {
      topic.again = true;
      return;
    }
    topic.refreshing = true;
    topic.again = false;
    this.store.get(topic.jobId).then(
      (rec) => {
        topic.refreshing = false;
        topic.version = Math.max(topic.version, rec.version);
        topic.heardAt = Date.now();
        topic.files.base(rec);
        for (const w of topic.watchers) offer(w, rec);
        // Asked again meanwhile, or a message came while this read was under way and it
        // read an older version.
        if (topic.again || (rec.version < topic.readAtLeast && !isTerminal(rec.state)))
          this.refresh(topic);
      },
      (err: unknown) => {
        topic.refreshing = false;
        this.opts.log.debug({ err, jobId: topic.jobId }, "re-reading a watched job failed");
        if (err instanceof JobNotFoundError) return;
        setTimeout(() => this.refresh(topic), REFRESH_RETRY_MS).unref();
      },
    );
  }

  private tick(): void {
    const now = Date.now();
    const due = now - this.opts.heartbeatMs;
    const queuedDue = now - this.queuedBeatMs;
    for (const w of this.watchers) {
      // An expired stream idle right now gets a heartbeat, after which it ends.
      const idle = w.sentAt <= (w.queued !== undefined ? queuedDue : due);
      if (!w.heartbeatDue && (idle || now >= w.endAt) && w.pending.length === 0) {
        w.heartbeatDue = true;
        wake(w);
      }
    }
    // Re-read the jobs nothing was heard of for a while, a bounded number per tick so
    // that thousands of idle jobs watched since the same moment are spread out.
    const silentSince = now - SILENT_HEARTBEATS_BEFORE_REREAD * this.opts.heartbeatMs;
    let budget = SILENT_REREADS_PER_TICK;
    for (const topic of this.topics.values()) {
      if (topic.heardAt <= silentSince && topic.watchers.size > 0) {
        topic.heardAt = now;
        this.refresh(topic);
        if (--budget === 0) break;
      }
    }
  }

  private stopTicker(): void {
    if (this.ticker !== undefined) clearInterval(this.ticker);
    this.ticker = undefined;
  }
}
