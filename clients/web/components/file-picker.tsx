import { type FormEvent, useId, useState } from "react";
import type { SampleFile } from "../../../local/sample-files.js";
import { formatBytes } from "../format.js";

export interface FilePickerProps {
  files: readonly SampleFile[];
  starting: boolean;
  /** Why the last start failed, in words; undefined when it did not. */
  error: string | undefined;
  onStart(fileIds: number[]): void;
}

/** The sample files as a checklist, and the button that starts a job with the ones ticked. */
export function FilePicker({ files, starting, error, onStart }: FilePickerProps) {
  const [selected, setSelected] = useState<ReadonlySet<number>>(() => new Set());
  const [hint, setHint] = useState<string | undefined>(undefined);
  const headingId = useId();
  const summaryId = useId();

  const toggle = (fileId: number, on: boolean) => {
    setHint(undefined);
    setSelected((s) => {
      const next = new Set(s);
      if (on) next.add(fileId);
      else next.delete(fileId);
      return next;
    });
  };

  const chosen = files.filter((f) => selected.has(f.fileId));
  const totalBytes = chosen.reduce((n, f) => n + f.sizeBytes, 0);

  const submit = (e: FormEvent) => {
    e.preventDefault();
    if (starting) return;
    if (chosen.length === 0) {
      setHint("Pick at least one file.");
      return;
    }
    onStart(chosen.map((f) => f.fileId));
  };

  const message = hint ?? error;
  return (
    <section className="card" aria-labelledby={headingId}>
      <h2 id={headingId}>Choose files</h2>
      <form onSubmit={submit} noValidate>
        <fieldset>
          <legend>Sample files</legend>
          <div className="row">
            <button
              type="button"
              className="link"
              onClick={() => setSelected(new Set(files.map((f) => f.fileId)))}
            >
              Select all
            </button>
            <button type="button" className="link" onClick={() => setSelected(new Set())}>
              Select none
            </button>
          </div>
          <ul className="checklist">
            {files.map((f) => (
              <li key={f.fileId}>
                <label>
                  <input
                    type="checkbox"
                    name="fileIds"
                    value={f.fileId}
                    checked={selected.has(f.fileId)}
                    onChange={(e) => toggle(f.fileId, e.currentTarget.checked)}
                  />
                  <span className="file-name">{f.fileName}</span>
                  <span className="muted">#{f.fileId}</span>
                  <span className="size">{formatBytes(f.sizeBytes)}</span>
                </label>
              </li>
            ))}
          </ul>
        </fieldset>
        <div className="row">
          <button
            type="submit"
            className="primary"
            aria-describedby={summaryId}
            aria-disabled={starting}
          >
            {starting ? "Starting…" : "Start download"}
          </button>
          <span id={summaryId} className="muted">
            {chosen.length === 0
              ? "No files selected"
              : `${chosen.length} ${chosen.length === 1 ? "file" : "files"}, ${formatBytes(totalBytes)}`}
          </span>
        </div>
        {message !== undefined && (
          <p role="alert" className="error">
            {message}
          </p>
        )}
      </form>
    </section>
  );
}
