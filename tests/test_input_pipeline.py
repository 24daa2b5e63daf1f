"""Tests of the tf.data pipelines (`hvaeood.input_pipeline`)."""

import itertools

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from hvaeood import input_pipeline as ip
import helpers_dlm

MNIST_TEST_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974,
                           1009]


def _config(data_dir, *, preprocessing='binarize', batch_size=64,
            max_train_examples=1024, seed=3, shuffle_buffer=0):
  return ml_collections.ConfigDict({
      'seed': seed,
      'data': {'name': 'fashion_mnist', 'preprocessing': preprocessing,
               'data_dir': data_dir, 'shuffle_buffer': shuffle_buffer,
               'max_train_examples': max_train_examples},
      'train': {'batch_size': batch_size},
  })


def _take(iterator, n):
  return list(itertools.islice(iterator, n))


def _eval_all(data_dir, name='mnist', **kwargs):
  kwargs.setdefault('preprocessing', 'quantize')
  kwargs.setdefault('batch_size', 1000)
  kwargs.setdefault('seed', 0)
  it, n = ip.create_eval_dataset(name, 'test', data_dir=data_dir, **kwargs)
  return list(it), n


def _rows(images, labels=None):
  """Images (and labels) as sorted rows: compare batches as multisets."""
  flat = np.round(images.reshape(len(images), -1) * 255).astype(np.int64)
  if labels is not None:
    flat = np.concatenate([flat, labels.reshape(-1, 1)], axis=1)
  return flat[np.lexsort(flat.T[::-1])]


# ----------------------------------------------------------------------------
# Registry and errors (no data needed).


def test_tf_is_kept_off_accelerators():
  assert tf.config.get_visible_devices('GPU') == []


def test_registry_shapes_and_aliases():
  assert ip.get_dataset_info('svhn') is ip.get_dataset_info('svhn_cropped')
  assert ip.get_dataset_info('fashion_mnist').shape == (28, 28, 1)
  assert ip.get_dataset_info('omniglot').shape == (28, 28, 1)
  assert ip.get_dataset_info('cifar10').shape == (32, 32, 3)
  assert ip.get_dataset_info('cifar10_grey').shape == (32, 32, 1)
  assert ip.get_dataset_info('svhn').splits['validation'] == 'extra'
  assert ip.get_dataset_info('mnist').splits['validation'] == 'test'


def test_unknown_dataset_lists_known_names():
  with pytest.raises(ValueError) as e:
    ip.get_dataset_info('imagenet')
  for name in ('fashion_mnist', 'mnist', 'kmnist', 'omniglot', 'cifar10',
               'svhn_cropped', 'svhn', 'cifar10_grey'):
    assert name in str(e.value)
  with pytest.raises(ValueError, match='imagenet'):
    ip.create_eval_dataset('imagenet', 'test', preprocessing='quantize',
                           batch_size=8, seed=0)


def test_shape_mismatch_error_names_dataset_shapes_and_fix(tmp_path):
  with pytest.raises(ValueError) as e:
    ip.create_eval_dataset('cifar10', 'test', preprocessing='dequantize',
                           batch_size=8, seed=0, data_dir=str(tmp_path),
                           target_shape=(32, 32, 1))
  msg = str(e.value)
  assert "'cifar10'" in msg and '(32, 32, 3)' in msg and '(32, 32, 1)' in msg
  assert 'cifar10_grey' in msg
  with pytest.raises(ValueError, match='not converted to 3 channels'):
    ip.check_image_shape('mnist', (28, 28, 3))
  ip.check_image_shape('mnist', (28, 28, 1))  # No error.


def test_not_prepared_error_gives_data_dir_and_import_command(tmp_path):
  with pytest.raises(ip.DatasetNotPreparedError) as e:
    ip.create_eval_dataset('mnist', 'test', preprocessing='binarize',
                           batch_size=8, seed=0, data_dir=str(tmp_path))
  msg = str(e.value)
  assert str(tmp_path) in msg
  assert (f'python -m hvaeood.data_import --name mnist --src' in msg and
          f'--data_dir {tmp_path}' in msg)
  with pytest.raises(ip.DatasetNotPreparedError, match='tfds build cifar10'):
    ip.steps_per_epoch(ml_collections.ConfigDict({
        'data': {'name': 'cifar10', 'data_dir': str(tmp_path)},
        'train': {'batch_size': 8}}))


