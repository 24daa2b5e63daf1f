"""Imports MNIST-family IDX files into a TFDS data_dir, offline.

TFDS cannot download on machines without network, and its checksum check
rejects local copies whose gzip bytes differ from the ones it knows. This
module reads the IDX files directly and writes them with the *registered* TFDS
builder (same name, version and features: ``image`` uint8 (28, 28, 1) and
``label``), so afterwards::

    tfds.load('fashion_mnist', split='test', data_dir=DATA_DIR)

works with no network. Only the splits whose files are present are written
(e.g. MNIST with only the ``t10k`` files gives a ``test`` split only).

Usage::

    python -m hvaeood.data_import --name fashion_mnist \
        --src /usr/share/datasets/fashion-mnist --data_dir ~/tensorflow_datasets

Re-running on an existing import is a fast no-op (the IDX headers are compared
with the split sizes already in the data_dir). ``--overwrite`` rebuilds.

How the builder is fed: on a builder *instance* we replace
``_split_generators`` (so only local splits are generated), ``_generate_examples``
(so examples come from the decoded IDX arrays) and ``_make_download_manager``
(so nothing ever touches the network, and TFDS's checksum machinery is not
involved). Everything else -- example serialisation, the per-key shuffling of
records, ``dataset_info.json`` -- is TFDS's own code, so the result is laid out
exactly like a normal ``download_and_prepare``. Images are passed to TFDS as
PNG bytes produced by a small lossless encoder here; this is about twice as
fast as TFDS's TF-graph PNG encoder, and the tests check that decoding returns
the raw IDX bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import os
import struct
import sys
import types
import zlib
from typing import Iterator, Sequence

import numpy as np

IDX_IMAGES_MAGIC = 2051  # 0x00000803: uint8, 3 dimensions.
IDX_LABELS_MAGIC = 2049  # 0x00000801: uint8, 1 dimension.
IMAGE_SIZE = 28

# Datasets this module can import: all are TFDS MNIST-family builders whose
# features are image (28, 28, 1) uint8 + a 10-class label.
IMPORTABLE = ('mnist', 'fashion_mnist', 'kmnist')

# IDX file stems per TFDS split (the names of the original distributions).
_SPLIT_STEMS = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}


class IdxFormatError(ValueError):
  """An IDX file is malformed (bad magic number, sizes or truncated data)."""


@dataclasses.dataclass(frozen=True)
class IdxSplitFiles:
  """The pair of IDX files of one split and their (validated) header counts."""
  split: str
  images_path: str
  labels_path: str
  num_examples: int


def _open(path: str):
  return gzip.open(path, 'rb') if path.endswith('.gz') else open(path, 'rb')


def _read_header(path: str, num_dims: int) -> tuple[int, ...]:
  """Returns (magic, dim_1, ..., dim_n) from the big-endian IDX header."""
  size = 4 * (1 + num_dims)
  try:
    with _open(path) as f:
      header = f.read(size)
  except (OSError, EOFError, zlib.error) as e:
    raise IdxFormatError(f'Cannot read IDX file {path}: {e}') from e
  if len(header) < size:
    raise IdxFormatError(
        f'{path}: file too short for an IDX header ({len(header)} bytes).')
  return struct.unpack('>' + 'I' * (1 + num_dims), header)


def _check_images_header(path: str) -> int:
  magic, n, rows, cols = _read_header(path, 3)
  if magic != IDX_IMAGES_MAGIC:
    raise IdxFormatError(
        f'{path}: bad magic number {magic}, expected {IDX_IMAGES_MAGIC} '
        '(IDX uint8 images). Is this an image file of MNIST/FashionMNIST/'
        'KMNIST, and not a labels file?')
  if (rows, cols) != (IMAGE_SIZE, IMAGE_SIZE):
    raise IdxFormatError(
        f'{path}: images are {rows}x{cols}, expected '
        f'{IMAGE_SIZE}x{IMAGE_SIZE}.')
  return n


def _check_labels_header(path: str) -> int:
  magic, n = _read_header(path, 1)
  if magic != IDX_LABELS_MAGIC:
    raise IdxFormatError(
        f'{path}: bad magic number {magic}, expected {IDX_LABELS_MAGIC} '
        '(IDX uint8 labels). Is this a labels file, and not an image file?')
  return n


def _find(src_dir: str, stem: str) -> str | None:
  for candidate in (stem + '.gz', stem):
    path = os.path.join(src_dir, candidate)
    if os.path.isfile(path):
      return path
  return None


def find_idx_files(src_dir: str) -> list[IdxSplitFiles]:
  """Finds and validates the IDX files of each split present in `src_dir`.

  Args:
    src_dir: directory holding e.g. `t10k-images-idx3-ubyte.gz` and
      `t10k-labels-idx1-ubyte.gz` (gzipped or not), and/or the `train-*` pair.

  Returns:
    One `IdxSplitFiles` per split whose two files are present.

  Raises:
    FileNotFoundError: `src_dir` is missing, holds no split, or only one file
      of a pair.
    IdxFormatError: a header has a bad magic number, image size, or image and
      label counts disagree.
  """
  if not os.path.isdir(src_dir):
    raise FileNotFoundError(f'IDX source directory {src_dir!r} does not exist.')
  found = []
  for split, (img_stem, lbl_stem) in _SPLIT_STEMS.items():
    img, lbl = _find(src_dir, img_stem), _find(src_dir, lbl_stem)
    if img is None and lbl is None:
      continue
    if img is None or lbl is None:
      missing = img_stem if img is None else lbl_stem
      raise FileNotFoundError(
          f'{src_dir}: found only one file of the {split!r} split; '
          f'{missing}[.gz] is missing.')
    n_img, n_lbl = _check_images_header(img), _check_labels_header(lbl)
    if n_img != n_lbl:
      raise IdxFormatError(
          f'{split!r} split: {img} holds {n_img} images but {lbl} holds '
          f'{n_lbl} labels.')
    found.append(IdxSplitFiles(split, img, lbl, n_img))
  if not found:
    expected = ', '.join(f'{s}[.gz]' for pair in _SPLIT_STEMS.values()
                         for s in pair)
    raise FileNotFoundError(
        f'No IDX files in {src_dir!r}; expected a pair among: {expected}.')
  return found


def read_idx(files: IdxSplitFiles) -> tuple[np.ndarray, np.ndarray]:
  """Reads one split: images uint8 [N, 28, 28, 1] and labels uint8 [N]."""
  n = files.num_examples
  with _open(files.images_path) as f:
    raw = f.read()
  if len(raw) != 16 + n * IMAGE_SIZE * IMAGE_SIZE:
    raise IdxFormatError(
        f'{files.images_path}: header says {n} images of '
        f'{IMAGE_SIZE}x{IMAGE_SIZE}, i.e. {16 + n * IMAGE_SIZE ** 2} bytes, '
        f'but the file holds {len(raw)} bytes (truncated or corrupt).')
  images = np.frombuffer(raw, np.uint8, offset=16).reshape(
      n, IMAGE_SIZE, IMAGE_SIZE, 1)
  with _open(files.labels_path) as f:
    raw = f.read()
  if len(raw) != 8 + n:
    raise IdxFormatError(
        f'{files.labels_path}: header says {n} labels ({8 + n} bytes) but the '
        f'file holds {len(raw)} bytes.')
  labels = np.frombuffer(raw, np.uint8, offset=8)
  if labels.size and labels.max() >= 10:
    raise IdxFormatError(
        f'{files.labels_path}: label {labels.max()} out of range [0, 10).')
  return images, labels


def _png_chunk(tag: bytes, data: bytes) -> bytes:
  crc = zlib.crc32(tag + data) & 0xFFFFFFFF
  return struct.pack('>I', len(data)) + tag + data + struct.pack('>I', crc)


def encode_png_grey(image: np.ndarray) -> bytes:
  """Losslessly encodes a uint8 [H, W] or [H, W, 1] image as an 8-bit grey PNG."""
  h, w = image.shape[:2]
  # Every scanline is prefixed with filter type 0 (none).
  scanlines = np.zeros((h, w + 1), np.uint8)
  scanlines[:, 1:] = image.reshape(h, w)
  ihdr = struct.pack('>IIBBBBB', w, h, 8, 0, 0, 0, 0)  # 8-bit greyscale.
  return (b'\x89PNG\r\n\x1a\n' + _png_chunk(b'IHDR', ihdr) +
          _png_chunk(b'IDAT', zlib.compress(scanlines.tobytes(), 6)) +
          _png_chunk(b'IEND', b''))


class _OfflineDownloadManager:
  """Stands in for TFDS's DownloadManager: no downloads, nothing downloaded."""
  downloaded_size = 0

  def __getattr__(self, name):
    raise RuntimeError(
        f'hvaeood.data_import: the builder tried to use the download manager '
        f'({name}); this import is offline only.')


