"""Writes the images of an IDX file (e.g. MNIST's t10k-images-idx3-ubyte.gz) as a folder of PNGs, an OOD set
for `evaluate.py --ood DIR`.

  python scripts/idx_to_pngs.py ../shared/data/mnist/t10k-images-idx3-ubyte.gz mnist_png
"""

import gzip
import os
import sys

import numpy as np
from PIL import Image


def main(src: str, out: str) -> None:
  opener = gzip.open if src.endswith(".gz") else open
  with opener(src, "rb") as f:
    data = f.read()
  ndim = data[3]
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  images = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)
  os.makedirs(out, exist_ok=True)
  for i, image in enumerate(images):
    Image.fromarray(image).save(os.path.join(out, f"{i:05d}.png"))
  print(f"wrote {len(images)} PNGs of {shape[1:]} to {out}")


if __name__ == "__main__":
  if len(sys.argv) != 3:
    sys.exit(__doc__)
  main(sys.argv[1], sys.argv[2])