def test_bad_preprocessing_and_batch():
  with pytest.raises(ValueError, match='preprocessing'):
    ip.preprocess_image(tf.zeros([2, 2, 1], tf.uint8), 'scale', None)
  with pytest.raises(ValueError, match='multiple of process_count'):
    ip._local_batch(10, 3)  # pylint: disable=protected-access


# ----------------------------------------------------------------------------
# Preprocessing on synthetic pixels.


def _all_levels(reps=64):
  """uint8 image [256, reps, 1]: row k holds the value k."""
  return np.repeat(np.arange(256, dtype=np.uint8)[:, None, None], reps, 1)


def _pre(kind, seed, **kwargs):
  return ip.preprocess_image(tf.constant(_all_levels()), kind,
                             tf.constant(seed, tf.int64), **kwargs).numpy()


def test_quantize_and_bin_centre_exact():
  k = _all_levels().astype(np.float64)
  np.testing.assert_allclose(_pre('quantize', [0, 0]), k / 255, rtol=1e-6)
  # The centre of the mixture likelihood's bin k: 2x - 1 = 2k/255 - 1.
  np.testing.assert_allclose(_pre('bin_centre', [0, 0]), k / 255, rtol=1e-6)


@pytest.mark.parametrize('kind', ['bin_centre', 'quantize'])
def test_deterministic_preprocessing_lands_on_the_likelihood_bins(kind):
  """The pipeline's output for the 256 pixel levels sits on the discretised logistic mixture's bins: the
  probabilities of all 256^3 colours of a pixel sum to 1 (SPEC 7.4's bin-centre option)."""
  values = _pre(kind, [0, 0])[:, 0, 0]
  total = helpers_dlm.grid_total(helpers_dlm.coupled_params(), 1, values)
  assert abs(total - 1.0) < 1e-4, (kind, total)


def test_binarize_values_mean_and_determinism():
  x = _pre('binarize', [1, 2])
  assert set(np.unique(x)) <= {0.0, 1.0}
  assert np.all(x[0] == 0) and np.all(x[255] == 1)
  # Row k is 64 Bernoulli(k/255) draws; overall mean ~ mean(k)/255 = 0.5.
  k = np.arange(256) / 255
  assert abs(x.mean() - 0.5) < 0.01
  assert np.corrcoef(x.mean(axis=(1, 2)), k)[0, 1] > 0.97
  np.testing.assert_array_equal(x, _pre('binarize', [1, 2]))
  assert np.mean(x != _pre('binarize', [1, 3])) > 0.1


def test_dequantize_range_and_bins():
  k = _all_levels()
  for s in range(3):
    x = _pre('dequantize', [s, 7])
    assert x.dtype == np.float32
    assert x.min() >= 0 and x.max() < 1
    np.testing.assert_array_equal(np.floor(x.astype(np.float64) * 256), k)
  # The largest noise allowed still stays below the next bin in float32.
  top = (np.float32(255) + np.float32(ip._MAX_DEQUANT_NOISE)) / np.float32(256)  # pylint: disable=protected-access
  assert top < 1 and np.floor(np.float64(top) * 256) == 255
  u = x.astype(np.float64) * 256 - k
  assert abs(u.mean() - 0.5) < 0.01 and u.std() > 0.25


def test_luminance_matches_numpy_reference():
  rgb = np.random.default_rng(0).integers(0, 256, (4, 5, 3), np.uint8)
  y = ip.preprocess_image(tf.constant(rgb), 'quantize', None,
                          colour_transform='luminance', channels=1).numpy()
  lum = (rgb / 255.0) @ np.array([0.2126, 0.7152, 0.0722])
  ref = np.where(lum <= 0.04045, lum / 12.92, ((lum + 0.055) / 1.055)**2.4)
  np.testing.assert_allclose(y[..., 0], ref, atol=1e-5)
  y3 = ip.preprocess_image(tf.constant(rgb), 'binarize',
                           tf.constant([0, 1], tf.int64),
                           colour_transform='luminance', channels=3).numpy()
  assert y3.shape == (4, 5, 3) and np.all(y3 == y3[..., :1])


