#!/usr/bin/env bash
# Run the sdxl command line, installing what it needs on first use: `bash run.sh info MODEL`.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bash "$here/bootstrap.sh" >&2
exec "$here/.venv/bin/sdxl" "$@"
