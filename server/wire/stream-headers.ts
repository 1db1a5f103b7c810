// Response headers of every streaming answer (WatchJob and the other server streams on
// both ways in, and the server-sent events): nginx's default proxy_buffering holds a
// response back until its buffer fills, which a stream of small messages never does,
// unless the answer says `X-Accel-Buffering: no`; `no-transform` keeps proxies and CDNs
// from recompressing (and so batching) the stream.
export const STREAM_HEADERS: Readonly<Record<string, string>> = {
  "x-accel-buffering": "no",
  "cache-control": "no-cache, no-transform",
};