@contextlib.contextmanager
def _file_lock(data_dir: str, name: str):
  """Serialises concurrent imports of the same dataset into one data_dir."""
  os.makedirs(data_dir, exist_ok=True)
  lock_path = os.path.join(data_dir, f'.hvaeood_import_{name}.lock')
  with open(lock_path, 'w') as f:
    try:
      import fcntl  # pylint: disable=g-import-not-at-top
      fcntl.flock(f, fcntl.LOCK_EX)
    except (ImportError, OSError):  # No POSIX locks (e.g. Windows): no-op.
      pass
    yield


def _existing_splits(builder) -> dict[str, int]:
  if not builder.is_prepared():
    return {}
  return {name: int(s.num_examples) for name, s in builder.info.splits.items()}


def import_idx(name: str, src_dir: str, data_dir: str, *,
               overwrite: bool = False) -> None:
  """Writes the IDX files of `src_dir` into `data_dir` as TFDS dataset `name`.

  Args:
    name: TFDS name, one of `IMPORTABLE` ('mnist', 'fashion_mnist', 'kmnist').
    src_dir: directory with `train-{images-idx3,labels-idx1}-ubyte[.gz]` and/or
      `t10k-{images-idx3,labels-idx1}-ubyte[.gz]`.
    data_dir: TFDS data_dir to write `<name>/<version>/` into.
    overwrite: rebuild even if the dataset is already there.

  Raises:
    ValueError: unknown `name`, or an existing import with different splits
      (and `overwrite` is False).
    FileNotFoundError, IdxFormatError: see `find_idx_files` / `read_idx`.
  """
  if name not in IMPORTABLE:
    raise ValueError(
        f'Unknown dataset {name!r} for IDX import; supported: '
        f'{", ".join(IMPORTABLE)}. (Other datasets, e.g. cifar10, must be '
        'prepared with `tfds build` on a machine with network.)')
  files = find_idx_files(src_dir)
  wanted = {f.split: f.num_examples for f in files}

  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  data_dir = os.path.abspath(os.path.expanduser(data_dir))
  with _file_lock(data_dir, name):
    builder = tfds.builder(name, data_dir=data_dir)
    existing = _existing_splits(builder)
    if existing and not overwrite:
      if all(existing.get(s) == n for s, n in wanted.items()):
        print(f'{name} {builder.version}: already imported at '
              f'{builder.data_dir} (splits {existing}); nothing to do.')
        return
      raise ValueError(
          f'{builder.data_dir} already holds {name} with splits {existing}, '
          f'but {src_dir} has {wanted}. Re-run with --overwrite '
          '(overwrite=True) to rebuild it from these files.')
    if existing:
      print(f'Removing existing {builder.data_dir} (overwrite).')
      builder.data_path.rmtree()
      builder = tfds.builder(name, data_dir=data_dir)

    arrays = {f.split: read_idx(f) for f in files}
    _prepare_from_arrays(builder, arrays)

    prepared = tfds.builder(name, data_dir=data_dir)
    got = _existing_splits(prepared)
    if got != wanted:
      raise RuntimeError(f'Import of {name} wrote splits {got}, '
                         f'expected {wanted}.')
    for split, n in got.items():
      print(f'Wrote {name}:{prepared.version} split {split!r}: {n} examples '
            f'-> {prepared.data_dir}')


