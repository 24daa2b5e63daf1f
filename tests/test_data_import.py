"""Tests of the offline IDX -> TFDS import (`hvaeood.data_import`)."""

import gzip
import os
import struct
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from hvaeood import data_import

MNIST_TEST_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974,
                           1009]


def _raw(src, stem):
  files = {f.split: f for f in data_import.find_idx_files(src)}
  return data_import.read_idx(files[stem])


def _write_idx(directory, prefix, images, labels, *, image_magic=2051,
               label_magic=2049, gz=True, truncate=0):
  os.makedirs(directory, exist_ok=True)
  n = len(labels)
  img = struct.pack('>IIII', image_magic, n, 28, 28) + images.tobytes()
  lbl = struct.pack('>II', label_magic, n) + labels.astype(np.uint8).tobytes()
  if truncate:
    img = img[:-truncate]
  for name, data in ((f'{prefix}-images-idx3-ubyte', img),
                     (f'{prefix}-labels-idx1-ubyte', lbl)):
    path = os.path.join(directory, name + ('.gz' if gz else ''))
    with (gzip.open(path, 'wb') if gz else open(path, 'wb')) as f:
      f.write(data)


def _load_all(name, split, data_dir):
  ds = tfds.load(name, split=split, data_dir=data_dir, batch_size=-1,
                 shuffle_files=False, download=False)
  ex = tfds.as_numpy(ds)
  return ex['image'], ex['label']


def _sorted_rows(images, labels):
  """Canonical order of (image, label) pairs, to compare as multisets."""
  rows = np.concatenate([images.reshape(len(images), -1),
                         labels.reshape(-1, 1).astype(np.uint8)], axis=1)
  return rows[np.lexsort(rows.T[::-1])]


@pytest.fixture
def synthetic_src(tmp_path):
  rng = np.random.default_rng(0)
  train = (rng.integers(0, 256, (50, 28, 28, 1), dtype=np.uint8),
           rng.integers(0, 10, 50))
  test = (rng.integers(0, 256, (20, 28, 28, 1), dtype=np.uint8),
          rng.integers(0, 10, 20))
  src = str(tmp_path / 'src')
  _write_idx(src, 't10k', *test)
  return src, train, test


# ----------------------------------------------------------------------------
# Real data (session fixture).


def test_real_import_has_standard_name_version_and_counts(tfds_data_dir):
  fm = tfds.builder('fashion_mnist', data_dir=tfds_data_dir)
  mn = tfds.builder('mnist', data_dir=tfds_data_dir)
  assert fm.is_prepared() and mn.is_prepared()
  assert str(fm.version) == str(tfds.builder_cls('fashion_mnist').VERSION)
  assert str(mn.version) == str(tfds.builder_cls('mnist').VERSION)
  assert {k: v.num_examples for k, v in fm.info.splits.items()} == {
      'train': 60000, 'test': 10000}
  assert {k: v.num_examples for k, v in mn.info.splits.items()} == {
      'test': 10000}
  assert fm.info.features['image'].shape == (28, 28, 1)
  assert fm.info.features['label'].num_classes == 10


def test_real_mnist_test_equals_idx_bytes_and_label_counts(tfds_data_dir,
                                                          idx_source_dirs):
  images, labels = _load_all('mnist', 'test', tfds_data_dir)
  raw_images, raw_labels = _raw(idx_source_dirs['mnist'], 'test')
  assert images.shape == (10000, 28, 28, 1) and images.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(labels, minlength=10),
                                MNIST_TEST_LABEL_COUNTS)
  # TFDS stores records in key-hash order: same (image, label) multiset.
  np.testing.assert_array_equal(_sorted_rows(images, labels),
                                _sorted_rows(raw_images, raw_labels))


def test_real_fashion_mnist_pixels_equal_idx_bytes(tfds_data_dir,
                                                   idx_source_dirs):
  images, labels = _load_all('fashion_mnist', 'test', tfds_data_dir)
  raw_images, raw_labels = _raw(idx_source_dirs['fashion_mnist'], 'test')
  np.testing.assert_array_equal(_sorted_rows(images, labels),
                                _sorted_rows(raw_images, raw_labels))
  # A few train examples, looked up by content in the raw train IDX.
  ds = tfds.load('fashion_mnist', split='train[:200]', data_dir=tfds_data_dir,
                 batch_size=-1, shuffle_files=False, download=False)
  sub = tfds.as_numpy(ds)
  raw_images, raw_labels = _raw(idx_source_dirs['fashion_mnist'], 'train')
  lookup = {raw_images[i].tobytes(): raw_labels[i]
            for i in range(len(raw_labels))}
  for img, lbl in zip(sub['image'], sub['label']):
    assert lookup[img.tobytes()] == lbl


def test_real_reimport_is_fast_noop(tfds_data_dir, idx_source_dirs, capsys):
  info = os.path.join(tfds_data_dir, 'mnist', '3.0.1', 'dataset_info.json')
  mtime = os.path.getmtime(info)
  t0 = time.time()
  data_import.import_idx('mnist', idx_source_dirs['mnist'], tfds_data_dir)
  assert time.time() - t0 < 5.0
  assert os.path.getmtime(info) == mtime
  assert 'already imported' in capsys.readouterr().out


