#!/usr/bin/env bash
# Make .venv with what sdxl needs; `bootstrap.sh test` adds the test-only reference libraries.
# torch is pinned first so pip takes the CPU build from this machine's disk (a bare `torch`
# requirement would pull a multi-GB CUDA build). Re-running is cheap: a stamp file remembers.
set -euo pipefail
cd "$(dirname "$0")"
extra="${1:-}"
py="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$py" -m venv .venv
stamp=".venv/.sdxl-installed${extra:+-$extra}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check "torch==${SDXL_TORCH_VERSION:-2.13.0}"
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extra:+[$extra]}"
  if [ "$extra" = test ]; then  # references whose own dependencies the tests do not need (see pyproject.toml)
    .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps k-diffusion==0.1.1.post1 torchdiffeq==0.2.5 \
      lpips==0.1.4
  fi
  touch "$stamp"
fi
