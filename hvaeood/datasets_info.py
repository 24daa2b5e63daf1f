"""What the library knows about each dataset, without importing TensorFlow.

The input pipeline (`hvaeood.input_pipeline`, which needs TensorFlow) reads the data; this module only
answers questions the model side needs: image shapes, which preprocessing a dataset gets for a given model, and
whether a dataset is prepared in a tfds data_dir.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Optional, Sequence

import ml_collections


PREPROCESSING_KINDS = ('binarize', 'dequantize', 'bin_centre', 'quantize')
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the pipeline needs to know about a dataset.

  Attributes:
    name: our name (registry key).
    tfds_name: TFDS builder name.
    splits: our split name -> TFDS split name. Other names are passed to TFDS
      unchanged (e.g. omniglot 'small1').
    shape: (H, W, C) of the images the pipeline outputs.
    grayscale: whether the images are single-intensity (C == 1, or grey
      replicated to 3 channels).
    preprocessing: default preprocessing kind (docs/design.md §5 / README configs).
    source_transform: applied to the decoded uint8 image before caching:
      None, 'omniglot28' or 'omniglot28_inverted'.
    colour_transform: applied to intensities in [0, 1]: None or 'luminance'.
    idx_source: default directory of IDX files for `hvaeood.data_import`
      (only for datasets that can be imported offline).
  """
  name: str
  tfds_name: str
  splits: Mapping[str, str]
  shape: tuple[int, int, int]
  grayscale: bool
  preprocessing: str
  source_transform: str | None = None
  colour_transform: str | None = None
  idx_source: str | None = None

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return self.shape


# 'validation' follows the reference (docs/design.md §5): the official test set, except
# for SVHN where it is the 'extra' split.
_TRAIN_TEST = {'train': 'train', 'test': 'test', 'validation': 'test'}

DATASETS: dict[str, DatasetInfo] = {
    'fashion_mnist': DatasetInfo(
        'fashion_mnist', 'fashion_mnist', _TRAIN_TEST, (28, 28, 1), True,
        'binarize', idx_source='/usr/share/datasets/fashion-mnist'),
    'mnist': DatasetInfo(
        'mnist', 'mnist', _TRAIN_TEST, (28, 28, 1), True, 'binarize',
        idx_source=os.path.join(os.path.dirname(_REPO_ROOT), 'shared', 'data',
                                'mnist')),
    'kmnist': DatasetInfo(
        'kmnist', 'kmnist', _TRAIN_TEST, (28, 28, 1), True, 'binarize'),
    # TFDS omniglot: train = 'background' set, test = 'evaluation' set, 105x105
    # RGB with identical channels, dark strokes on a white background (as in
    # the reference's non-inverted Omniglot28x28). Resized with nearest.
    'omniglot': DatasetInfo(
        'omniglot', 'omniglot', _TRAIN_TEST, (28, 28, 1), True, 'binarize',
        source_transform='omniglot28'),
    # White strokes on black, like MNIST (reference Omniglot28x28Inverted).
    'omniglot_inverted': DatasetInfo(
        'omniglot_inverted', 'omniglot', _TRAIN_TEST, (28, 28, 1), True,
        'binarize', source_transform='omniglot28_inverted'),
    'cifar10': DatasetInfo(
        'cifar10', 'cifar10', _TRAIN_TEST, (32, 32, 3), False, 'dequantize'),
    'svhn_cropped': DatasetInfo(
        'svhn_cropped', 'svhn_cropped',
        {'train': 'train', 'test': 'test', 'extra': 'extra',
         'validation': 'extra'}, (32, 32, 3), False, 'dequantize'),
    # CIFAR10 as luminance, for grayscale models: one channel.
    'cifar10_grey': DatasetInfo(
        'cifar10_grey', 'cifar10', _TRAIN_TEST, (32, 32, 1), True,
        'dequantize', colour_transform='luminance'),
    # The reference's CIFAR10DequantizedGrey: luminance replicated to 3
    # channels, an OOD set for RGB CIFAR models.
    'cifar10_grey3': DatasetInfo(
        'cifar10_grey3', 'cifar10', _TRAIN_TEST, (32, 32, 3), True,
        'dequantize', colour_transform='luminance'),
}