# ----------------------------------------------------------------------------
# Evaluation pipeline on real data.


def test_eval_pixels_labels_and_counts_mnist(tfds_data_dir, idx_source_dirs):
  from hvaeood import data_import  # pylint: disable=g-import-not-at-top
  batches, n = _eval_all(tfds_data_dir, target_shape=(28, 28, 1))
  assert n == 10000 and len(batches) == 10
  images = np.concatenate([b['image'] for b in batches])
  labels = np.concatenate([b['label'] for b in batches])
  assert images.dtype == np.float32 and images.shape == (10000, 28, 28, 1)
  assert all(b['mask'].all() for b in batches)
  np.testing.assert_array_equal(np.bincount(labels, minlength=10),
                                MNIST_TEST_LABEL_COUNTS)
  (files,) = data_import.find_idx_files(idx_source_dirs['mnist'])
  raw_images, raw_labels = data_import.read_idx(files)
  np.testing.assert_array_equal(_rows(images, labels),
                                _rows(raw_images / 255.0, raw_labels))


def test_eval_padding_mask(tfds_data_dir):
  batches, n = _eval_all(tfds_data_dir, max_examples=1000, batch_size=300)
  full, _ = _eval_all(tfds_data_dir, max_examples=1000, batch_size=1000)
  assert n == 1000 and len(batches) == 4
  assert all(b['image'].shape == (300, 28, 28, 1) for b in batches)
  mask = np.concatenate([b['mask'] for b in batches])
  assert mask.dtype == bool and mask.sum() == 1000 and mask[:1000].all()
  images = np.concatenate([b['image'] for b in batches])
  labels = np.concatenate([b['label'] for b in batches])
  assert np.all(images[1000:] == 0) and np.all(labels[1000:] == -1)
  # Deterministic order: same examples as one big batch.
  np.testing.assert_array_equal(images[:1000], full[0]['image'])


def test_eval_per_host_slices_are_disjoint_halves(tfds_data_dir):
  (single,), _ = _eval_all(tfds_data_dir, max_examples=1001, batch_size=1001)
  hosts = [_eval_all(tfds_data_dir, max_examples=1001, batch_size=128,
                     process_index=p, process_count=2) for p in range(2)]
  assert [n for _, n in hosts] == [500, 501]
  assert [len(b) for b, _ in hosts] == [4, 4]  # Same number of batches.
  real = [np.concatenate([b['image'][b['mask']] for b in batches])
          for batches, _ in hosts]
  np.testing.assert_array_equal(real[0], single['image'][:500])
  np.testing.assert_array_equal(real[1], single['image'][500:])


def test_eval_binarize_reproducible_and_mean(tfds_data_dir):
  kw = dict(max_examples=2000, batch_size=500)
  a, _ = _eval_all(tfds_data_dir, preprocessing='binarize', seed=1, **kw)
  b, _ = _eval_all(tfds_data_dir, preprocessing='binarize', seed=1, **kw)
  c, _ = _eval_all(tfds_data_dir, preprocessing='binarize', seed=2, **kw)
  q, _ = _eval_all(tfds_data_dir, preprocessing='quantize', **kw)
  xa, xc, xq = (np.concatenate([t['image'] for t in r]) for r in (a, c, q))
  assert set(np.unique(xa)) == {0.0, 1.0}
  np.testing.assert_array_equal(xa, np.concatenate([t['image'] for t in b]))
  assert np.mean(xa != xc) > 0.01
  assert abs(xa.mean() - xq.mean()) < 0.005
  assert np.all(xa[xq == 0] == 0) and np.all(xa[xq == 1] == 1)
  # The noise of example i is keyed by (seed, dataset, split, i):
  # preprocess_numpy agrees.
  k = np.round(xq[:300] * 255).astype(np.uint8)
  np.testing.assert_array_equal(
      ip.preprocess_numpy(k, 'binarize', seed=1, indices=np.arange(300),
                          dataset='mnist', split='test'),
      xa[:300])


