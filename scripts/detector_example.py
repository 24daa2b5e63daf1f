"""Embeds a trained model as an OOD detector (the README's example), on the real offline data.

  python scripts/detector_example.py [--checkpoint runs/fashion_mnist_cpu] [--fit 10000]

Fits the detector on the last `--fit` FashionMNIST training images, then flags FashionMNIST test images (in
distribution) and MNIST test images (OOD) with a few scores at keep = 0.95, and saves and reloads the fit.
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hvaeood  # noqa: E402  pylint: disable=wrong-import-position

hvaeood.set_xla_cpu_defaults()  # a launcher's choice, before JAX starts (see README: Performance)
from hvaeood import OODDetector, data_import  # noqa: E402  pylint: disable=wrong-import-position

FMNIST = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
MNIST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "mnist")


def idx_images(src_dir: str) -> dict:
  """{split: uint8 [N, 28, 28, 1]} of a directory of IDX files (`data_import`'s validated reader)."""
  return {f.split: data_import.read_idx(f)[0] for f in data_import.find_idx_files(src_dir)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", default="runs/fashion_mnist_cpu")
  parser.add_argument("--fit", type=int, default=10_000)
  args = parser.parse_args()
  fmnist = idx_images(FMNIST)
  train, test, mnist = fmnist["train"], fmnist["test"], idx_images(MNIST)["test"]

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
