#!/usr/bin/env bash
# Sets up everything hvaeood needs on a fresh Debian/Ubuntu machine: the offline FashionMNIST package (when apt
# is available), a virtual environment in .venv with the package and its test extras, and a tfds data_dir with
# FashionMNIST (train+test) and MNIST (test) imported from local IDX files, so nothing is downloaded by tfds.
#
#   bash scripts/setup.sh            # idempotent; prints the data_dir it prepared
# Environment: PYTHON (default python3), VENV (default .venv), HVAEOOD_DATA_DIR (default ~/.cache/hvaeood/tfds),
#              MNIST_SRC (default ../shared/data/mnist next to the checkout), FMNIST_SRC.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
DATA_DIR=${HVAEOOD_DATA_DIR:-$HOME/.cache/hvaeood/tfds}
FMNIST_SRC=${FMNIST_SRC:-/usr/share/datasets/fashion-mnist}
MNIST_SRC=${MNIST_SRC:-$(cd .. && pwd)/shared/data/mnist}

if [ ! -d "$FMNIST_SRC" ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -q >/dev/null
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[test]"

mkdir -p "$DATA_DIR"
if [ -d "$FMNIST_SRC" ]; then
  "$VENV/bin/python" -m hvaeood.data_import --name fashion_mnist --src "$FMNIST_SRC" --data_dir "$DATA_DIR"
else
  echo "note: $FMNIST_SRC not found; tfds will download fashion_mnist when it has network access" >&2
fi
if [ -d "$MNIST_SRC" ]; then
  "$VENV/bin/python" -m hvaeood.data_import --name mnist --src "$MNIST_SRC" --data_dir "$DATA_DIR"
else
  echo "note: $MNIST_SRC not found; tfds will download mnist when it has network access" >&2
fi
echo "HVAEOOD_DATA_DIR=$DATA_DIR"
