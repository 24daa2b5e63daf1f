"""Embeds a trained model as an OOD detector (the README's example), on the real offline data.

  python scripts/detector_example.py [--checkpoint runs/fashion_mnist_cpu] [--fit 10000]

Fits the detector on the last `--fit` FashionMNIST training images, then flags FashionMNIST test images (in
distribution) and MNIST test images (OOD) with a few scores at keep = 0.95, and saves and reloads the fit.
"""

import argparse
import gzip
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hvaeood  # noqa: E402  pylint: disable=wrong-import-position

hvaeood.set_xla_cpu_defaults()  # a launcher's choice, before JAX starts (see README: Performance)
from hvaeood import OODDetector  # noqa: E402  pylint: disable=wrong-import-position

FMNIST = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
MNIST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "mnist")


def idx_images(path: str) -> np.ndarray:
  """uint8 [N, 28, 28] from an IDX image file (.gz)."""
  with gzip.open(path) as f:
    return np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", default="runs/fashion_mnist_cpu")
  parser.add_argument("--fit", type=int, default=10_000)
  args = parser.parse_args()
  train = idx_images(os.path.join(FMNIST, "train-images-idx3-ubyte.gz"))
  test = idx_images(os.path.join(FMNIST, "t10k-images-idx3-ubyte.gz"))
  mnist = idx_images(os.path.join(MNIST, "t10k-images-idx3-ubyte.gz"))

  t0 = time.perf_counter()
  det = OODDetector.from_checkpoint(args.checkpoint)
  det.fit(train[-args.fit:])
  print(f"fitted on {args.fit} FashionMNIST train images in {time.perf_counter() - t0:.0f} s")
  t0 = time.perf_counter()
  s_in, s_ood = det.score(test), det.score(mnist)
  print(f"scored {len(test) + len(mnist)} images in {time.perf_counter() - t0:.0f} s")
  for score in ("LLR>1", "DoSE", "fisher"):
    limit = det.threshold(score, keep=0.95)
    kept = np.mean(s_in[score] <= limit)
    caught = np.mean(s_ood[score] > limit)
    print(f"{score:7s} threshold {limit:9.3f}: keeps {kept:.1%} of FashionMNIST test, flags {caught:.1%} of MNIST")
  path = det.save(os.path.join(args.checkpoint, "detector.npz"))
  again = OODDetector.load(path)
  flags = again.is_ood(mnist[:100], score="DoSE", keep=0.95)
  print(f"saved {path}; reloaded, it flags {flags.sum()} of the first 100 MNIST images with DoSE")


if __name__ == "__main__":
  main()
