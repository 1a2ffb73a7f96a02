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
# Checks marked slow (over ~20 s each on a 2-core CPU: local Ray and torchrun clusters, the server soak, whole training
# runs) run in CI (CI=true) and with SDXL_SLOW_TESTS=1; the rest stays under ~15 minutes on such a machine.
if [ "${CI:-}" = true ] || [ "${SDXL_SLOW_TESTS:-}" = 1 ]; then marks=(); else marks=(-m "not slow"); fi
exec .venv/bin/python -m pytest -q --durations=15 "${marks[@]}" "$@"
