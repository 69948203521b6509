#!/usr/bin/env bash
# Install the project and the extras named in $1 (default: training). Keeps an existing torch
# (a CUDA build, say); otherwise installs torch 2.13.0, the CPU build on the project's machines.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-training}"
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install --quiet "torch==2.13.0"
fi
python -m pip install --quiet -e ".[${extras}]"
