import { createServer } from "node:net";
import { describe, expect, test } from "vitest";
import { freePort, StopWaiting, waitUntil } from "../local/ports.js";
import { startRedis } from "../local/redis-server.js";

// The waits every local server (Redis, PostgreSQL, nginx, the API and workers started as
// processes) is started with: a process that exited ends the wait at once with its own
// output, instead of the wait running to its deadline and saying only "not ready".

describe("waitUntil", () => {
  test("keeps polling through a probe's ordinary errors", async () => {
    let calls = 0;
    await waitUntil("third time", async () => {
      calls++;
      if (calls < 3) throw new Error("connection refused");
      return true;
    });
    expect(calls).toBe(3);
  });

  test("gives up at once when the probe says waiting is pointless", async () => {
    let calls = 0;
    const waiting = waitUntil(
      "a server that exited",
      async () => {
        calls++;
        throw new StopWaiting("redis-server exited: bind: Address already in use");
      },
      // Far beyond the test's own timeout: only giving up at once passes.
      3_600_000,
    );
    await expect(waiting).rejects.toThrow(/redis-server exited: bind: Address already in use/);
    expect(calls).toBe(1);
  });
});

describe("a local redis-server whose port is taken", () => {
  test("fails at once with redis-server's own reason, not at the deadline", async () => {
    const port = await freePort();
    const holder = createServer().listen(port, "127.0.0.1");
    await new Promise((r) => holder.once("listening", r));
    try {
      // A fixed port is not retried elsewhere: the caller asked for that one.
      const err = await startRedis({ port }).then(
        (r) => {
          void r.stop();
          return undefined;
        },
        (e: unknown) => e,
      );
      expect(err).toBeInstanceOf(StopWaiting);
      expect((err as Error).message).toMatch(/address already in use/i);
    } finally {
      holder.close();
    }
  });
});
