import { createClient } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { pino } from "pino";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import type { JobRecord } from "../core/jobs.js";
import { DownloadService } from "../gen/downloads/v1/download_service_pb.js";
import { entryNames, safeEntryName } from "../worker/entry-names.js";
import { type RunningWorker, startWorker } from "../worker/worker.js";
import { type ApiStack, startApiStack, withTestToken } from "./helpers/api.js";
import { readZip } from "./helpers/zip.js";

// Entry names come from metadata whoever uploaded a source chose: they must extract on
// Windows, macOS and Linux alike, and never outside the folder they are extracted into.

describe("entry names", () => {
  test.each([
    ["report.pdf", "report.pdf"],
    ["../../etc/passwd", "__.._etc_passwd"],
    ["/abs/path.txt", "_abs_path.txt"],
    ["C:\\Windows\\win.ini", "C__Windows_win.ini"],
    ["bell\u0007and\u0085nel.txt", "bell_and_nel.txt"],
    ["invoice\u202Efdp.exe", "invoice_fdp.exe"],
    ["CON", "_CON"],
    ["aux.txt", "_aux.txt"],
    ["Com1.log", "_Com1.log"],
    ["lpt9", "_lpt9"],
    ["console.txt", "console.txt"],
    ["trailing. . ", "trailing"],
    ["what?<>|*.txt", "what_____.txt"],
    [".hidden", "_hidden"],
    ["..", undefined],
    ["", undefined],
    ["   ", undefined],
  ])("%j becomes %j", (wanted, expected) => {
    expect(safeEntryName(wanted)).toBe(expected);
  });

  test("a long name keeps its extension and never splits a character", () => {
    const name = safeEntryName(`${"😀".repeat(300)}.pdf`) ?? "";
    expect(Array.from(name)).toHaveLength(200);
    expect(name.endsWith("😀.pdf")).toBe(true);
    expect(name.isWellFormed()).toBe(true);
  });

  test("names are unique ignoring case, and a fallback name cannot be taken twice", () => {
    expect(
      entryNames([
        { fileId: 1, fileName: "Report.pdf" },
        { fileId: 2, fileName: "report.PDF" },
        { fileId: 3, fileName: "file-4" },
        { fileId: 4 },
        { fileId: 5, fileName: "2-report.PDF" },
        { fileId: 6, fileName: "CON" },
      ]),
    ).toEqual(["Report.pdf", "2-report.PDF", "file-4", "4-file-4", "5-2-report.PDF", "_CON"]);
  });
});

describe("in a real bundle", () => {
  let st: ApiStack;
  let worker: RunningWorker;
  beforeAll(async () => {
    st = await startApiStack();
    worker = await startWorker(st.cfg, pino({ level: "silent" }));
  });
  afterAll(async () => {
    await worker?.close();
    await st?.stop();
  });

  test("hostile file names enter the ZIP as safe, distinct names, each with its own bytes", async () => {
    // What S3 metadata (an HTTP header) can carry.
    const names = ["../../evil.sh", "NUL.txt", "Same.txt", "same.TXT", "trailing. ", "a:b|c?.txt"];
    const ids = names.map((_, i) => 1200 + i);
    const bytes = await Promise.all(ids.map((id, i) => st.svc.putSource(id, 1000 + i, names[i])));
    const client = createClient(
      DownloadService,
      createConnectTransport({
        baseUrl: st.server.url,
        httpVersion: "1.1",
        interceptors: [withTestToken],
      }),
    );
    const jobId = (await client.initiate({ fileIds: ids })).job?.jobId ?? "";
    let rec: JobRecord | undefined;
    await expect
      .poll(async () => (rec = await st.store.get(jobId)).state, { timeout: 60_000 })
      .toBe("COMPLETED");
    const expected = [
      "__.._evil.sh",
      "_NUL.txt",
      "Same.txt",
      "1203-same.TXT",
      "trailing",
      "a_b_c_.txt",
    ];
    expect(rec?.files.map((f) => f.entryName)).toEqual(expected);
    const { job } = await client.getStatus({ jobId });
    const zip = await readZip(
      Buffer.from(await (await fetch(job?.result?.downloadUrl ?? "")).arrayBuffer()),
    );
    expect([...zip.keys()]).toEqual(expected);
    for (const [i, name] of expected.entries())
      expect(zip.get(name)?.equals(bytes[i] as Buffer)).toBe(true);
  });
});