def test_eval_noise_differs_between_datasets_and_splits(tfds_data_dir):
  """Example i of two evaluated sets never gets the same noise under one seed.

  The dequantisation noise u = 256 x - k of FashionMNIST test, MNIST test and
  FashionMNIST train (first 200 examples each) is compared draw by draw; as
  u is uniform on [0, 1), shared noise would give identical arrays.
  """
  def noise(name, split):
    it, _ = ip.create_eval_dataset(name, split, preprocessing='dequantize',
                                   batch_size=200, seed=5, max_examples=200,
                                   data_dir=tfds_data_dir)
    (d,) = list(it)
    x = d['image'].astype(np.float64)
    return 256 * x - np.floor(256 * x)

  u_fm, u_mn, u_tr = (noise('fashion_mnist', 'test'), noise('mnist', 'test'),
                      noise('fashion_mnist', 'train'))
  for a, b in ((u_fm, u_mn), (u_fm, u_tr), (u_mn, u_tr)):
    # Independent uniforms: mean |a - b| = 1/3; identical draws: 0.
    assert abs(np.mean(np.abs(a - b)) - 1 / 3) < 0.01
  assert abs(np.corrcoef(u_fm.ravel(), u_mn.ravel())[0, 1]) < 0.01


def test_eval_dequantize_bins(tfds_data_dir):
  kw = dict(max_examples=500, batch_size=500)
  (d,), _ = _eval_all(tfds_data_dir, preprocessing='dequantize', **kw)
  (q,), _ = _eval_all(tfds_data_dir, preprocessing='quantize', **kw)
  x, k = d['image'], np.round(q['image'] * 255)
  assert x.min() >= 0 and x.max() < 1
  np.testing.assert_array_equal(np.floor(x.astype(np.float64) * 256), k)


def test_eval_missing_split_error(tfds_data_dir):
  with pytest.raises(ValueError, match=r"available splits: \['test'\]"):
    ip.create_eval_dataset('mnist', 'train', preprocessing='quantize',
                           batch_size=8, seed=0, data_dir=tfds_data_dir)


# ----------------------------------------------------------------------------
# Training pipeline on real data (first 1024 train examples, batch 64).


def test_steps_per_epoch(tfds_data_dir):
  cfg = _config(tfds_data_dir, max_train_examples=None, batch_size=128)
  assert ip.steps_per_epoch(cfg) == 468
  assert ip.steps_per_epoch(cfg, process_count=2) == 468
  cfg.train.batch_size = 100
  assert ip.steps_per_epoch(cfg, process_count=4) == 600
  assert ip.steps_per_epoch(_config(tfds_data_dir)) == 16


def test_train_batches_binarized_and_fresh_each_epoch(tfds_data_dir):
  cfg = _config(tfds_data_dir)
  bins = _take(ip.create_train_iterator(cfg, seed=3), 32)
  assert all(b['image'].shape == (64, 28, 28, 1) for b in bins)
  assert all(b['image'].dtype == np.float32 for b in bins)
  assert all(b['label'].shape == (64,) for b in bins)
  x = np.stack([b['image'] for b in bins])
  assert set(np.unique(x)) == {0.0, 1.0}
  # Same seed -> same stream; other seed -> other order and noise.
  again = _take(ip.create_train_iterator(cfg, seed=3), 32)
  np.testing.assert_array_equal(x, np.stack([b['image'] for b in again]))
  other = _take(ip.create_train_iterator(cfg, seed=4), 1)
  assert not np.array_equal(other[0]['image'], bins[0]['image'])

  cfg.data.preprocessing = 'quantize'
  quant = _take(ip.create_train_iterator(cfg, seed=3), 32)
  q = np.stack([b['image'] for b in quant])
  # Same example order as the binarised stream; binarisation mean ~ k/255.
  np.testing.assert_array_equal([b['label'] for b in bins],
                                [b['label'] for b in quant])
  assert np.all(x[q == 0] == 0) and np.all(x[q == 1] == 1)
  assert abs(x.mean() - q.mean()) < 0.005
  # Epochs 0 and 1 (16 steps each) hold the same 1024 examples, reshuffled...
  q0, q1 = q[:16].reshape(-1, 28, 28, 1), q[16:].reshape(-1, 28, 28, 1)
  np.testing.assert_array_equal(_rows(q0), _rows(q1))
  assert not np.array_equal(q0, q1)
  # ... and each example gets a fresh binarisation: match by content.
  x0, x1 = x[:16].reshape(len(q0), -1), x[16:].reshape(len(q1), -1)
  pos1 = {q1[i].tobytes(): i for i in range(len(q1))}
  pairs = [(i, pos1[q0[i].tobytes()]) for i in range(len(q0))]
  diff = np.mean([np.mean(x0[i] != x1[j]) for i, j in pairs])
  assert diff > 0.01


