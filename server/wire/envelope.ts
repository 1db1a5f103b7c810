// Envelopes (Connect streaming, gRPC, gRPC-Web): a flags byte, the payload's big-endian
// length, the payload. One job update goes to every watcher of the job, so its envelope
// is made once and kept with its payload.
//
// Each envelope is its own allocation, never a slice of Node's shared 8 KB Buffer pool:
// one kept with its answer would pin a whole slab outside the JS heap.

/** The plain (flags 0) envelope of each payload that has one. */
const plain = new WeakMap<Uint8Array, Buffer>();

export function envelope(flags: number, payload: Uint8Array): Buffer {
  if (flags === 0) {
    const kept = plain.get(payload);
    if (kept !== undefined) return kept;
  }
  const buf = Buffer.allocUnsafeSlow(5 + payload.byteLength);
  buf[0] = flags;
  buf.writeUInt32BE(payload.byteLength, 1);
  buf.set(payload, 5);
  if (flags === 0) plain.set(payload, buf);
  return buf;
}

/**
 * `text` as UTF-8 bytes that already sit in their plain envelope: one allocation and no
 * copy for an answer that streams get (the watch fan-out makes one per job update),
 * five bytes more for one that goes out bare.
 */
export function utf8InEnvelope(text: string): Uint8Array {
  const length = Buffer.byteLength(text);
  const buf = Buffer.allocUnsafeSlow(5 + length);
  buf[0] = 0;
  buf.writeUInt32BE(length, 1);
  buf.write(text, 5);
  const payload = buf.subarray(5);
  plain.set(payload, buf);
  return payload;
}
