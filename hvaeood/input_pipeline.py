"""tf.data input pipelines for training and evaluation (docs/design.md §5).

Everything a model sees goes through `preprocess_image`, the one place where
pixel values k in {0..255} become model inputs in [0, 1]:

* ``binarize``   x ~ Bernoulli(k / 255), a fresh draw every epoch / pass.
* ``dequantize`` x = (k + u) / 256, u ~ U[0, 1), fresh every epoch; x is in
  [0, 1) and floor(256 x) == k exactly (u is capped at 1 - 2^-16 so float32
  rounding can never reach the next bin).
* ``bin_centre`` x = k / 255, the centre of the discretised logistic
  mixture's bin k (its 2x - 1 = 2k/255 - 1, edge bins beyond +-0.999), so the
  probabilities of the 256 levels sum to 1 (deterministic; the `bin_centre`
  option (docs/design.md §5), against the reference's off-bin dequantised data).
* ``quantize``   x = k / 255 (deterministic; the reference's Quantized sets).
  The same values as ``bin_centre``: the two names say why they are used.

Randomness is stateless and keyed by (seed, stream, epoch, example index), so a
given example gets the same noise in the same epoch no matter the batch it
lands in, how many hosts read the data, or whether the run was resumed; and a
different draw in every epoch. The example index is its position in the TFDS
split (file order), hence independent of `process_count`.

Training pipeline (`create_train_iterator`): per-host slice of the train split
-> decode -> `cache()` of raw uint8 -> for each epoch: a stateless shuffle keyed
by (seed, epoch, process_index), truncated to the same number of examples on
every host -> per-epoch preprocessing -> `batch(drop_remainder=True)` ->
`prefetch`. Batches never straddle epochs: an epoch is exactly
`steps_per_epoch` batches and the rest of the (shuffled) epoch is dropped, so
step s belongs to epoch s // steps_per_epoch. Resuming at `start_step` starts
the epoch stream at that epoch and skips the first (start_step mod
steps_per_epoch) batches of it (cheap: the skip happens before preprocessing),
which yields exactly the batches an uninterrupted run yields from `start_step`.

Why not `Dataset.shuffle(seed=...)`: its order also depends on TF's global seed
(`tf.random.set_seed`), which would make resumption depend on global state. The
stateless shuffle here permutes blocks of `config.data.shuffle_buffer`
consecutive examples; a buffer >= the split size (or 0/None) is a full uniform
permutation per epoch, which is what all datasets here use by default.

Evaluation pipeline (`create_eval_dataset` for a registry dataset,
`create_eval_dataset_from_array` for images already in memory, e.g. from
`hvaeood.image_sources`): the first N examples in file order, contiguous
per-host slices, zero padding to whole batches of one static shape, noise keyed
by (seed, set name, split, example index). Every batch also carries
`png_bits`, the PNG length in bits of each image as the model scores it (the
input complexity of Serra et al. 2020).

TF is kept off accelerators (JAX owns them). JAX is not imported here.
"""

from __future__ import annotations

import dataclasses
import math
import os
import zlib
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds


def _hide_accelerators_from_tf() -> None:
  for kind in ('GPU', 'TPU'):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):  # Already initialised / no such kind.
      pass


_hide_accelerators_from_tf()

from hvaeood.datasets_info import (  # pylint: disable=g-import-not-at-top,unused-import
    ALIASES, DATASETS, PREPROCESSING_KINDS, DatasetInfo, IDX_IMPORTABLE, check_image_shape, get_dataset_info,
    prepare_command)

# Random streams, so that training and evaluation noise are unrelated.
_TRAIN_STREAM = 1
_EVAL_STREAM = 2
_SHUFFLE_STREAM = 3
_MAX_EPOCHS = 2**40

# Largest float32 below 1.
_BELOW_ONE = float(np.nextafter(np.float32(1), np.float32(0)))
# u is capped here so that k + u (k <= 255) never rounds up to k + 1 in float32.
_MAX_DEQUANT_NOISE = 1.0 - 2.0**-16




