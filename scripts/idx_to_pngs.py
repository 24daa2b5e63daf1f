"""Writes one split of a directory of IDX files (MNIST / FashionMNIST / KMNIST) as a folder of PNGs, an OOD set
for `evaluate.py --ood DIR`.

  python scripts/idx_to_pngs.py ../shared/data/mnist test mnist_png
"""

import os
import sys

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hvaeood import data_import  # noqa: E402  pylint: disable=wrong-import-position


def main(src_dir: str, split: str, out: str) -> None:
  files = {f.split: f for f in data_import.find_idx_files(src_dir)}
  if split not in files:
    sys.exit(f"error: {src_dir} has no {split!r} split (it has {sorted(files)}).")
  images, _ = data_import.read_idx(files[split])
  os.makedirs(out, exist_ok=True)
  for i, image in enumerate(images):
    Image.fromarray(image[..., 0]).save(os.path.join(out, f"{i:05d}.png"))
  print(f"wrote {len(images)} PNGs of {images.shape[1:3]} to {out}")


if __name__ == "__main__":
  if len(sys.argv) != 4:
    sys.exit(__doc__)
  main(*sys.argv[1:])