# ----------------------------------------------------------------------------
# Synthetic IDX files: import mechanics and errors.


def test_import_synthetic_writes_only_present_splits(synthetic_src, tmp_path,
                                                     capsys):
  src, _, (images, labels) = synthetic_src
  data_dir = str(tmp_path / 'tfds')
  data_import.import_idx('kmnist', src, data_dir)
  assert "split 'test': 20 examples" in capsys.readouterr().out
  builder = tfds.builder('kmnist', data_dir=data_dir)
  assert list(builder.info.splits.keys()) == ['test']
  got_images, got_labels = _load_all('kmnist', 'test', data_dir)
  np.testing.assert_array_equal(_sorted_rows(got_images, got_labels),
                                _sorted_rows(images, labels))


def test_import_existing_with_other_splits_needs_overwrite(synthetic_src,
                                                           tmp_path):
  src, (tr_images, tr_labels), _ = synthetic_src
  data_dir = str(tmp_path / 'tfds')
  data_import.import_idx('kmnist', src, data_dir)
  _write_idx(src, 'train', tr_images, tr_labels)
  with pytest.raises(ValueError, match='overwrite'):
    data_import.import_idx('kmnist', src, data_dir)
  data_import.import_idx('kmnist', src, data_dir, overwrite=True)
  builder = tfds.builder('kmnist', data_dir=data_dir)
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
      'train': 50, 'test': 20}
  got_images, got_labels = _load_all('kmnist', 'train', data_dir)
  np.testing.assert_array_equal(_sorted_rows(got_images, got_labels),
                                _sorted_rows(tr_images, tr_labels))


def test_cli_main(synthetic_src, tmp_path, capsys):
  src, _, _ = synthetic_src
  data_dir = str(tmp_path / 'tfds')
  argv = ['--name', 'kmnist', '--src', src, '--data_dir', data_dir]
  assert data_import.main(argv) == 0
  assert 'Wrote kmnist' in capsys.readouterr().out
  assert data_import.main(argv) == 0
  assert 'already imported' in capsys.readouterr().out
  empty = tmp_path / 'empty'
  empty.mkdir()
  assert data_import.main(['--name', 'kmnist', '--src', str(empty),
                           '--data_dir', data_dir]) == 1
  assert 'No IDX files' in capsys.readouterr().err


def test_png_encoder_roundtrip():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  img = np.random.default_rng(1).integers(0, 256, (28, 28, 1), np.uint8)
  decoded = tf.io.decode_png(data_import.encode_png_grey(img)).numpy()
  np.testing.assert_array_equal(decoded, img)


def test_unknown_name(tmp_path):
  with pytest.raises(ValueError, match='cifar10.*supported: mnist'):
    data_import.import_idx('cifar10', str(tmp_path), str(tmp_path / 'd'))


def test_missing_dir_and_files(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    data_import.find_idx_files(str(tmp_path / 'nope'))
  with pytest.raises(FileNotFoundError, match='No IDX files'):
    data_import.find_idx_files(str(tmp_path))
  images = np.zeros((3, 28, 28, 1), np.uint8)
  _write_idx(str(tmp_path), 't10k', images, np.zeros(3))
  os.remove(tmp_path / 't10k-labels-idx1-ubyte.gz')
  with pytest.raises(FileNotFoundError, match='t10k-labels-idx1-ubyte'):
    data_import.find_idx_files(str(tmp_path))


def test_bad_magic_numbers(tmp_path):
  images = np.zeros((3, 28, 28, 1), np.uint8)
  _write_idx(str(tmp_path / 'a'), 't10k', images, np.zeros(3),
             image_magic=2049)
  with pytest.raises(data_import.IdxFormatError, match='magic number 2049'):
    data_import.find_idx_files(str(tmp_path / 'a'))
  _write_idx(str(tmp_path / 'b'), 't10k', images, np.zeros(3),
             label_magic=2051, gz=False)
  with pytest.raises(data_import.IdxFormatError, match='magic number 2051'):
    data_import.find_idx_files(str(tmp_path / 'b'))


def test_count_mismatch_and_truncation(tmp_path):
  images = np.zeros((3, 28, 28, 1), np.uint8)
  _write_idx(str(tmp_path / 'a'), 't10k', images, np.zeros(3))
  _write_idx(str(tmp_path / 'tmp'), 't10k', images[:2], np.zeros(2))
  os.replace(tmp_path / 'tmp' / 't10k-labels-idx1-ubyte.gz',
             tmp_path / 'a' / 't10k-labels-idx1-ubyte.gz')
  with pytest.raises(data_import.IdxFormatError, match='3 images.*2 labels'):
    data_import.find_idx_files(str(tmp_path / 'a'))
  _write_idx(str(tmp_path / 'b'), 't10k', images, np.zeros(3), truncate=5)
  (files,) = data_import.find_idx_files(str(tmp_path / 'b'))
  assert files.num_examples == 3
  with pytest.raises(data_import.IdxFormatError, match='truncated'):
    data_import.read_idx(files)
