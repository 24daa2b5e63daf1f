#!/usr/bin/env bash
# The main job end to end: set up, train the FashionMNIST HVAE and evaluate it against MNIST.
#
#   bash scripts/demo.sh [VARIANT] [WORKDIR]     # VARIANT: cpu (default, 30 min on 2 cores), tiny (1 min), paper
# Writes checkpoints and logs to WORKDIR (default runs/fashion_mnist_VARIANT) and the OOD table to WORKDIR/eval.
set -euo pipefail
cd "$(dirname "$0")/.."
VARIANT=${1:-cpu}
WORKDIR=${2:-runs/fashion_mnist_$VARIANT}
bash scripts/setup.sh
DATA_DIR=${HVAEOOD_DATA_DIR:-$HOME/.cache/hvaeood/tfds}
.venv/bin/python train.py --config "configs/fashion_mnist_hvae.py:$VARIANT" --workdir "$WORKDIR" \
  --config.data.data_dir="$DATA_DIR"
.venv/bin/python evaluate.py --checkpoint "$WORKDIR" --ood mnist --output_dir "$WORKDIR/eval" \
  --data_dir "$DATA_DIR"
cat "$WORKDIR/eval/results.md"
