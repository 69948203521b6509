#!/usr/bin/env bash
# The test suite: installs what it needs, then runs every test offline on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
HF_HUB_OFFLINE=1 python -m pytest -q tests "$@"
