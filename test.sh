#!/usr/bin/env bash
# Run the test suite, installing the package and its test-only references first: `bash test.sh`.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bash "$here/bootstrap.sh" test
cd "$here"
exec .venv/bin/python -m pytest -q "$@"
