import { connect, createServer } from "node:net";

/**
 * Ports handed out by freePort: below Linux's ephemeral range (32768-60999), where the
 * OS takes ports for bind(0) and for the local end of every outgoing connection. A port
 * the OS picked is free when we look, but a process that binds it seconds later (tsx
 * starting on a busy machine) found it taken by some connection: EADDRINUSE. Redis
 * Cluster also binds port + 10000, which stays below the range as well.
 */
const PICK_FROM = 10_000;
const PICK_TO = 22_767;

/** A port that was free a moment ago on 127.0.0.1. */
export async function freePort(): Promise<number> {
  for (let i = 0; i < 50; i++) {
    const port = PICK_FROM + Math.floor(Math.random() * (PICK_TO - PICK_FROM));
    if ((await bindable(port)) !== undefined) return port;
  }
  const port = await bindable(0);
  if (port === undefined) throw new Error("no free port on 127.0.0.1");
  return port;
}

/** The port bound (then released) on 127.0.0.1, or undefined when it is taken. */
function bindable(port: number): Promise<number | undefined> {
  return new Promise((resolve) => {
    const srv = createServer();
    srv.unref();
    srv.on("error", () => resolve(undefined));
    srv.listen(port, "127.0.0.1", () => {
      const addr = srv.address();
      const bound = typeof addr === "object" && addr !== null ? addr.port : undefined;
      srv.close(() => resolve(bound));
    });
  });
}

/**
 * What a waitUntil probe throws when waiting longer is pointless (the process it waits
 * for has exited): waitUntil gives up at once with it. Any other error of a probe (a
 * refused connection) only means "not yet".
 */
export class StopWaiting extends Error {}

/** Whether a server's output says the port it was given was taken before it could bind. */
function portTaken(output: string): boolean {
  return /address already in use|EADDRINUSE/i.test(output);
}

/**
 * `start()` again (at most three times in all) while it fails because its server exited
 * saying its port was taken: a port freePort found free can be bound by someone else
 * (another test file starting its servers) before the server binds it. `start` picks
 * its ports with freePort each time.
 */
export async function onFreshPorts<T>(start: () => Promise<T>): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await start();
    } catch (err) {
      if (!(err instanceof StopWaiting && portTaken(err.message) && attempt < 3)) throw err;
    }
  }
}

/** Polls until `probe` resolves true or the deadline passes; never sleeps blindly. */
export async function waitUntil(
  what: string,
  probe: () => Promise<boolean>,
  timeoutMs = 60_000,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let delay = 10;
  while (Date.now() < deadline) {
    const ok = await probe().catch((err: unknown) => {
      if (err instanceof StopWaiting) throw err;
      return false;
    });
    if (ok) return;
    await new Promise((r) => setTimeout(r, delay));
    delay = Math.min(delay * 2, 200);
  }
  throw new Error(`${what} not ready after ${timeoutMs} ms`);
}

/** True when a TCP connection to host:port succeeds. */
export function canConnect(port: number, host = "127.0.0.1"): Promise<boolean> {
  return new Promise((resolve) => {
    const sock = connect({ port, host });
    sock.once("connect", () => {
      sock.destroy();
      resolve(true);
    });
    sock.once("error", () => resolve(false));
  });
}
