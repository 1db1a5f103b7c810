// Reads a text/event-stream answer as EventSource would parse it, but as it arrives and
// with the raw fields kept (comments too), for the tests of a job's events.

export interface SseEvent {
  id?: string;
  event?: string;
  data?: string;
  comment?: string;
}

/** Reads an event stream as it arrives; `events` fills up, `done` settles at its end. */
export function readEvents(url: string, headers: Record<string, string> = {}) {
  const abort = new AbortController();
  const events: SseEvent[] = [];
  let response: Response | undefined;
  const done = (async () => {
    const res = await fetch(url, { headers, signal: abort.signal });
    response = res;
    if (res.body === null || res.status !== 200) return res;
    const decoder = new TextDecoder();
    let buf = "";
    for await (const chunk of res.body) {
      buf += decoder.decode(chunk, { stream: true });
      for (let i = buf.indexOf("\n\n"); i !== -1; i = buf.indexOf("\n\n")) {
        const block = buf.slice(0, i);
        buf = buf.slice(i + 2);
        const ev: SseEvent = {};
        for (const line of block.split("\n")) {
          if (line.startsWith(":")) ev.comment = line.slice(1).trim();
          else {
            const at = line.indexOf(":");
            const field = line.slice(0, at);
            const value = line.slice(at + 1).replace(/^ /, "");
            if (field === "id" || field === "event" || field === "data") ev[field] = value;
          }
        }
        events.push(ev);
      }
    }
    return res;
  })();
  done.catch(() => undefined);
  return {
    events,
    done,
    abort: () => abort.abort(),
    response: () => response,
    jobs: () =>
      events
        .filter((e) => e.id !== undefined)
        .map((e) => ({
          id: Number(e.id),
          job: (JSON.parse(e.data ?? "{}") as { job: { version: number; state: string } }).job,
        })),
  };
}
