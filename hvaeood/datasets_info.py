"""What the library knows about each dataset, without importing TensorFlow.

The input pipeline (`hvaeood.input_pipeline`, which needs TensorFlow) reads the data; this module only
answers questions the model side needs: image shapes, which preprocessing a dataset gets for a given model, and
whether a dataset is prepared in a tfds data_dir.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import ml_collections


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  tfds_name: str
  image_shape: tuple[int, int, int]
  natural: bool  # natural images (dequantised) vs grayscale binary-friendly


DATASETS = {
    "fashion_mnist": DatasetInfo("fashion_mnist", (28, 28, 1), False),
    "mnist": DatasetInfo("mnist", (28, 28, 1), False),
    "kmnist": DatasetInfo("kmnist", (28, 28, 1), False),
    "omniglot": DatasetInfo("omniglot", (28, 28, 1), False),
    "cifar10": DatasetInfo("cifar10", (32, 32, 3), True),
    "svhn_cropped": DatasetInfo("svhn_cropped", (32, 32, 3), True),
    "cifar10_grey": DatasetInfo("cifar10", (32, 32, 1), True),
}
ALIASES = {"svhn": "svhn_cropped", "fmnist": "fashion_mnist", "cifar10_gray": "cifar10_grey"}
PREPROCESSINGS = ("binarize", "dequantize", "bin_centre", "quantize")


def canonical(name: str) -> str:
  name = ALIASES.get(name, name)
  if name not in DATASETS:
    raise ValueError(f"Unknown dataset {name!r}. Known datasets: {', '.join(sorted(DATASETS))} "
                     f"(aliases: {', '.join(f'{a}={b}' for a, b in sorted(ALIASES.items()))}).")
  return name


def image_shape(name: str) -> tuple[int, int, int]:
  return DATASETS[canonical(name)].image_shape


def eval_preprocessing(config: ml_collections.ConfigDict, name: str) -> str:
  """OOD sets are preprocessed the way the model's training data is (binarised for a Bernoulli model)."""
  del name
  return config.data.preprocessing


def is_available(name: str, data_dir: Optional[str]) -> bool:
  """True if the dataset is prepared in `data_dir` (or the default tfds dir); never touches the network."""
  info = DATASETS[canonical(name)]
  root = data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
  return os.path.isdir(os.path.join(root, info.tfds_name))


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Clear errors for config values that would otherwise fail deep inside JAX or tf.data."""
  canonical(config.data.name)
  if config.data.preprocessing not in PREPROCESSINGS:
    raise ValueError(f"config.data.preprocessing={config.data.preprocessing!r} is not one of {PREPROCESSINGS}.")
  if config.model.likelihood == "bernoulli" and config.data.preprocessing != "binarize":
    raise ValueError("A Bernoulli likelihood needs binary data: set --config.data.preprocessing=binarize.")
  for name in config.eval.ood_datasets:
    canonical(name)
  if config.train.batch_size < 1:
    raise ValueError(f"config.train.batch_size must be positive, got {config.train.batch_size}.")
