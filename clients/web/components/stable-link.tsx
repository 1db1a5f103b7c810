import { timestampDate } from "@bufbuild/protobuf/wkt";
import { useState } from "react";
import type { JobResult } from "../../../gen/downloads/v1/download_service_pb.js";
import { formatTime } from "../format.js";

// A completed job's stable link (result.link_url, /d/<job>?exp=..&sig=..): it stays the
// same and keeps working while the ZIP lives, unlike the presigned URL, so it can be
// copied into a message. Shown only when the server signs links (DOWNLOAD_LINK_SECRET).

export function StableLink({ result }: { result: JobResult }) {
  const [copied, setCopied] = useState<"yes" | "no" | undefined>(undefined);
  if (result.linkUrl === "") return null;
  // A relative link (no PUBLIC_URL on the server) is relative to the API: this origin.
  const href = new URL(result.linkUrl, window.location.origin).href;
  const until = result.purgeTime !== undefined ? timestampDate(result.purgeTime) : undefined;
  const copy = () => {
    navigator.clipboard.writeText(href).then(
      () => setCopied("yes"),
      () => setCopied("no"),
    );
  };
  return (
    <div className="stable-link">
      <label>
        Link to share{" "}
        <input type="text" readOnly value={href} onFocus={(e) => e.currentTarget.select()} />
      </label>{" "}
      <button type="button" onClick={copy}>
        Copy link
      </button>{" "}
      <span className="muted" aria-live="polite">
        {copied === "yes"
          ? "Copied."
          : copied === "no"
            ? "Copying is not allowed here: select the link and copy it."
            : until !== undefined
              ? `Works until ${formatTime(until.getTime())}, for whoever has it.`
              : "Works while the ZIP is kept, for whoever has it."}
      </span>
    </div>
  );
}