def test_train_dequantization_fresh_each_epoch(tfds_data_dir):
  """Dequantised training data: x = (k + u) / 256 with floor(256 x) = k, and every example gets new noise u in
  every epoch (matched across epochs by its pixels k); the same seed repeats the stream."""
  cfg = _config(tfds_data_dir, preprocessing='dequantize')
  x = np.stack([b['image'] for b in _take(ip.create_train_iterator(cfg, seed=3), 32)]).astype(np.float64)
  again = np.stack([b['image'] for b in _take(ip.create_train_iterator(cfg, seed=3), 32)])
  np.testing.assert_array_equal(x, again)
  assert x.min() >= 0 and x.max() < 1
  k = np.floor(256 * x)
  u = 256 * x - k
  # Epoch 0 and epoch 1 (16 steps each): the same 1024 examples, matched by content.
  k0, k1 = k[:16].reshape(-1, 784), k[16:].reshape(-1, 784)
  u0, u1 = u[:16].reshape(-1, 784), u[16:].reshape(-1, 784)
  pos1 = {k1[i].astype(np.uint8).tobytes(): i for i in range(len(k1))}
  pairs = [(i, pos1[k0[i].astype(np.uint8).tobytes()]) for i in range(len(k0))
           if k0[i].astype(np.uint8).tobytes() in pos1]
  assert len(pairs) > 0.99 * len(k0)  # (a few duplicate images in FashionMNIST match either copy)
  diffs = np.array([np.mean(np.abs(u0[i] - u1[j])) for i, j in pairs])
  # Independent U[0, 1) draws differ by 1/3 on average; a repeated draw would give 0.
  assert abs(np.median(diffs) - 1 / 3) < 0.02 and np.mean(diffs < 1e-6) < 0.01


def test_train_resume_matches_uninterrupted(tfds_data_dir):
  cfg = _config(tfds_data_dir)  # 16 steps per epoch.
  full = _take(ip.create_train_iterator(cfg, seed=5), 40)
  for start in (0, 16, 21):
    resumed = _take(ip.create_train_iterator(cfg, seed=5, start_step=start),
                    40 - start)
    for a, b in zip(full[start:], resumed):
      np.testing.assert_array_equal(a['image'], b['image'])
      np.testing.assert_array_equal(a['label'], b['label'])


def test_train_per_host_slices_are_disjoint(tfds_data_dir):
  cfg = _config(tfds_data_dir, preprocessing='quantize')
  single = np.concatenate(
      [b['image'] for b in _take(ip.create_train_iterator(cfg), 16)])
  hosts = []
  for p in range(2):
    batches = _take(ip.create_train_iterator(cfg, process_index=p,
                                             process_count=2), 16)
    assert all(b['image'].shape == (32, 28, 28, 1) for b in batches)
    hosts.append(np.concatenate([b['image'] for b in batches]))
  # One epoch per host = 512 examples each; together exactly the 1024 of a
  # single-host epoch, so the slices are disjoint halves.
  assert len(hosts[0]) == len(hosts[1]) == 512
  np.testing.assert_array_equal(_rows(np.concatenate(hosts)), _rows(single))


def test_train_block_shuffle_keeps_epoch_contents(tfds_data_dir):
  cfg = _config(tfds_data_dir, preprocessing='quantize', shuffle_buffer=256)
  batches = _take(ip.create_train_iterator(cfg), 32)
  q = np.concatenate([b['image'] for b in batches])
  np.testing.assert_array_equal(_rows(q[:1024]), _rows(q[1024:]))
  assert not np.array_equal(q[:1024], q[1024:])
