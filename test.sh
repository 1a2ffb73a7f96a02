#!/usr/bin/env bash
# Run the test suite, installing the package and its test-only references first: `bash test.sh`.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bash "$here/bootstrap.sh" test
# The web UI's browser tests drive Debian's Chromium (Playwright's own browser download is not used).
if [ ! -x /usr/bin/chromium ] && [ -z "${SDXL_CHROMIUM:-}" ] && command -v apt-get >/dev/null; then
  { apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; } >/dev/null 2>&1 \
    || echo "test.sh: could not install chromium; the web UI tests will say they are skipped" >&2
fi
cd "$here"
exec .venv/bin/python -m pytest -q "$@"
