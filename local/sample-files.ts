// The sample files' ids, sizes and names as plain data, with no Node import, so the
// browser page can list them too. local/samples.ts makes and uploads their bytes.

export interface SampleFile {
  fileId: number;
  sizeBytes: number;
  /** The object's `filename` metadata, the name the ZIP entry gets. */
  fileName: string;
}

const SAMPLE_MEGABYTES = [1, 2, 3, 5, 8, 13, 21, 30, 40, 50] as const;

export const SAMPLE_FILES: readonly SampleFile[] = SAMPLE_MEGABYTES.map((mb, i) => {
  const fileId = 70_000 + i;
  return { fileId, sizeBytes: mb * 1_000_000, fileName: `sample-${fileId}.bin` };
});

export const SAMPLE_FILE_IDS: readonly number[] = SAMPLE_FILES.map((f) => f.fileId);
