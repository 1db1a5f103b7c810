import { execFile } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { crc32 } from "node:zlib";
import { expect, test } from "vitest";
import { StoredZipLayout } from "../worker/stored-zip.js";
import { readZip } from "./helpers/zip.js";

// The stored ZIP's layout, known before any byte is read: what a resumed run relies on.
// Independent readers (Info-ZIP unzip, Python's zipfile, yauzl) accept what it writes.
// ZIP64 at full size (4.5 GiB, 66,000 entries) is in test/zip64.test.ts (ZIP64=1).

const run = promisify(execFile);

test("a stored archive opens in independent readers, and every offset is where the layout says", async () => {
  const datas = [
    Buffer.from("hello\n"),
    Buffer.alloc(0),
    Buffer.alloc(70_000, 9),
    Buffer.from("ünïcödé"),
  ];
  const names = ["a.txt", "empty", "dir/b.bin", "ünïcödé.txt"];
  const layout = new StoredZipLayout(
    datas.map((d, i) => ({
      name: names[i] as string,
      size: d.length,
      mtime: Date.UTC(2024, 4, 3, 10, 20, 30),
    })),
  );
  const parts: Buffer[] = [];
  const crcs = datas.map((d) => crc32(d));
  for (const [i, d] of datas.entries()) {
    expect(parts.reduce((n, p) => n + p.length, 0)).toBe(layout.entryStart(i));
    parts.push(layout.localHeader(i), d, layout.descriptor(i, crcs[i] as number));
  }
  expect(parts.reduce((n, p) => n + p.length, 0)).toBe(layout.centralStart);
  for (const b of layout.end((i) => crcs[i] as number)) parts.push(b);
  const zip = Buffer.concat(parts);
  expect(zip.length).toBe(layout.size);
  expect(layout.locate(layout.dataStart(2) + 5)).toEqual({ entry: 2, part: "data", within: 5 });
  expect(layout.locate(layout.descriptorStart(2))).toEqual({
    entry: 2,
    part: "descriptor",
    within: 0,
  });
  expect(layout.locate(layout.entryStart(3) + 1)).toEqual({ entry: 3, part: "header", within: 1 });
  expect(layout.locate(layout.centralStart + 2)).toEqual({ entry: 4, part: "end", within: 2 });

  const entries = await readZip(zip);
  expect([...entries.keys()]).toEqual(names);
  for (const [i, d] of datas.entries())
    expect(entries.get(names[i] as string)?.equals(d)).toBe(true);
  const dir = mkdtempSync(join(tmpdir(), "dj-stored-zip-"));
  try {
    const path = join(dir, "a.zip");
    writeFileSync(path, zip);
    const unzip = await run("unzip", ["-t", path]);
    expect(unzip.stdout).toMatch(/No errors detected/);
    const py = await run("python3", [
      "-c",
      "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); print(z.testzip(), [i.date_time for i in z.infolist()][0])",
      path,
    ]);
    expect(py.stdout.trim()).toBe("None (2024, 5, 3, 10, 20, 30)");
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
