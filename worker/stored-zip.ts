// The layout of a ZIP whose entries are stored (ZIP_LEVEL=0), known before a byte is
// read: every header's size follows from the entry's name and size, so where each entry
// (and each upload part) starts is computable, and a run that takes over a crashed one
// can produce the archive from any byte on, byte for byte as the first run would have.
// Only the CRC-32s depend on the data: each entry's is carried in its data descriptor
// (general purpose bit 3) and in the central directory at the end.
//
// ZIP64 (APPNOTE 4.5.3) where needed: an entry of 4 GiB or more has a ZIP64 extra field
// in its local header (sizes deferred to an 8-byte-size descriptor); the central
// directory carries ZIP64 sizes and offsets only for values that do not fit 32 bits; past
// 65,534 entries or 4 GiB of offsets the end has a ZIP64 end record and locator too.
// Names are UTF-8 (bit 11). The time is each source's Last-Modified (deterministic: the
// same object has the same time), in MS-DOS form.

const LOCAL = 0x04034b50;
const DESCRIPTOR = 0x08074b50;
const CENTRAL = 0x02014b50;
const END64 = 0x06064b50;
const LOCATOR64 = 0x07064b50;
const END = 0x06054b50;
const MAX32 = 0xffffffff;
const MAX16 = 0xffff;
/** Data descriptor follows the data; names are UTF-8. */
const FLAGS = 0x0808;
/** Made by Unix (3), spec version 4.5 (ZIP64). */
const MADE_BY = (3 << 8) | 45;
/** A regular file, rw-r--r--. */
const EXTERNAL_ATTRS = (0o100644 << 16) >>> 0;

export interface StoredEntry {
  name: string;
  size: number;
  /** Last-Modified (ms since the epoch); undefined = 1980-01-01. */
  mtime?: number | undefined;
}

/** Where a byte of the archive lies. */
export type Position =
  | { entry: number; part: "header" | "data" | "descriptor"; within: number }
  | { entry: number; part: "end"; within: number };

function dosDateTime(ms: number | undefined): { time: number; date: number } {
  if (ms === undefined || !Number.isFinite(ms)) return { time: 0, date: (0 << 9) | (1 << 5) | 1 };
  const d = new Date(ms);
  const year = d.getUTCFullYear();
  if (year < 1980) return { time: 0, date: (1 << 5) | 1 };
  if (year > 2107) return { time: 0xbf7d, date: 0xff9f };
  return {
    time: (d.getUTCHours() << 11) | (d.getUTCMinutes() << 5) | Math.floor(d.getUTCSeconds() / 2),
    date: ((year - 1980) << 9) | ((d.getUTCMonth() + 1) << 5) | d.getUTCDate(),
  };
}

export class StoredZipLayout {
  private readonly names: Buffer[];
  private readonly times: { time: number; date: number }[];
  /** Offset of each entry's local header, and the central directory's after the last. */
  private readonly starts: number[];
  readonly centralStart: number;
  readonly centralSize: number;
  readonly size: number;

  constructor(readonly entries: readonly StoredEntry[]) {
    this.names = entries.map((e) => Buffer.from(e.name, "utf8"));
    this.times = entries.map((e) => dosDateTime(e.mtime));
    this.starts = [];
    let at = 0;
    for (let i = 0; i < entries.length; i++) {
      this.starts.push(at);
      at += this.headerSize(i) + (entries[i] as StoredEntry).size + this.descriptorSize(i);
    }
    this.centralStart = at;
    let central = 0;
    for (let i = 0; i < entries.length; i++)
      central += 46 + this.centralExtraSize(i) + this.nameOf(i).length;
    this.centralSize = central;
    this.size = at + central + this.endSize();
  }

  private nameOf(i: number): Buffer {
    return this.names[i] as Buffer;
  }

  private sizeOf(i: number): number {
    return (this.entries[i] as StoredEntry).size;
  }

