import { entryNameFor } from "../core/jobs.js";

// ZIP entry names from the sources' `filename` metadata, which whoever uploaded a source
// chose: the names must extract everywhere and never outside the folder they are
// extracted into. Each name is flat (no folders: separators become `_`), free of C0 and
// C1 control characters and of bidirectional overrides (which disguise an extension),
// free of the characters and device names Windows cannot create (`CON`, `aux.txt`,
// `COM1`), with no trailing dot or space (Windows drops them, so two names would meet),
// no leading dot (hidden files, `..`), at most MAX_CHARS characters, and unique among the
// job's entries ignoring case (Windows and macOS file systems fold case).

const MAX_CHARS = 200;

// biome-ignore lint/suspicious/noControlCharactersInRegex: control characters are what it replaces
const UNSAFE = /[\u0000-\u001f\u007f-\u009f\u200e\u200f\u202a-\u202e\u2066-\u2069<>:"/\\|?*]/g;
const RESERVED = /^(con|prn|aux|nul|com[0-9¹²³]|lpt[0-9¹²³])$/i;

/** One safe name, or undefined when nothing usable is left of `wanted`. */
export function safeEntryName(wanted: string | undefined): string | undefined {
  if (wanted === undefined) return undefined;
  let name = wanted.normalize("NFC").replace(UNSAFE, "_");
  name = name
    .replace(/[. ]+$/, "")
    .replace(/^\.+/, "_")
    .trim();
  const base = name.split(".", 1)[0] ?? "";
  if (RESERVED.test(base.trimEnd())) name = `_${name}`;
  // Cut by code points, not UTF-16 units, so no surrogate pair is split.
  const chars = Array.from(name);
  if (chars.length > MAX_CHARS) {
    const dot = name.lastIndexOf(".");
    const ext = dot > 0 && name.length - dot <= 16 ? name.slice(dot) : "";
    name =
      chars
        .slice(0, MAX_CHARS - Array.from(ext).length)
        .join("")
        .replace(/[. ]+$/, "") + ext;
  }
  return name === "" || /^_*$/.test(name) ? undefined : name;
}

/** The entry names of a job's sources, in order: safe, and unique ignoring case. */
export function entryNames(
  sources: readonly { fileId: number; fileName?: string | undefined }[],
): string[] {
  const used = new Set<string>();
  const key = (n: string) => n.toLowerCase();
  return sources.map((s) => {
    const base = safeEntryName(s.fileName) ?? entryNameFor(s.fileId);
    let name = base;
    for (let n = 1; used.has(key(name)); n++) {
      name = n === 1 ? `${s.fileId}-${base}` : `${s.fileId}-${n}-${base}`;
    }
    used.add(key(name));
    return name;
  });
}
