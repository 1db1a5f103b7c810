import { connect, type Socket } from "node:net";

// A minimal HTTP/1.1 client over keep-alive sockets, for the job-overhead benchmark's
// closed loop: one request at a time per connection, Content-Length request bodies,
// Content-Length or chunked answers, no redirects, no TLS. node:http's client costs the
// load generator about as much CPU per job as the API spends serving it, on the same
// two cores; like the C load generators of the polling benchmark, this one keeps the
// measurement about the servers. Built for talking to our own API and nothing else.

export interface Http1Answer {
  status: number;
  /** The whole body, when no onData callback took it. */
  body: Buffer;
}

const CRLF = Buffer.from("\r\n");
const HEAD_END = Buffer.from("\r\n\r\n");

class Connection {
  private buf: Buffer = Buffer.alloc(0);
  private current:
    | {
        resolve(a: Http1Answer): void;
        reject(e: Error): void;
        onData: ((chunk: Buffer) => void) | undefined;
        status: number;
        /** Content-Length left, -1 for chunked, undefined before the head. */
        left: number | undefined;
        chunkLeft: number;
        parts: Buffer[];
      }
    | undefined;
  private failure: Error | undefined;

  constructor(private readonly socket: Socket) {
    socket.setNoDelay(true);
    socket.on("data", (d: Buffer) => {
      this.buf = this.buf.length === 0 ? d : Buffer.concat([this.buf, d]);
      this.parse();
    });
    const fail = (err: Error) => {
      this.failure = err;
      this.current?.reject(err);
      this.current = undefined;
    };
    socket.on("error", fail);
    socket.on("close", () => fail(new Error("connection closed")));
  }

  request(head: string, body: Buffer, onData?: (chunk: Buffer) => void): Promise<Http1Answer> {
    if (this.failure !== undefined) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => {
      this.current = {
        resolve,
        reject,
        onData,
        status: 0,
        left: undefined,
        chunkLeft: 0,
        parts: [],
      };
      this.socket.write(
        Buffer.concat([
          Buffer.from(`${head}Content-Length: ${body.length}\r\n\r\n`, "latin1"),
          body,
        ]),
      );
    });
  }

  close(): void {
    this.socket.destroy();
  }

  private deliver(data: Buffer): void {
    const c = this.current;
    if (c === undefined || data.length === 0) return;
    if (c.onData !== undefined) c.onData(data);
    else c.parts.push(data);
  }

  private parse(): void {
    for (;;) {
      const c = this.current;
      if (c === undefined) return;
      if (c.left === undefined) {
        const end = this.buf.indexOf(HEAD_END);
        if (end === -1) return;
        const head = this.buf.subarray(0, end).toString("latin1");
        this.buf = this.buf.subarray(end + 4);
        c.status = Number(head.slice(9, 12));
        const length = /\r\ncontent-length:\s*(\d+)/i.exec(head);
        c.left = /\r\ntransfer-encoding:\s*chunked/i.test(head) ? -1 : Number(length?.[1] ?? 0);
        continue;
      }
      if (c.left >= 0) {
        const take = Math.min(c.left, this.buf.length);
        this.deliver(this.buf.subarray(0, take));
        this.buf = this.buf.subarray(take);
        c.left -= take;
        if (c.left > 0) return;
        this.finish();
        continue;
      }
      // Chunked: a size line, then that many bytes and CRLF; size 0 ends (no trailers).
      if (c.chunkLeft > 0) {
        if (this.buf.length < c.chunkLeft + 2) return;
        this.deliver(this.buf.subarray(0, c.chunkLeft));
        this.buf = this.buf.subarray(c.chunkLeft + 2);
        c.chunkLeft = 0;
        continue;
      }
      const line = this.buf.indexOf(CRLF);
      if (line === -1) return;
      const size = Number.parseInt(this.buf.subarray(0, line).toString("latin1"), 16);
      if (size === 0) {
        if (this.buf.length < line + 4) return;
        this.buf = this.buf.subarray(line + 4);
        this.finish();
        continue;
      }
      this.buf = this.buf.subarray(line + 2);
      c.chunkLeft = size;
    }
  }

  private finish(): void {
    const c = this.current;
    this.current = undefined;
    c?.resolve({ status: c.status, body: Buffer.concat(c.parts) });
  }
}

/** `size` keep-alive connections to host:port, handed out one request at a time. */
export class Http1Pool {
  private readonly free: Connection[] = [];
  private readonly all: Connection[] = [];

  private constructor(private readonly host: string) {}

  static async open(port: number, size: number, host = "127.0.0.1"): Promise<Http1Pool> {
    const pool = new Http1Pool(`${host}:${port}`);
    for (let i = 0; i < size; i++) {
      const socket = connect(port, host);
      await new Promise<void>((resolve, reject) =>
        socket.once("connect", resolve).once("error", reject),
      );
      const conn = new Connection(socket);
      pool.free.push(conn);
      pool.all.push(conn);
    }
    return pool;
  }

  /** POSTs `body`; `onData` receives the body as it arrives (else it is in the answer). */
  async post(
    path: string,
    contentType: string,
    body: Buffer,
    onData?: (chunk: Buffer) => void,
  ): Promise<Http1Answer> {
    const conn = this.free.pop();
    if (conn === undefined)
      throw new Error("no free connection: more requests in flight than connections");
    try {
      return await conn.request(
        `POST ${path} HTTP/1.1\r\nHost: ${this.host}\r\nContent-Type: ${contentType}\r\n`,
        body,
        onData,
      );
    } finally {
      this.free.push(conn);
    }
  }

  close(): void {
    for (const c of this.all) c.close();
  }
}
