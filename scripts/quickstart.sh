#!/usr/bin/env bash
# The main job on the embedded default: train a pixel-space AFM on scikit-learn's handwritten
# digits (CPU, a few minutes), reload the saved pipeline, and write a grid, one row per digit.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh training
export HF_HUB_OFFLINE=1
python examples/train_afm.py --output_dir afm-digits "$@"
python examples/sample_grid.py --pipeline afm-digits --output afm-digits/grid.png