class DatasetNotPreparedError(FileNotFoundError):
  """The dataset is not in the TFDS data_dir (and TFDS cannot download)."""


# ----------------------------------------------------------------------------
# Preprocessing: the single place where uint8 pixels become model inputs.
# ----------------------------------------------------------------------------


def epoch_key(seed: Any, stream: int, epoch: Any) -> tf.Tensor:
  """Stateless-RNG key (int64 [2]) of one epoch of one random stream."""
  key = tf.stack([tf.cast(seed, tf.int64), tf.constant(stream, tf.int64)])
  return tf.random.experimental.stateless_fold_in(key, tf.cast(epoch, tf.int64))


def example_seed(seed: Any, stream: int, epoch: Any, index: Any) -> tf.Tensor:
  """Stateless-RNG seed (int64 [2]) for example `index` in one epoch."""
  return tf.random.experimental.stateless_fold_in(
      epoch_key(seed, stream, epoch), tf.cast(index, tf.int64))


def noise_key(seed: Any, name: str, split: str) -> tf.Tensor:
  """Stateless-RNG key (int64 [2]) of the evaluation noise of split `split` of the set called `name` (as given).

  The name and the split are folded in, so example i of the in-distribution
  test set, of its train split and of every OOD set get independent
  binarisation/dequantisation noise under the same seed.
  """
  tag = zlib.crc32(f'{name}:{split}'.encode())
  return tf.random.experimental.stateless_fold_in(
      epoch_key(seed, _EVAL_STREAM, 0), tf.constant(tag & 0x7FFFFFFF, tf.int64))


def eval_noise_key(seed: Any, dataset: str, split: str) -> tf.Tensor:
  """`noise_key` of a registry dataset, under its registry name (aliases resolved)."""
  return noise_key(seed, get_dataset_info(dataset).name, split)


def _luminance(x: tf.Tensor) -> tf.Tensor:
  """Reference grey conversion (docs/design.md §5): sRGB luminance, then gamma expansion.

  The reference applies the Rec. 709 weights to the (gamma-encoded) values
  and then the sRGB gamma expansion to the result; we do the same for parity.
  Input [..., 3] in [0, 1], output [..., 1] in [0, 1].
  """
  weights = tf.constant([0.2126, 0.7152, 0.0722], x.dtype)
  y = tf.reduce_sum(x * weights, axis=-1, keepdims=True)
  y = tf.clip_by_value(y, 0.0, 1.0)
  return tf.where(y <= 0.04045, y / 12.92, tf.pow((y + 0.055) / 1.055, 2.4))


def _apply_colour(x: tf.Tensor, colour_transform: str | None,
                  channels: int) -> tf.Tensor:
  if colour_transform is None:
    return x
  if colour_transform == 'luminance':
    y = _luminance(x)
  else:
    raise ValueError(f'Unknown colour transform {colour_transform!r}.')
  if channels != 1:
    y = tf.repeat(y, channels, axis=-1)
  return y


def preprocess_image(image: tf.Tensor, kind: str, seed: tf.Tensor | None,
                     *, colour_transform: str | None = None,
                     channels: int | None = None) -> tf.Tensor:
  """Maps uint8 pixels to float32 model inputs in [0, 1].

  Args:
    image: uint8 [..., H, W, C] (any leading dims).
    kind: one of `PREPROCESSING_KINDS`.
    seed: int [2] stateless seed (see `example_seed`); required for
      'binarize' and 'dequantize', ignored otherwise.
    colour_transform: None or 'luminance' (RGB -> grey).
    channels: output channels after a colour transform (1, or 3 to replicate).

  Returns:
    float32 tensor, same shape as `image` (channels changed by a colour
    transform).
  """
  if kind not in PREPROCESSING_KINDS:
    raise ValueError(f'Unknown preprocessing {kind!r}; expected one of '
                     f'{PREPROCESSING_KINDS}.')
  k = tf.cast(image, tf.float32)
  out_channels = channels or 1
  if kind == 'binarize':
    p = _apply_colour(k / 255.0, colour_transform, 1)
    u = tf.random.stateless_uniform(tf.shape(p), seed=seed, dtype=tf.float32)
    x = tf.cast(u < p, tf.float32)  # p == 0 -> 0 and p == 1 -> 1, exactly.
    if colour_transform is not None and out_channels != 1:
      x = tf.repeat(x, out_channels, axis=-1)
    return x
  if kind == 'dequantize':
    u = tf.random.stateless_uniform(tf.shape(k), seed=seed, dtype=tf.float32)
    x = (k + tf.minimum(u, _MAX_DEQUANT_NOISE)) / 256.0
  else:  # 'bin_centre' and 'quantize': the likelihood's bin centres k / 255
    x = k / 255.0
  x = _apply_colour(x, colour_transform, out_channels)
  if colour_transform is not None and kind == 'dequantize':
    x = tf.minimum(x, _BELOW_ONE)  # Keep dequantised data in [0, 1).
  return x