ALIASES = {'svhn': 'svhn_cropped', 'fmnist': 'fashion_mnist',
           'cifar10_gray': 'cifar10_grey'}



def get_dataset_info(name: str) -> DatasetInfo:
  """Returns the registry entry of `name` (aliases allowed).

  Raises:
    ValueError: unknown name; the message lists the known names.
  """
  key = ALIASES.get(name, name)
  if key not in DATASETS:
    known = sorted(list(DATASETS) + list(ALIASES))
    raise ValueError(
        f'Unknown dataset {name!r}. Known datasets: {", ".join(known)}.')
  return DATASETS[key]


def check_image_shape(name: str, target_shape: Sequence[int]) -> None:
  """Raises a ValueError with a fix if dataset `name` does not fit the model.

  Args:
    name: dataset name.
    target_shape: the model's input shape (H, W, C).
  """
  info = get_dataset_info(name)
  target = tuple(int(d) for d in target_shape)
  if info.shape == target:
    return
  fits = [n for n, d in DATASETS.items() if d.shape == target]
  hint = []
  if info.shape[:2] == target[:2] and info.shape[2] == 3 and target[2] == 1:
    greys = [n for n in fits if DATASETS[n].tfds_name == info.tfds_name]
    if greys:
      hint.append(f'use {greys[0]!r} for grayscale models')
  if info.shape[2] == 1 and target[2] == 3:
    hint.append('grayscale images are not converted to 3 channels silently; '
                'evaluate with a grayscale model')
  hint.append('datasets with shape {}: {}'.format(
      target, ', '.join(fits) if fits else 'none'))
  raise ValueError(
      f'Dataset {info.name!r} has images of shape {info.shape} (H, W, C) but '
      f'the model expects {target}. Fix: ' + '; '.join(hint) + '.')


def canonical(name: str) -> str:
  """The registry key of `name` (aliases resolved); ValueError listing the known names otherwise."""
  return get_dataset_info(name).name


def image_shape(name: str) -> tuple[int, int, int]:
  return get_dataset_info(name).shape


def eval_preprocessing(config: ml_collections.ConfigDict, name: str) -> str:
  """OOD sets are preprocessed the way the model's training data is (binarised for a Bernoulli model)."""
  del name
  return config.data.preprocessing


IDX_IMPORTABLE = ('mnist', 'fashion_mnist', 'kmnist')


def default_data_dir() -> str:
  """TFDS's default data_dir: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def data_dir_description(data_dir: Optional[str]) -> str:
  return data_dir if data_dir else f"the default TFDS data_dir ({default_data_dir()})"


def prepare_command(name: str, data_dir: Optional[str]) -> str:
  """The command that prepares dataset `name` in `data_dir` on a machine without network access to TFDS."""
  info = get_dataset_info(name)
  target = data_dir or '~/tensorflow_datasets'
  if info.tfds_name in IDX_IMPORTABLE:
    src = info.idx_source if info.idx_source and os.path.isdir(
        info.idx_source) else '<directory with the *-idx?-ubyte[.gz] files>'
    return (f'python -m hvaeood.data_import --name {info.tfds_name} '
            f'--src {src} --data_dir {target}')
  return (f'on a machine with network: tfds build {info.tfds_name} '
          f'--data_dir {target}, then copy {target}/{info.tfds_name} here')


def is_available(name: str, data_dir: Optional[str]) -> bool:
  """True if the dataset is prepared in `data_dir` (or the default tfds dir); never touches the network."""
  info = get_dataset_info(name)
  return os.path.isdir(os.path.join(data_dir or default_data_dir(), info.tfds_name))


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Clear errors for config values that would otherwise fail deep inside JAX or tf.data."""
  canonical(config.data.name)
  if config.data.preprocessing not in PREPROCESSING_KINDS:
    raise ValueError(f"config.data.preprocessing={config.data.preprocessing!r} is not one of {PREPROCESSING_KINDS}.")
  if config.model.likelihood == "bernoulli" and config.data.preprocessing != "binarize":
    raise ValueError("A Bernoulli likelihood needs binary data: set --config.data.preprocessing=binarize.")
  for name in config.eval.ood_datasets:
    canonical(name)
  if config.train.batch_size < 1:
    raise ValueError(f"config.train.batch_size must be positive, got {config.train.batch_size}.")