  /** Whether the entry's local header carries ZIP64 (sizes of 4 GiB and more). */
  private zip64Local(i: number): boolean {
    return this.sizeOf(i) >= MAX32;
  }

  headerSize(i: number): number {
    return 30 + this.nameOf(i).length + (this.zip64Local(i) ? 20 : 0);
  }

  descriptorSize(i: number): number {
    return this.zip64Local(i) ? 24 : 16;
  }

  entryStart(i: number): number {
    return i < this.entries.length ? (this.starts[i] as number) : this.centralStart;
  }

  dataStart(i: number): number {
    return this.entryStart(i) + this.headerSize(i);
  }

  descriptorStart(i: number): number {
    return this.dataStart(i) + this.sizeOf(i);
  }

  private centralExtraSize(i: number): number {
    let n = 0;
    if (this.sizeOf(i) >= MAX32) n += 16;
    if (this.entryStart(i) >= MAX32) n += 8;
    return n > 0 ? 4 + n : 0;
  }

  private zip64End(): boolean {
    return this.entries.length >= MAX16 || this.centralStart >= MAX32 || this.centralSize >= MAX32;
  }

  private endSize(): number {
    return 22 + (this.zip64End() ? 56 + 20 : 0);
  }

  /** The entry and part holding archive byte `offset` (binary search over the entries). */
  locate(offset: number): Position {
    if (offset >= this.centralStart) {
      return { entry: this.entries.length, part: "end", within: offset - this.centralStart };
    }
    let lo = 0;
    let hi = this.entries.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if ((this.starts[mid] as number) <= offset) lo = mid;
      else hi = mid - 1;
    }
    const start = this.starts[lo] as number;
    if (offset < this.dataStart(lo)) return { entry: lo, part: "header", within: offset - start };
    if (offset < this.descriptorStart(lo)) {
      return { entry: lo, part: "data", within: offset - this.dataStart(lo) };
    }
    return { entry: lo, part: "descriptor", within: offset - this.descriptorStart(lo) };
  }

  localHeader(i: number): Buffer {
    const name = this.nameOf(i);
    const z64 = this.zip64Local(i);
    const b = Buffer.alloc(this.headerSize(i));
    const t = this.times[i] as { time: number; date: number };
    b.writeUInt32LE(LOCAL, 0);
    b.writeUInt16LE(z64 ? 45 : 20, 4);
    b.writeUInt16LE(FLAGS, 6);
    b.writeUInt16LE(0, 8);
    b.writeUInt16LE(t.time, 10);
    b.writeUInt16LE(t.date, 12);
    // CRC-32 and sizes are in the descriptor (bit 3); ZIP64 marks them as in its extra.
    b.writeUInt32LE(0, 14);
    b.writeUInt32LE(z64 ? MAX32 : 0, 18);
    b.writeUInt32LE(z64 ? MAX32 : 0, 22);
    b.writeUInt16LE(name.length, 26);
    b.writeUInt16LE(z64 ? 20 : 0, 28);
    name.copy(b, 30);
    if (z64) {
      const x = 30 + name.length;
      b.writeUInt16LE(0x0001, x);
      b.writeUInt16LE(16, x + 2);
      // Zero here: the sizes follow in the descriptor.
    }
    return b;
  }

  descriptor(i: number, crc: number): Buffer {
    const size = this.sizeOf(i);
    const b = Buffer.alloc(this.descriptorSize(i));
    b.writeUInt32LE(DESCRIPTOR, 0);
    b.writeUInt32LE(crc >>> 0, 4);
    if (this.zip64Local(i)) {
      b.writeBigUInt64LE(BigInt(size), 8);
      b.writeBigUInt64LE(BigInt(size), 16);
    } else {
      b.writeUInt32LE(size, 8);
      b.writeUInt32LE(size, 12);
    }
    return b;
  }

  private centralHeader(i: number, crc: number): Buffer {
    const name = this.nameOf(i);
    const size = this.sizeOf(i);
    const offset = this.entryStart(i);
    const extra = this.centralExtraSize(i);
    const b = Buffer.alloc(46 + name.length + extra);
    const t = this.times[i] as { time: number; date: number };
    b.writeUInt32LE(CENTRAL, 0);
    b.writeUInt16LE(MADE_BY, 4);
    b.writeUInt16LE(this.zip64Local(i) || extra > 0 ? 45 : 20, 6);
    b.writeUInt16LE(FLAGS, 8);
    b.writeUInt16LE(0, 10);
    b.writeUInt16LE(t.time, 12);
    b.writeUInt16LE(t.date, 14);
    b.writeUInt32LE(crc >>> 0, 16);
    b.writeUInt32LE(size >= MAX32 ? MAX32 : size, 20);
    b.writeUInt32LE(size >= MAX32 ? MAX32 : size, 24);
    b.writeUInt16LE(name.length, 28);
    b.writeUInt16LE(extra, 30);
    b.writeUInt16LE(0, 32);
    b.writeUInt16LE(0, 34);
    b.writeUInt16LE(0, 36);
    b.writeUInt32LE(EXTERNAL_ATTRS, 38);
    b.writeUInt32LE(offset >= MAX32 ? MAX32 : offset, 42);
    name.copy(b, 46);
    if (extra > 0) {
      let x = 46 + name.length;
      b.writeUInt16LE(0x0001, x);
      b.writeUInt16LE(extra - 4, x + 2);
      x += 4;
      if (size >= MAX32) {
        b.writeBigUInt64LE(BigInt(size), x);
        b.writeBigUInt64LE(BigInt(size), x + 8);
        x += 16;
      }
      if (offset >= MAX32) b.writeBigUInt64LE(BigInt(offset), x);
    }
    return b;
  }

  /** The central directory and end records, in slices of about `sliceBytes`. */
  *end(crcOf: (i: number) => number, sliceBytes = 1024 * 1024): Generator<Buffer> {
    let pending: Buffer[] = [];
    let pendingBytes = 0;
    for (let i = 0; i < this.entries.length; i++) {
      const h = this.centralHeader(i, crcOf(i));
      pending.push(h);
      pendingBytes += h.length;
      if (pendingBytes >= sliceBytes) {
        yield Buffer.concat(pending);
        pending = [];
        pendingBytes = 0;
      }
    }
    const n = this.entries.length;
    if (this.zip64End()) {
      const e = Buffer.alloc(56 + 20);
      e.writeUInt32LE(END64, 0);
      e.writeBigUInt64LE(44n, 4);
      e.writeUInt16LE(MADE_BY, 12);
      e.writeUInt16LE(45, 14);
      e.writeUInt32LE(0, 16);
      e.writeUInt32LE(0, 20);
      e.writeBigUInt64LE(BigInt(n), 24);
      e.writeBigUInt64LE(BigInt(n), 32);
      e.writeBigUInt64LE(BigInt(this.centralSize), 40);
      e.writeBigUInt64LE(BigInt(this.centralStart), 48);
      e.writeUInt32LE(LOCATOR64, 56);
      e.writeUInt32LE(0, 60);
      e.writeBigUInt64LE(BigInt(this.centralStart + this.centralSize), 64);
      e.writeUInt32LE(1, 72);
      pending.push(e);
    }
    const z = Buffer.alloc(22);
    z.writeUInt32LE(END, 0);
    z.writeUInt16LE(0, 4);
    z.writeUInt16LE(0, 6);
    z.writeUInt16LE(n >= MAX16 ? MAX16 : n, 8);
    z.writeUInt16LE(n >= MAX16 ? MAX16 : n, 10);
    z.writeUInt32LE(this.centralSize >= MAX32 ? MAX32 : this.centralSize, 12);
    z.writeUInt32LE(this.centralStart >= MAX32 ? MAX32 : this.centralStart, 16);
    z.writeUInt16LE(0, 20);
    pending.push(z);
    yield Buffer.concat(pending);
  }
}