def preprocess_numpy(images: np.ndarray, kind: str, *, seed: int,
                     epoch: int = 0, indices: Sequence[int] | None = None,
                     stream: int = _EVAL_STREAM, dataset: str | None = None,
                     split: str = 'test', name: str | None = None
                     ) -> np.ndarray:
  """`preprocess_image` on a numpy uint8 batch [N, H, W, C] (for tools/tests).

  Example i gets the seed of (seed, stream, epoch, indices[i]); with
  `dataset` (and `split`) it gets the evaluation key of that split instead
  (`eval_noise_key`), which equals what `create_eval_dataset` gives example
  indices[i] of it; with `name` (and `split`) the key `noise_key` gives that
  name, as `create_eval_dataset_from_array` does.
  """
  images = np.asarray(images)
  if indices is None:
    indices = np.arange(len(images))
  indices = tf.constant(np.asarray(indices, np.int64))
  if name is not None:
    key = noise_key(seed, name, split)
  else:
    key = (eval_noise_key(seed, dataset, split) if dataset is not None
           else epoch_key(seed, stream, epoch))

  def one(args):
    img, idx = args
    return preprocess_image(
        img, kind,
        tf.random.experimental.stateless_fold_in(key, tf.cast(idx, tf.int64)))

  out = tf.map_fn(one, (tf.constant(images), indices),
                  fn_output_signature=tf.float32)
  return out.numpy()


# ----------------------------------------------------------------------------
# Reading TFDS.
# ----------------------------------------------------------------------------


def _not_prepared_message(info: DatasetInfo, data_dir: str | None,
                          detail: str) -> str:
  where = data_dir if data_dir else (
      f'the default TFDS data_dir ({tfds.core.constants.DATA_DIR})')
  return (f'Dataset {info.name!r} (TFDS {info.tfds_name!r}) is not prepared '
          f'in {where} and TFDS cannot download here ({detail}). '
          f'To fix, run: {prepare_command(info.name, data_dir)}')


def _builder(info: DatasetInfo, data_dir: str | None):
  try:
    builder = tfds.builder(info.tfds_name, data_dir=data_dir)
    prepared = builder.is_prepared()
  except Exception as e:  # pylint: disable=broad-except
    raise DatasetNotPreparedError(
        _not_prepared_message(info, data_dir, f'{type(e).__name__}: {e}')
    ) from e
  if not prepared:
    raise DatasetNotPreparedError(
        _not_prepared_message(info, data_dir, 'no dataset_info.json found'))
  return builder


def _tfds_split(info: DatasetInfo, builder, split: str,
                data_dir: str | None) -> tuple[str, int]:
  """Returns (TFDS split name, number of examples); clear error if absent."""
  tfds_split = info.splits.get(split, split)
  splits = builder.info.splits
  if tfds_split not in splits:
    available = sorted(splits.keys())
    msg = (f'Split {split!r} (TFDS {tfds_split!r}) of {info.name!r} is not in '
           f'{builder.data_dir}; available splits: {available}.')
    if info.tfds_name in IDX_IMPORTABLE:
      msg += (' Re-import with the missing IDX files: ' +
              _not_prepared_message(info, data_dir, 'split missing')
              .split('To fix, run: ')[-1] + ' --overwrite')
    raise ValueError(msg)
  return tfds_split, int(splits[tfds_split].num_examples)


