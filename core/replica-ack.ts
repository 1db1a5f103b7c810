import { Cluster, type Redis } from "ioredis";
import { BackendUnavailableError } from "./jobs.js";
import type { RedisClient } from "./redis.js";

// REDIS_MIN_REPLICAS_ACK: an acknowledged job must survive the loss of the primary, so
// Initiate answers only once enough replicas hold it (Redis WAIT). Replication is
// asynchronous; without this, a job written a moment before a failover can vanish
// although the caller has its id.
//
// WAIT counts the replicas that have acknowledged the *calling connection's* last
// write, and it blocks that connection while it waits. So it runs on a connection of
// its own: it writes a small marker key (in the queue's hash slot, hence on the same
// primary as the job), and since a primary's replication stream is one ordered log, a
// replica that has the marker also has every write the API made before it, the job
// included. Callers that arrive while a round is pending share it (a group commit):
// one WAIT per round trip, whatever the rate of Initiate.

export interface ReplicaAckOptions {
  /** QUEUE_PREFIX: the marker key shares the queue's hash tag. */
  prefix: string;
  /** How many replicas must acknowledge. */
  replicas: number;
  timeoutMs: number;
}

export class ReplicaAck {
  /** The round that has not started yet; new callers join it. */
  private pending: Promise<void> | undefined;
  /** The round in flight (settled or not); the next one starts after it. */
  private last: Promise<void> = Promise.resolve();
  private slot: number | undefined;
  private marker = 0;
  private readonly key: string;

  /** `conn` is used for nothing else (WAIT blocks it). */
  constructor(
    private readonly conn: RedisClient,
    private readonly opts: ReplicaAckOptions,
  ) {
    this.key = `${opts.prefix}:replica-ack`;
  }

  /**
   * Resolves once `replicas` replicas hold every write this process had completed
   * before the call; BackendUnavailableError when they do not within the timeout.
   */
  wait(): Promise<void> {
    if (this.pending === undefined) {
      const round = this.last.then(() => {
        this.pending = undefined;
        return this.round();
      });
      this.pending = round;
      this.last = round.catch(() => undefined);
    }
    return this.pending;
  }

  private async round(): Promise<void> {
    const node = await this.primary();
    this.marker += 1;
    await node.set(this.key, String(this.marker), "EX", 3600);
    const acked = Number(await node.wait(this.opts.replicas, this.opts.timeoutMs));
    if (acked < this.opts.replicas) {
      throw new BackendUnavailableError(
        `only ${acked} of the ${this.opts.replicas} required Redis replicas acknowledged the write`,
      );
    }
  }

  /** The connection to the primary that holds the queue's hash slot. */
  private async primary(): Promise<Redis> {
    if (!(this.conn instanceof Cluster)) return this.conn;
    this.slot ??= Number(await this.conn.cluster("KEYSLOT", this.key));
    const owner = this.conn.slots[this.slot]?.[0];
    const node = this.conn
      .nodes("master")
      .find((n) => `${n.options.host}:${n.options.port}` === owner);
    if (node === undefined) {
      throw new BackendUnavailableError("no Redis primary holds the queue's hash slot right now");
    }
    return node;
  }
}
