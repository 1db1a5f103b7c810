import { createHash } from "node:crypto";
import { readFile, stat } from "node:fs/promises";
import type { ServerResponse } from "node:http";
import { extname, join, resolve, sep } from "node:path";
import type { ConnectNodeAdapterOptions } from "@connectrpc/connect-node";

// The browser page built by scripts/build-web.ts, served from the API's own port so it
// calls the API on the same origin (no CORS). Only two kinds of path exist: the page
// itself at "/" and hashed build outputs under "/assets/". Anything else is left to the
// caller (which answers 404), so no request can name a file outside the build.

type Fallback = NonNullable<ConnectNodeAdapterOptions["fallback"]>;
type NodeRequest = Parameters<Fallback>[0];
type NodeResponse = Parameters<Fallback>[1];

const CONTENT_TYPES: Record<string, string> = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".css": "text/css; charset=utf-8",
  ".map": "application/json; charset=utf-8",
  ".json": "application/json; charset=utf-8",
  ".txt": "text/plain; charset=utf-8",
  ".svg": "image/svg+xml",
  ".png": "image/png",
  ".ico": "image/x-icon",
  ".woff2": "font/woff2",
};

// The page talks only to its own origin; the download link leaves it by navigation,
// which this policy does not restrict.
const PAGE_CSP =
  "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/** An asset name as the build writes them: no slashes, no leading dot. */
const ASSET_NAME = /^[A-Za-z0-9_-][A-Za-z0-9._-]*$/;

interface CachedFile {
  mtimeMs: number;
  size: number;
  etag: string;
  body: Buffer;
}

export interface StaticSite {
  /** Answers the request and returns true when it is for the page; false otherwise. */
  handle(req: NodeRequest, res: NodeResponse): boolean;
}

/**
 * Serves `root` (a build of clients/web). Files are read on demand and kept in memory
 * while their size and mtime stay the same, so a rebuild is picked up without a restart.
 */
export function createStaticSite(
  root: string,
  opts: { onError?: (err: unknown) => void } = {},
): StaticSite {
  const base = resolve(root);
  const cache = new Map<string, CachedFile>();

  const load = async (file: string): Promise<CachedFile | undefined> => {
    let st: Awaited<ReturnType<typeof stat>>;
    try {
      st = await stat(file);
    } catch {
      cache.delete(file);
      return undefined;
    }
    if (!st.isFile()) return undefined;
    const hit = cache.get(file);
    if (hit !== undefined && hit.mtimeMs === st.mtimeMs && hit.size === st.size) return hit;
    const body = await readFile(file);
    const entry = {
      mtimeMs: st.mtimeMs,
      size: st.size,
      etag: `"${createHash("sha256").update(body).digest("base64url").slice(0, 27)}"`,
      body,
    };
    cache.set(file, entry);
    return entry;
  };

  const serve = async (
    req: NodeRequest,
    nodeRes: NodeResponse,
    file: string,
    immutable: boolean,
  ) => {
    // HTTP/1.1 and HTTP/2 responses take writeHead/end alike, but TypeScript cannot call
    // a union of overloaded methods.
    const res = nodeRes as ServerResponse;
    const entry = await load(file);
    if (entry === undefined) {
      if (!immutable) {
        // The page is missing: the server runs from a checkout where nobody built it.
        res.writeHead(404, {
          "content-type": "text/plain; charset=utf-8",
          "cache-control": "no-store",
        });
        res.end(
          "The browser page is not built: run `npm run build:web` (npm start does it for you).\n",
        );
      } else {
        res.writeHead(404, { "content-type": "text/plain; charset=utf-8" });
        res.end("not found\n");
      }
      return;
    }
    const type = CONTENT_TYPES[extname(file)] ?? "application/octet-stream";
    const headers: Record<string, string> = {
      "content-type": type,
      etag: entry.etag,
      // Hashed names change with their content; the page itself must be revalidated so a
      // new build's asset names reach the browser.
      "cache-control": immutable ? "public, max-age=31536000, immutable" : "no-cache",
      "x-content-type-options": "nosniff",
    };
    if (type.startsWith("text/html")) {
      headers["content-security-policy"] = PAGE_CSP;
      headers["referrer-policy"] = "no-referrer";
    }
    if (matches(req.headers["if-none-match"], entry.etag)) {
      res.writeHead(304, headers);
      res.end();
      return;
    }
    headers["content-length"] = String(entry.body.length);
    res.writeHead(200, headers);
    res.end(req.method === "HEAD" ? undefined : entry.body);
  };

  return {
    handle(req, res) {
      if (req.method !== "GET" && req.method !== "HEAD") return false;
      const file = resolvePath(base, req.url ?? "");
      if (file === undefined) return false;
      serve(req, res, file.path, file.immutable).catch((err: unknown) => {
        opts.onError?.(err);
        const r = res as ServerResponse;
        if (!r.headersSent) r.writeHead(500, { "content-type": "text/plain; charset=utf-8" });
        r.end();
      });
      return true;
    },
  };
}

/** Maps a request URL to a file of the build, or undefined when it names none. */
function resolvePath(base: string, url: string): { path: string; immutable: boolean } | undefined {
  const pathname = url.split("?", 1)[0] ?? "";
  if (pathname === "/" || pathname === "/index.html")
    return { path: join(base, "index.html"), immutable: false };
  if (!pathname.startsWith("/assets/")) return undefined;
  let name: string;
  try {
    name = decodeURIComponent(pathname.slice("/assets/".length));
  } catch {
    return undefined;
  }
  // One plain file name: "..", "/", "\" and NUL cannot get past this.
  if (!ASSET_NAME.test(name)) return undefined;
  const path = join(base, "assets", name);
  if (!path.startsWith(base + sep)) return undefined;
  return { path, immutable: true };
}

function matches(header: string | undefined, etag: string): boolean {
  if (header === undefined) return false;
  if (header.trim() === "*") return true;
  return header.split(",").some((t) => t.trim().replace(/^W\//, "") === etag);
}