def _prepare_from_arrays(builder,
                         arrays: dict[str, tuple[np.ndarray, np.ndarray]]):
  """Runs `builder.download_and_prepare` fed from in-memory arrays."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  def split_generators(self, dl_manager):
    del self, dl_manager
    return [tfds.core.SplitGenerator(name=s, gen_kwargs={'split': s})
            for s in arrays]

  def generate_examples(self, split) -> Iterator[tuple[int, dict]]:
    del self
    images, labels = arrays[split]
    # Keys are the IDX indices, as in TFDS's own MNIST builder, so the record
    # order (TFDS shuffles by key hash) matches a normal TFDS preparation.
    for i in range(len(labels)):
      yield i, {'image': encode_png_grey(images[i]), 'label': int(labels[i])}

  builder._split_generators = types.MethodType(split_generators, builder)  # pylint: disable=protected-access
  builder._generate_examples = types.MethodType(generate_examples, builder)  # pylint: disable=protected-access
  builder._make_download_manager = (  # pylint: disable=protected-access
      lambda *args, **kwargs: _OfflineDownloadManager())
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m hvaeood.data_import',
      description='Import MNIST-family IDX files into a TFDS data_dir '
      '(offline).')
  parser.add_argument('--name', required=True, choices=IMPORTABLE,
                      help='TFDS dataset name.')
  parser.add_argument('--src', required=True,
                      help='Directory with the *-ubyte[.gz] IDX files.')
  parser.add_argument('--data_dir', required=True, help='TFDS data_dir.')
  parser.add_argument('--overwrite', action='store_true',
                      help='Rebuild even if already imported.')
  args = parser.parse_args(argv)
  try:
    import_idx(args.name, args.src, args.data_dir, overwrite=args.overwrite)
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