def _host_range(n: int, process_index: int, process_count: int
                ) -> tuple[int, int]:
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in '
                     f'[0, {process_count}).')
  return (n * process_index // process_count,
          n * (process_index + 1) // process_count)


def _source_transform(info: DatasetInfo, image: tf.Tensor) -> tf.Tensor:
  if info.source_transform in ('omniglot28', 'omniglot28_inverted'):
    grey = tf.reduce_mean(tf.cast(image, tf.float32), axis=-1, keepdims=True)
    grey = tf.image.resize(tf.round(grey), info.shape[:2], method='nearest')
    image = tf.cast(grey, tf.uint8)
    if info.source_transform == 'omniglot28_inverted':
      image = 255 - image
  elif info.source_transform is not None:
    raise ValueError(f'Unknown source transform {info.source_transform!r}.')
  return image


def _read(info: DatasetInfo, builder, tfds_split: str, start: int, end: int,
          data_dir: str | None) -> tf.data.Dataset:
  """Examples [start, end) of a split in file order: dict(index, image, label).

  `image` is uint8 after the source transform (before colour transforms).
  """
  try:
    ds = builder.as_dataset(
        split=f'{tfds_split}[{start}:{end}]', shuffle_files=False,
        read_config=tfds.ReadConfig(try_autocache=False))
  except (AssertionError, tf.errors.NotFoundError, OSError) as e:
    raise DatasetNotPreparedError(
        _not_prepared_message(info, data_dir, f'{type(e).__name__}: {e}')
    ) from e

  def convert(index, ex):
    return {'index': index,
            'image': _source_transform(info, ex['image']),
            'label': tf.cast(ex['label'], tf.int32)}

  ds = ds.enumerate(start=start).map(
      convert, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options)


def _make_preprocess_fn(info: DatasetInfo, kind: str):
  """fn(example, epoch_key) -> float32 image; == example_seed's noise."""
  def fn(ex, key):
    example_key = tf.random.experimental.stateless_fold_in(
        key, tf.cast(ex['index'], tf.int64))
    x = preprocess_image(ex['image'], kind, example_key,
                         colour_transform=info.colour_transform,
                         channels=info.shape[-1])
    return tf.ensure_shape(x, info.shape)
  return fn


def _local_batch(global_batch: int, process_count: int) -> int:
  if global_batch <= 0 or global_batch % process_count:
    raise ValueError(f'Batch size {global_batch} must be a positive multiple '
                     f'of process_count={process_count}.')
  return global_batch // process_count


def _cfg(section, key: str, default: Any) -> Any:
  try:
    value = section.get(key, default)
  except AttributeError:
    value = getattr(section, key, default)
  return default if value is None and default is not None else value


def _check_kind(kind: str) -> str:
  if kind not in PREPROCESSING_KINDS:
    raise ValueError(f'Unknown preprocessing {kind!r}; expected one of '
                     f'{PREPROCESSING_KINDS}.')
  return kind


def _numpy_iterator(ds: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
  yield from ds.as_numpy_iterator()


# ----------------------------------------------------------------------------
# Training.
# ----------------------------------------------------------------------------


def _train_geometry(config, process_count: int):
  """(info, builder, tfds split, examples used, local batch, steps/epoch)."""
  info = get_dataset_info(config.data.name)
  data_dir = _cfg(config.data, 'data_dir', None)
  builder = _builder(info, data_dir)
  tfds_split, n = _tfds_split(info, builder, 'train', data_dir)
  cap = _cfg(config.data, 'max_train_examples', None)
  if cap:
    n = min(n, int(cap))
  local_batch = _local_batch(int(config.train.batch_size), process_count)
  steps = (n // process_count) // local_batch
  if steps == 0:
    raise ValueError(
        f'{info.name} train: {n} examples over {process_count} process(es) is '
        f'less than one batch of {config.train.batch_size}.')
  return info, builder, tfds_split, n, local_batch, steps


def steps_per_epoch(config, process_count: int = 1) -> int:
  """Number of batches in one training epoch (identical on every host).

  Each host reads `num_train // process_count` examples per epoch, in batches
  of `config.train.batch_size // process_count`; the remainder is dropped
  (so FashionMNIST at batch 128 has 468 steps, not the reference's 469).
  `num_train` is the train split size, or `config.data.max_train_examples`
  if that optional field is set and smaller (tiny test/CI configs).
  """
  return _train_geometry(config, process_count)[-1]


def _block_shuffle(ds: tf.data.Dataset, block: int, seed: tf.Tensor
                   ) -> tf.data.Dataset:
  """Stateless shuffle of consecutive blocks of `block` examples."""
  def shuffle_block(j, ex):
    n = tf.shape(ex['index'])[0]
    block_seed = tf.random.experimental.stateless_fold_in(seed, j)
    perm = tf.random.experimental.stateless_shuffle(tf.range(n),
                                                    seed=block_seed)
    return tf.nest.map_structure(lambda t: tf.gather(t, perm), ex)
  return ds.batch(block).enumerate().map(shuffle_block).unbatch()


def create_train_iterator(config, *, seed: int | None = None,
                          process_index: int = 0, process_count: int = 1,
                          start_step: int = 0
                          ) -> Iterator[dict[str, np.ndarray]]:
  """Endless iterator of training batches for this host.

  Args:
    config: ConfigDict with `data.name`, `data.preprocessing`, `data.data_dir`
      (None = TFDS default), `data.shuffle_buffer` (block size of the
      stateless shuffle; 0/None or >= split size = full shuffle), optionally
      `data.max_train_examples` (use only the first N train examples),
      `train.batch_size` (global) and `seed`.
    seed: data seed; defaults to `config.seed`.
    process_index: this host's index.
    process_count: number of hosts; each reads a disjoint slice of the split.
    start_step: first global step to produce (for resuming).

  Returns:
    Iterator of dict(image=float32 [local_batch, H, W, C] in [0, 1],
    label=int32 [local_batch]), local_batch = batch_size // process_count.
    Batch i of the iterator is global step start_step + i; the sequence is the
    same as an uninterrupted iterator's from that step on.
  """
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}.')
  info, builder, tfds_split, n, local_batch, spe = _train_geometry(
      config, process_count)
  kind = _check_kind(_cfg(config.data, 'preprocessing', info.preprocessing))
  data_dir = _cfg(config.data, 'data_dir', None)
  seed = int(config.seed if seed is None else seed)
  start, end = _host_range(n, process_index, process_count)
  per_epoch = spe * local_batch
  block = int(_cfg(config.data, 'shuffle_buffer', 0) or 0)
  if block <= 0 or block >= end - start:
    block = end - start

  raw = _read(info, builder, tfds_split, start, end, data_dir).cache()
  shuffle_key = tf.constant([seed, _SHUFFLE_STREAM], tf.int64)

  def one_epoch(epoch):
    key = tf.random.experimental.stateless_fold_in(shuffle_key, epoch)
    key = tf.random.experimental.stateless_fold_in(key, process_index)
    ds = _block_shuffle(raw, block, key).take(per_epoch)
    noise_key = epoch_key(seed, _TRAIN_STREAM, epoch)  # Once per epoch.
    return ds.map(lambda ex: (ex, noise_key))

  first_epoch, skip_steps = divmod(int(start_step), spe)
  ds = tf.data.Dataset.range(first_epoch, _MAX_EPOCHS).flat_map(one_epoch)
  ds = ds.skip(skip_steps * local_batch)
  preprocess = _make_preprocess_fn(info, kind)
  ds = ds.map(lambda ex, key: {'image': preprocess(ex, key),
                                 'label': ex['label']},
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return _numpy_iterator(ds)


# ----------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------


def num_examples(name: str, split: str, data_dir: str | None = None) -> int:
  """The number of examples of a split of a prepared dataset (clear error if absent)."""
  info = get_dataset_info(name)
  return _tfds_split(info, _builder(info, data_dir), split, data_dir)[1]


def png_bits(image8: tf.Tensor) -> tf.Tensor:
  """float32 scalar: 8 x the byte length of `tf.io.encode_png(image8, compression=9)`.

  The input complexity L(x) of Serra et al. (ICLR 2020), in bits, of a uint8
  [H, W, C] image (C in {1, 3}).
  """
  encoded = tf.io.encode_png(image8, compression=9)
  return 8.0 * tf.cast(tf.strings.length(encoded), tf.float32)


def _scored_uint8(image: tf.Tensor, x: tf.Tensor, kind: str,
                  info: DatasetInfo) -> tf.Tensor:
  """The image as the model scores it, at 8 bits (what `png_bits` encodes).

  'binarize': the binarised x times 255; otherwise the uint8 source image
  after the source transform, and after the colour transform (rounded to
  k/255) where the dataset has one.
  """
  if kind == 'binarize':
    return tf.cast(x * 255.0, tf.uint8)
  if info.colour_transform is None:
    return image
  y = _apply_colour(tf.cast(image, tf.float32) / 255.0, info.colour_transform,
                    info.shape[-1])
  return tf.cast(tf.round(y * 255.0), tf.uint8)


def _eval_slice(n: int, max_examples: int | None, local_batch: int,
                process_index: int, process_count: int, what: str
                ) -> tuple[int, int, int]:
  """(start, end, padding rows) of this host's part of the first n examples."""
  if max_examples is not None:
    n = min(n, int(max_examples))
  if n <= 0:
    raise ValueError(f'No examples to evaluate in {what} '
                     f'(max_examples={max_examples}).')
  start, end = _host_range(n, process_index, process_count)
  num_batches = math.ceil(math.ceil(n / process_count) / local_batch)
  num_padding = num_batches * local_batch - (end - start)
  assert num_padding >= 0, (num_padding, start, end, n)
  return start, end, num_padding


def _eval_batches(examples: tf.data.Dataset, info: DatasetInfo, kind: str,
                  key: tf.Tensor, local_batch: int, num_padding: int
                  ) -> Iterator[dict[str, np.ndarray]]:
  """Preprocessed examples (dict(index, image, label)), zero padding, batches."""
  preprocess = _make_preprocess_fn(info, kind)

  def one(ex):
    x = preprocess(ex, key)
    return {'image': x, 'label': ex['label'], 'mask': tf.constant(True),
            'png_bits': png_bits(_scored_uint8(ex['image'], x, kind, info))}

  ds = examples.map(one, num_parallel_calls=tf.data.AUTOTUNE,
                    deterministic=True)
  padding = tf.data.Dataset.from_tensors({
      'image': tf.zeros(info.shape, tf.float32),
      'label': tf.constant(-1, tf.int32),
      'mask': tf.constant(False),
      'png_bits': tf.constant(0.0, tf.float32)}).repeat(num_padding)
  ds = ds.concatenate(padding).batch(local_batch, drop_remainder=True)
  return _numpy_iterator(ds.prefetch(tf.data.AUTOTUNE))


def _eval_batch_size(batch_size: int) -> int:
  if int(batch_size) <= 0:
    raise ValueError(f'batch_size must be positive, got {batch_size}.')
  return int(batch_size)


def create_eval_dataset(name: str, split: str, *, preprocessing: str,
                        batch_size: int, seed: int,
                        max_examples: int | None = None,
                        data_dir: str | None = None, process_index: int = 0,
                        process_count: int = 1,
                        target_shape: Sequence[int] | None = None
                        ) -> tuple[Iterator[dict[str, np.ndarray]], int]:
  """Deterministic, padded evaluation batches for this host.

  Takes the first `max_examples` examples of the split (file order, no
  shuffling, as the reference), splits them into contiguous per-host slices,
  and pads the end with zero images so that every batch -- and every host --
  has the same static shape and number of batches.

  Args:
    name: dataset name (see `DATASETS`), e.g. 'mnist'.
    split: 'train', 'test', 'validation' (the reference's meaning) or a TFDS
      split name.
    preprocessing: one of `PREPROCESSING_KINDS`.
    batch_size: examples per yielded batch, on each host (the global eval
      batch is batch_size * process_count).
    seed: seed of the binarisation/dequantisation noise; the same seed gives
      the same data. The dataset and split are folded into it
      (`eval_noise_key`): different sets never share noise.
    max_examples: cap on the number of examples (None = whole split).
    data_dir: TFDS data_dir (None = TFDS default).
    process_index, process_count: this host and the number of hosts.
    target_shape: the model's (H, W, C); a mismatch raises ValueError.

  Returns:
    (iterator, num_examples): the iterator yields dict(image=float32
    [batch_size, H, W, C], label=int32 (-1 for padding), mask=bool, True for
    real examples, png_bits=float32: `png_bits` of the image as the model
    scores it at 8 bits (`_scored_uint8`), 0 for padding); num_examples is
    the number of real examples on this host.
  """
  info = get_dataset_info(name)
  kind = _check_kind(preprocessing)
  if target_shape is not None:
    check_image_shape(name, target_shape)
  local_batch = _eval_batch_size(batch_size)
  builder = _builder(info, data_dir)
  tfds_split, n = _tfds_split(info, builder, split, data_dir)
  start, end, num_padding = _eval_slice(
      n, max_examples, local_batch, process_index, process_count,
      f'{name}:{split}')
  examples = _read(info, builder, tfds_split, start, end, data_dir)
  key = eval_noise_key(seed, name, split)
  return (_eval_batches(examples, info, kind, key, local_batch, num_padding),
          end - start)


def create_eval_dataset_from_array(
    images: np.ndarray, name: str, split: str, *, preprocessing: str,
    batch_size: int, seed: int, max_examples: int | None = None,
    process_index: int = 0, process_count: int = 1,
    labels: np.ndarray | None = None
) -> tuple[Iterator[dict[str, np.ndarray]], int]:
  """`create_eval_dataset` for images already in memory (`image_sources.load`).

  The same host slicing, padding, batches and per-example preprocessing, with
  the noise key `noise_key(seed, name, split)`: for a registry key as `name`
  and that dataset's images, the batches equal `create_eval_dataset`'s.

  Args:
    images: uint8 [N, H, W, C], in the model's shape, in file order.
    name: the set's name (folded into the noise key as given).
    split: the split's name (folded into the noise key).
    preprocessing, batch_size, seed, max_examples, process_index,
      process_count: as for `create_eval_dataset`.
    labels: int [N] labels (None: -1, unlabelled).

  Returns:
    (iterator, num_examples) as `create_eval_dataset`; no colour transform
    applies, so png_bits encodes the uint8 image as given (binarised x 255
    for 'binarize').
  """
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(f'{name}: images must be uint8 [N, H, W, C], got '
                     f'{images.dtype} {images.shape}.')
  kind = _check_kind(preprocessing)
  local_batch = _eval_batch_size(batch_size)
  start, end, num_padding = _eval_slice(
      len(images), max_examples, local_batch, process_index, process_count,
      f'{name}:{split}')
  labels = (np.full(len(images), -1) if labels is None else np.asarray(labels))
  if labels.shape != images.shape[:1]:
    raise ValueError(f'{name}: {labels.shape} labels for {len(images)} images.')
  examples = tf.data.Dataset.from_tensor_slices({
      'index': np.arange(start, end, dtype=np.int64),
      'image': images[start:end],
      'label': labels[start:end].astype(np.int32)})
  info = DatasetInfo(name, '', {}, tuple(images.shape[1:]),
                     images.shape[-1] == 1, kind)
  return (_eval_batches(examples, info, kind, noise_key(seed, name, split),
                        local_batch, num_padding), end - start)
