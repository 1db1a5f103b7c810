#!/usr/bin/env bash
# gen/ is generated from proto/ and committed. Regenerate it in place and fail if that
# changes anything: a proto edit without `npm run generate`, or a hand edit of gen/.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "check-generated: regenerating gen/ from proto/ (npm run generate)"
npm run --silent generate

changes="$(git status --porcelain -- gen)"
if [[ -n "$changes" ]]; then
  echo "check-generated: FAILED, gen/ is out of date with proto/:" >&2
  echo "$changes" >&2
  git --no-pager diff --stat -- gen >&2 || true
  echo "check-generated: run 'npm run generate' and commit gen/ (never edit gen/ by hand)." >&2
  exit 1
fi
echo "check-generated: gen/ is up to date"
