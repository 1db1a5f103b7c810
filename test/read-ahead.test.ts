import { afterAll, beforeAll, expect, test } from "vitest";
import type { SourceInfo } from "../core/storage.js";
import { Storage, storageOptionsFrom } from "../core/storage.js";
import { type RealisticS3, S3_PROFILES, startRealisticS3 } from "../local/realistic-s3.js";
import { sampleStream } from "../local/samples.js";
import { ReadAhead, type ReadAheadOptions } from "../worker/read-ahead.js";
import { type Services, startServices } from "./helpers/services.js";

// The read-ahead window on its own, against the realistic-S3 fixture with made-up
// sources: bytes in order whatever happens, SlowDown shrinking the window, and memory
// bounded by the window however slowly the ZIP side reads.

let svc: Services;
beforeAll(async () => {
  svc = await startServices();
});
afterAll(async () => {
  await svc?.stop();
});

async function fixtureFor(
  behaviour: Parameters<typeof startRealisticS3>[1],
  sizes: Map<number, number>,
) {
  return startRealisticS3(svc.s3.endpoint, behaviour, 7, {
    bucket: "download-sources",
    prefix: "files/",
    sizeOf: (id) => sizes.get(id),
  });
}

async function readAll(
  fixture: RealisticS3,
  sizes: Map<number, number>,
  opts: Partial<ReadAheadOptions>,
  onChunk?: () => Promise<void>,
  beforeRead?: () => void,
) {
  const storage = new Storage(storageOptionsFrom(svc.config({ S3_ENDPOINT: fixture.endpoint })));
  try {
    const sources: SourceInfo[] = [];
    for (const id of sizes.keys()) sources.push((await storage.headSource(id)) as SourceInfo);
    const ahead = new ReadAhead(
      sources,
      (s, r, signal) => storage.getSourceRange(s.key, r, signal),
      {
        windowBytes: 32 * 1024 * 1024,
        windowObjects: 8,
        rangeBytes: 8 * 1024 * 1024,
        stallMs: 2000,
        attempts: 50,
        backoffMs: 10,
        signal: AbortSignal.timeout(120_000),
        ...opts,
      },
    );
    beforeRead?.();
    ahead.start();
    const wrong: number[] = [];
    for (const [i, s] of sources.entries()) {
      const got: Buffer[] = [];
      for await (const chunk of ahead.stream(i)) {
        got.push(chunk as Buffer);
        await onChunk?.();
      }
      const want: Buffer[] = [];
      for await (const chunk of sampleStream(s.fileId, s.sizeBytes)) want.push(chunk as Buffer);
      if (!Buffer.concat(got).equals(Buffer.concat(want))) wrong.push(s.fileId);
    }
    ahead.close();
    return { wrong, stats: ahead.stats };
  } finally {
    storage.destroy();
  }
}

test("SlowDown halves the window and the bytes still arrive whole and in order", async () => {
  const sizes = new Map(Array.from({ length: 150 }, (_, i) => [5000 + i, 20_000 + i] as const));
  const fixture = await fixtureFor({ ...S3_PROFILES.loopback, firstByteMs: 5 }, sizes);
  try {
    // Throttling starts after the HEADs: the reads are what is measured here.
    const { wrong, stats } = await readAll(fixture, sizes, {}, undefined, () =>
      fixture.set({ slowDown: 0.3 }),
    );
    expect(wrong).toEqual([]);
    expect(stats.throttled).toBeGreaterThan(0);
    expect(stats.smallestWindow).toBeLessThan(8);
    expect(fixture.stats.peakConcurrentGets).toBeLessThanOrEqual(8);
  } finally {
    await fixture.close();
  }
});

test("a slow reader keeps the buffered bytes within the window, large objects read as ranges", async () => {
  const sizes = new Map(
    Array.from({ length: 6 }, (_, i) => [6000 + i, 3 * 1024 * 1024 + i] as const),
  );
  const fixture = await fixtureFor("loopback", sizes);
  try {
    const windowBytes = 2 * 1024 * 1024;
    let n = 0;
    const { wrong, stats } = await readAll(
      fixture,
      sizes,
      { windowBytes, rangeBytes: 1024 * 1024 },
      async () => {
        if (++n % 8 === 0) await new Promise((r) => setTimeout(r, 5));
      },
    );
    expect(wrong).toEqual([]);
    // Three ranges per object.
    expect(stats.segments).toBe(18);
    // The window, plus the slack of the segment being written and one chunk in flight.
    expect(stats.peakBufferedBytes).toBeLessThanOrEqual(windowBytes + 1024 * 1024 + 256 * 1024);
  } finally {
    await fixture.close();
  }
});
