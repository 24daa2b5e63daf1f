"""Tests for hvaeood.layers: TF-SAME sizes, weight-normed convs against float64 numpy, data-dependent init,
and the residual block's paths (SPEC 1.2, 1.3).

Every numeric reference here is an independent float64 numpy computation (explicit shifted-slice
convolutions, scattering transposed convolutions, windowed sums); library outputs are float32.
"""

import math
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from hvaeood import layers  # noqa: E402
from hvaeood.layers import ResBlock, WNConv, WNDense  # noqa: E402

RTOL = 1e-4
ATOL = 1e-4


@pytest.fixture(autouse=True)
def _fast_threefry():
  """Non-partitionable threefry compiles ~5x faster on CPU; the layers only need *some* random v."""
  with jax.threefry_partitionable(False):
    yield


# --------------------------------------------------------------------------------------------------------------
# numpy float64 references


def _np_weight(params):
  """w = g * v / ||v||, the norm per output unit (last axis) over every other axis."""
  v = np.asarray(params["v"], np.float64)
  g = np.asarray(params["g"], np.float64)
  norm = np.sqrt(np.sum(v ** 2, axis=tuple(range(v.ndim - 1))))
  return g * v / norm, np.asarray(params["b"], np.float64)


def _tf_same_pads(n, k, s):
  out = math.ceil(n / s)
  total = max((out - 1) * s + k - n, 0)
  return total // 2, total - total // 2


def _np_conv_same(x, w, b, s):
  """Cross-correlation (TF/XLA convention), TF 'SAME' zero padding (odd extra pixel at the end)."""
  x = np.asarray(x, np.float64)
  n, h, wd, _ = x.shape
  k = w.shape[0]
  ph, pw = _tf_same_pads(h, k, s), _tf_same_pads(wd, k, s)
  xp = np.pad(x, ((0, 0), ph, pw, (0, 0)))
  ho, wo = math.ceil(h / s), math.ceil(wd / s)
  out = np.zeros((n, ho, wo, w.shape[-1]))
  for di in range(k):
    for dj in range(k):
      patch = xp[:, di:di + s * (ho - 1) + 1:s, dj:dj + s * (wo - 1) + 1:s, :]
      out += np.einsum("nhwc,cd->nhwd", patch, w[di, dj])
  return out + b


def _np_conv_transpose_full(x, w, s, flip):
  """Unpadded transposed conv by scattering: out[i*s + d] += x[i] * w[d]; size (in-1)s + k."""
  x = np.asarray(x, np.float64)
  n, h, wd, _ = x.shape
  k = w.shape[0]
  wk = w[::-1, ::-1] if flip else w
  out = np.zeros((n, (h - 1) * s + k, (wd - 1) * s + k, w.shape[-1]))
  for i in range(h):
    for j in range(wd):
      out[:, i * s:i * s + k, j * s:j * s + k, :] += np.einsum("nc,abcd->nabd", x[:, i, j, :], wk)
  return out


def _crop(full, lo, hi):
  H, W = full.shape[1], full.shape[2]
  return full[:, lo:H - hi, lo:W - hi, :]


def _np_avg_pool_3x3(x, s):
  """3x3 window, stride s, zero padding 1 at bottom/right only, divisor always 9 (SPEC 1.2)."""
  x = np.asarray(x, np.float64)
  n, h, w, c = x.shape
  xp = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
  ho, wo = math.ceil(h / s), math.ceil(w / s)
  out = np.zeros((n, ho, wo, c))
  for i in range(ho):
    for j in range(wo):
      out[:, i, j, :] = xp[:, i * s:i * s + 3, j * s:j * s + 3, :].sum(axis=(1, 2)) / 9.0
  return out


def _relu(x):
  return np.maximum(np.asarray(x, np.float64), 0.0)


def _run(module, init_args, *apply_args):
  """Initialises `module` on `init_args` and applies it to each tuple in `apply_args`, all in ONE jit compile
  (XLA CPU compiles dominate the runtime of these tests). Returns (params, [float64 outputs])."""

  @jax.jit
  def f(init_args, apply_args):
    params = module.init(jax.random.key(0), *init_args)["params"]
    return params, [module.apply({"params": params}, *a) for a in apply_args]

  params, outs = f(tuple(init_args), [tuple(a) for a in apply_args])
  return params, [np.asarray(o, np.float64) for o in outs]


def _init(module, *init_args):
  return _run(module, init_args)[0]


def _randn(seed, shape, loc=0.0, scale=1.0):
  return (loc + scale * np.random.RandomState(seed).randn(*shape)).astype(np.float32)


# --------------------------------------------------------------------------------------------------------------
# SAME / transposed sizes and pads


def test_pad_helpers_known_values():
  assert layers.same_pads(28, 3, 2) == (0, 1)
  assert layers.same_pads(28, 5, 2) == (1, 2)
  assert layers.same_pads(7, 3, 2) == (1, 1)
  assert layers.same_pads(14, 3, 1) == (1, 1)
  assert layers.same_pads(14, 5, 1) == (2, 2)
  assert layers.same_pads(8, 1, 1) == (0, 0)
  assert layers.transpose_pads(3, 2) == (2, 1)
  assert layers.transpose_pads(5, 2) == (3, 2)


def _out_shape(module, x_shape):
  """Output shape of `module` initialised (data-dependently) and run on zeros, traced without compiling."""
  return jax.eval_shape(lambda x: module.init_with_output(jax.random.key(0), x)[0],
                        jax.ShapeDtypeStruct(x_shape, jnp.float32)).shape


@pytest.mark.parametrize("size,k,s,expected", [
    (28, 3, 2, 14), (28, 5, 2, 14), (7, 3, 2, 4), (7, 5, 2, 4), (14, 3, 2, 7), (14, 5, 2, 7),
    (28, 5, 1, 28), (7, 3, 1, 7), (14, 1, 1, 14), (9, 3, 3, 3)])
def test_same_conv_output_size(size, k, s, expected):
  assert _out_shape(WNConv(3, k, s), (1, size, size + 1, 2)) == (1, expected, math.ceil((size + 1) / s), 3)


@pytest.mark.parametrize("size,k,s", [(7, 3, 2), (7, 5, 2), (14, 3, 2), (14, 5, 2), (4, 3, 2), (16, 5, 2)])
def test_transposed_conv_output_size(size, k, s):
  assert _out_shape(WNConv(4, k, s, transpose=True), (2, size, size, 3)) == (2, s * size, s * size, 4)


def test_same_conv_on_zeros_really_runs():
  """One concrete (non-traced) run on zeros: sizes as above and zero output (g = 1, b = 0 on zeros)."""
  x = jnp.zeros((1, 28, 28, 1))
  params, (y,) = _run(WNConv(2, 3, 2), (x,), (x,))
  assert y.shape == (1, 14, 14, 2)
  np.testing.assert_array_equal(y, 0.0)
  np.testing.assert_array_equal(np.asarray(params["g"]), 1.0)


# --------------------------------------------------------------------------------------------------------------
# forward passes against numpy


@pytest.mark.parametrize("h,w,k,s", [(7, 6, 3, 2), (8, 8, 5, 2), (6, 5, 3, 1), (9, 7, 3, 3), (6, 6, 1, 1)])
def test_wnconv_forward_matches_numpy(h, w, k, s):
  """Cross-correlation with TF-SAME padding of the folded weight w = g v / ||v|| (norm per output channel)."""
  x_init = _randn(0, (3, h, w, 4))
  x = _randn(1, (2, h, w, 4), loc=0.5, scale=2.0)  # evaluate on a different batch than the init batch
  conv = WNConv(5, k, s)
  params, (got,) = _run(conv, (x_init,), (x,))
  assert params["v"].shape == (k, k, 4, 5)
  wt, b = _np_weight(params)
  want = _np_conv_same(x, wt, b, s)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("h,w,k,s", [(4, 4, 3, 2), (5, 3, 3, 2), (3, 5, 5, 2), (3, 3, 4, 2)])
def test_transposed_conv_matches_numpy_crop(h, w, k, s):
  """Unpadded transposed conv (out (in-1)s+k) cropped floor((k-s)/2) at the start and ceil at the end.

  lax.conv_transpose (transpose_kernel=False) equals the scatter with the *spatially flipped* kernel, which
  SPEC 1.2 allows (flipping is irrelevant when training from scratch); the crop offsets must be exact.
  """
  x_init = _randn(3, (2, h, w, 3))
  x = _randn(4, (2, h, w, 3), loc=-0.3, scale=1.5)
  conv = WNConv(2, k, s, transpose=True)
  params, (got,) = _run(conv, (x_init,), (x,))
  assert params["v"].shape == (k, k, 3, 2)
  wt, b = _np_weight(params)
  lo = (k - s) // 2
  hi = (k - s) - lo
  want = _crop(_np_conv_transpose_full(x, wt, s, flip=True), lo, hi) + b
  assert got.shape == want.shape == (2, s * h, s * w, 2)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  # The other kernel convention does not match (so the assertion above pins the convention) ...
  unflipped = _crop(_np_conv_transpose_full(x, wt, s, flip=False), lo, hi) + b
  assert np.max(np.abs(got - unflipped)) > 1e-2
  # ... and neither does the swapped crop when k - s is odd.
  if lo != hi:
    swapped = _crop(_np_conv_transpose_full(x, wt, s, flip=True), hi, lo) + b
    assert np.max(np.abs(got - swapped)) > 1e-2


def test_wndense_forward_matches_numpy():
  x_init = _randn(5, (6, 7))
  x = _randn(6, (4, 7), loc=1.0, scale=0.5)
  params, (got,) = _run(WNDense(3), (x_init,), (x,))
  assert params["v"].shape == (7, 3)
  wt, b = _np_weight(params)
  np.testing.assert_allclose(got, x.astype(np.float64) @ wt + b, rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------------------------------------------
# data-dependent initialisation


def _init_stats_want(module, x, params):
  """g, b of the data-dependent init from a float64 numpy pre-activation t of the normalised direction v/||v||:
  g = 1/sqrt(var_unbiased(t) + 1e-8), b = -mean(t) g per output unit. For a transposed conv t is the *uncropped*
  output ((in-1)s + k per axis), as the reference takes its statistics before the 'same' crop (SPEC 1.2)."""
  v = np.asarray(params["v"], np.float64)
  vn = v / np.sqrt(np.sum(v ** 2, axis=tuple(range(v.ndim - 1))))
  if isinstance(module, WNDense):
    t = x.astype(np.float64) @ vn
  elif module.transpose:
    t = _np_conv_transpose_full(x, vn, module.stride, flip=True)
    assert t.shape[1] == (x.shape[1] - 1) * module.stride + module.kernel_size
  else:
    t = _np_conv_same(x, vn, 0.0, module.stride)
  axes = tuple(range(t.ndim - 1))
  g = 1.0 / np.sqrt(t.var(axis=axes, ddof=1) + 1e-8)
  return g, -t.mean(axis=axes) * g


@pytest.mark.parametrize("module,shape", [
    (WNConv(5, 3, 1), (2, 3, 3, 4)),          # N = 18 positions per channel: unbiased/biased differ by 6%
    (WNConv(6, 5, 2), (3, 6, 5, 2)),
    (WNDense(7), (5, 9)),                     # N = 5: a biased variance would give 0.8
])
def test_data_dependent_init_gives_zero_mean_unit_unbiased_variance(module, shape):
  x = _randn(7, shape, loc=2.0, scale=3.0)
  params, (y,) = _run(module, (x,), (x,))
  axes = tuple(range(y.ndim - 1))
  np.testing.assert_allclose(y.mean(axis=axes), 0.0, atol=1e-4)
  np.testing.assert_allclose(y.var(axis=axes, ddof=1), 1.0, rtol=1e-4)
  # g, b are exactly the data-dependent values, computed here in numpy.
  g_want, b_want = _init_stats_want(module, x, params)
  np.testing.assert_allclose(np.asarray(params["g"]), g_want, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(params["b"]), b_want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k,s,shape", [(3, 2, (4, 7, 7, 3)),    # FashionMNIST Dec2's 7 -> 14 (15x15 uncropped)
                                       (5, 2, (2, 6, 5, 2)),    # k5 s2, as Dec1's 14 -> 28 (odd/even sizes)
                                       (5, 3, (3, 3, 4, 2))])
def test_transposed_conv_init_uses_uncropped_statistics(k, s, shape):
  """A transposed conv's g, b come from the statistics of its uncropped output, as the reference (SPEC 1.2)."""
  module = WNConv(4, k, s, transpose=True)
  x = _randn(11, shape, loc=1.0, scale=2.0)
  params, (y,) = _run(module, (x,), (x,))
  assert y.shape[1:3] == (s * shape[1], s * shape[2])
  g_want, b_want = _init_stats_want(module, x, params)
  np.testing.assert_allclose(np.asarray(params["g"]), g_want, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(params["b"]), b_want, rtol=1e-4, atol=1e-4)
  # ... which is not the cropped output's standardisation: the cropped output is not exactly zero mean, unit var.
  axes = (0, 1, 2)
  assert np.max(np.abs(y.var(axis=axes, ddof=1) - 1.0)) > 1e-3


def test_init_constant_output_keeps_g_one():
  """Zero-variance pre-activations give g = 1 (not 1/sqrt(1e-8) = 1e4) and b = -mean."""
  # Dense on a batch of identical rows: every output unit is constant over the batch.
  row = _randn(8, (1, 6))
  x = np.repeat(row, 4, axis=0)
  params = _init(WNDense(3), x)
  np.testing.assert_array_equal(np.asarray(params["g"]), np.ones(3, np.float32))
  v = np.asarray(params["v"], np.float64)
  t = row.astype(np.float64) @ (v / np.linalg.norm(v, axis=0))
  np.testing.assert_allclose(np.asarray(params["b"]), -t[0], rtol=1e-5, atol=1e-6)
  # 1x1 conv on a constant input: constant output per channel.
  params = _init(WNConv(4, 1), np.full((2, 3, 3, 2), 3.0, np.float32))
  np.testing.assert_array_equal(np.asarray(params["g"]), np.ones(4, np.float32))


def test_init_mixed_constant_channel(monkeypatch):
  """A dense unit that only reads a constant input feature has zero variance -> g = 1, b = -mean; the other
  unit is normalised as usual."""
  x = _randn(9, (6, 3), scale=2.0)
  x[:, 0] = 1.5  # constant feature
  v = _randn(21, (3, 2))
  v[1:, 0] = 0.0  # unit 0 reads only the constant feature
  monkeypatch.setattr(layers, "kaiming_normal",
                      lambda axes: (lambda key, shape, dtype=jnp.float32: jnp.asarray(v)))
  params, (y,) = _run(WNDense(2), (x,), (x,))
  np.testing.assert_array_equal(np.asarray(params["v"]), v)
  assert float(params["g"][0]) == 1.0
  np.testing.assert_allclose(float(params["b"][0]), -1.5 * np.sign(v[0, 0]), rtol=1e-6)
  np.testing.assert_allclose(y[:, 0], 0.0, atol=1e-5)
  assert abs(y[:, 1].var(ddof=1) - 1.0) < 1e-4


# --------------------------------------------------------------------------------------------------------------
# residual block (compared with a float64 numpy composition of its sub-layers, using the block's own params)


@pytest.mark.parametrize("h,w", [(8, 8), (14, 14), (6, 10), (4, 4)])
def test_avg_pool_residual_matches_numpy(h, w):
  x = _randn(10, (2, h, w, 3), loc=1.0)
  got = np.asarray(layers.avg_pool_residual(jnp.asarray(x), 2), np.float64)
  want = _np_avg_pool_3x3(x, 2)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # The bottom-right output averages 4 real pixels with divisor 9 (padding counted).
  np.testing.assert_allclose(got[:, -1, -1, :], x[:, -2:, -2:, :].sum(axis=(1, 2)) / 9.0, rtol=1e-5, atol=1e-6)


def test_match_channels_pads_and_truncates():
  x = _randn(11, (2, 3, 3, 4))
  padded = np.asarray(layers.match_channels(jnp.asarray(x), 6))
  np.testing.assert_array_equal(padded[..., :4], x)
  np.testing.assert_array_equal(padded[..., 4:], 0.0)
  np.testing.assert_array_equal(np.asarray(layers.match_channels(jnp.asarray(x), 3)), x[..., :3])
  np.testing.assert_array_equal(np.asarray(layers.match_channels(jnp.asarray(x), 4)), x)


def _np_sub(params, name, x, s=1, transpose=False):
  """A WNConv sub-layer of a block, recomputed in numpy from its params."""
  wt, b = _np_weight(params[name])
  if transpose:
    k = wt.shape[0]
    lo = (k - s) // 2
    return _crop(_np_conv_transpose_full(x, wt, s, flip=True), lo, (k - s) - lo) + b
  return _np_conv_same(x, wt, b, s)


def _pad_or_truncate(x, c):
  x = np.asarray(x, np.float64)
  if x.shape[-1] >= c:
    return x[..., :c]
  return np.concatenate([x, np.zeros(x.shape[:-1] + (c - x.shape[-1],))], axis=-1)


@pytest.mark.parametrize("cin,c,k,s,h", [
    (4, 6, 3, 2, 8),    # downsampling, channel zero-padding
    (6, 4, 5, 2, 8),    # downsampling, channel truncation
    (3, 5, 3, 1, 5),    # stride 1, padding
    (5, 3, 3, 1, 5),    # stride 1, truncation
])
def test_resblock_residual_path(cin, c, k, s, h):
  x = _randn(12, (2, h, h, cin))
  block = ResBlock(c, k, s, residual=True)
  params, (got,) = _run(block, (x,), (x,))
  assert set(params) == {"conv1", "conv2"}
  y = _relu(_np_sub(params, "conv1", _relu(x)))
  y = _np_sub(params, "conv2", y, s)
  r = _np_avg_pool_3x3(x, s) if s > 1 else np.asarray(x, np.float64)
  want = y + _pad_or_truncate(r, c)
  assert got.shape == (2, math.ceil(h / s), math.ceil(h / s), c)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_resblock_non_residual_has_no_preactivation_and_no_skip():
  x = _randn(13, (2, 6, 6, 3))  # has negative entries, so a pre-ReLU would change the result
  params, (got,) = _run(ResBlock(3, 3, 1, residual=False), (x,), (x,))
  want = _np_sub(params, "conv2", _relu(_np_sub(params, "conv1", x)))
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("k", [3, 5])
def test_resblock_decoder_upsampling_has_no_residual(k):
  x = _randn(14, (2, 4, 4, 4))
  params, (got,) = _run(ResBlock(4, k, 2, residual=True, upsample=True), (x,), (x,))
  assert got.shape == (2, 8, 8, 4)
  assert params["conv2"]["v"].shape == (k, k, 4, 4)
  want = _np_sub(params, "conv2", _relu(_np_sub(params, "conv1", _relu(x))), 2, transpose=True)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_resblock_decoder_stride1_is_ordinary_conv_with_residual():
  x = _randn(15, (2, 5, 5, 4))
  params, (got,) = _run(ResBlock(4, 3, 1, residual=True, upsample=True), (x,), (x,))
  want = _np_sub(params, "conv2", _relu(_np_sub(params, "conv1", _relu(x)))) + x
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_resblock_aux_dropped_when_shapes_match():
  """HEAD quirk: an aux with exactly conv1's output shape is silently dropped (no params, no effect)."""
  x = _randn(16, (2, 6, 6, 4))
  aux1 = _randn(17, (2, 6, 6, 4))
  aux2 = _randn(18, (2, 6, 6, 4), loc=2.0)
  params, (out1, out2, out0) = _run(ResBlock(4, 3, 1), (x, aux1), (x, aux1), (x, aux2), (x,))
  assert "aux" not in params
  np.testing.assert_array_equal(out1, out2)
  np.testing.assert_array_equal(out1, out0)
  want = _np_sub(params, "conv2", _relu(_np_sub(params, "conv1", _relu(x)))) + x
  np.testing.assert_allclose(out1, want, rtol=RTOL, atol=ATOL)


def test_resblock_aux_identity_add_when_shapes_match():
  x = _randn(16, (2, 6, 6, 4))
  aux1 = _randn(17, (2, 6, 6, 4))
  aux2 = _randn(18, (2, 6, 6, 4), loc=2.0)
  params, (out1, out2) = _run(ResBlock(4, 3, 1, aux_identity_add=True), (x, aux1), (x, aux1), (x, aux2))
  assert "aux" not in params
  assert np.max(np.abs(out1 - out2)) > 1e-2
  for aux, out in ((aux1, out1), (aux2, out2)):
    y = _np_sub(params, "conv1", _relu(x)) + _relu(aux)
    want = _np_sub(params, "conv2", _relu(y)) + x
    np.testing.assert_allclose(out, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("aux_shape,aux_k,aux_s,transpose", [
    ((2, 3, 3, 4), 3, 2, True),     # smaller: transposed conv (kernel k), stride = ratio
    ((2, 12, 12, 4), 3, 2, False),  # larger: strided conv
    ((2, 6, 6, 7), 1, 1, False),    # channels only: 1x1 conv
])
def test_resblock_aux_ops(aux_shape, aux_k, aux_s, transpose):
  x = _randn(19, (2, 6, 6, 4))
  aux = _randn(20, aux_shape)
  params, (got, other) = _run(ResBlock(4, 3, 1), (x, aux), (x, aux), (x, aux + 1.0))
  assert params["aux"]["v"].shape == (aux_k, aux_k, aux_shape[-1], 4)
  y = _np_sub(params, "conv1", _relu(x)) + _np_sub(params, "aux", _relu(aux), aux_s, transpose)
  want = _np_sub(params, "conv2", _relu(y)) + x
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  assert np.max(np.abs(other - got)) > 1e-2


# --------------------------------------------------------------------------------------------------------------
# one normal draw for every v (`layers.one_draw`, what `models.init_params` runs)


class _Stack(nn.Module):
  """Weight-normed layers whose v shapes repeat (two 3x3 8->8 convs, two 6->8 dense) and differ."""

  @nn.compact
  def __call__(self, x):
    h = jax.nn.relu(WNConv(8, 5)(x))
    h = jax.nn.relu(WNConv(8, 3)(h))
    h = jax.nn.relu(WNConv(8, 3, stride=2)(h))
    h = h.mean(axis=(1, 2))
    h = jnp.concatenate([WNDense(8)(h[:, :6]), WNDense(8)(h[:, 2:])], axis=-1)
    return WNDense(8)(h[:, 4:12])


# The v of _Stack in the order its layers are created, and each one's fan-in.
_STACK_V = [("WNConv_0", (5, 5, 3, 8), 75), ("WNConv_1", (3, 3, 8, 8), 72), ("WNConv_2", (3, 3, 8, 8), 72),
            ("WNDense_0", (6, 8), 6), ("WNDense_1", (6, 8), 6), ("WNDense_2", (8, 8), 8)]


def _random_bits_eqns(jaxpr) -> int:
  """How many random_bits operations (one per jax.random.normal call) a jaxpr holds, nested jaxprs included."""
  def subs(value):
    if hasattr(value, "eqns"):
      yield value
    elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
      yield value.jaxpr
    elif isinstance(value, (tuple, list)):
      for v in value:
        yield from subs(v)

  return sum((eqn.primitive.name == "random_bits") + sum(_random_bits_eqns(j) for v in eqn.params.values()
                                                         for j in subs(v)) for eqn in jaxpr.eqns)


@pytest.mark.parametrize("partitionable", [False, True])
def test_one_draw_cuts_every_v_from_one_normal_draw_in_creation_order(partitionable):
  x = jnp.asarray(_randn(3, (4, 9, 9, 3)), jnp.float32)
  key = jax.random.PRNGKey(7)
  init = lambda b, k: layers.one_draw(lambda: _Stack().init({"params": k}, b), k)["params"]  # noqa: E731
  with jax.threefry_partitionable(partitionable):
    params = jax.jit(init)(x, key)
    total = sum(math.prod(shape) for _, shape, _ in _STACK_V)
    want = np.asarray(jax.random.normal(key, (total,)), np.float64)
    assert _random_bits_eqns(jax.make_jaxpr(init)(x, key).jaxpr) == 1
    assert _random_bits_eqns(jax.make_jaxpr(lambda b, k: _Stack().init({"params": k}, b))(x, key).jaxpr) == 6
  start = 0
  for name, shape, fan_in in _STACK_V:
    v = np.asarray(params[name]["v"], np.float64)
    assert v.shape == shape, name
    n = math.prod(shape)
    np.testing.assert_allclose(v.ravel() / math.sqrt(2.0 / fan_in), want[start:start + n], rtol=1e-6, err_msg=name)
    start += n
  # Pooled, the standardised values are standard normal (KS), and no two layers share values.
  z = np.concatenate([np.asarray(params[n]["v"]).ravel() / math.sqrt(2.0 / f) for n, _, f in _STACK_V])
  assert scipy.stats.kstest(z, "norm").pvalue > 1e-3
  assert len({np.asarray(params[n]["v"]).tobytes() for n, _, _ in _STACK_V}) == 6
  # g and b come from those v: the last layer's outputs on the init batch have zero mean, unit unbiased variance.
  y = np.asarray(_Stack().apply({"params": params}, x), np.float64)
  np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(y.var(0, ddof=1), 1.0, rtol=1e-4)
  # Another key, other values.
  other = jax.jit(init)(x, jax.random.PRNGKey(8))
  assert not np.allclose(np.asarray(other["WNConv_0"]["v"]), np.asarray(params["WNConv_0"]["v"]))


def _drawing_init(shapes_per_run):
  """An init_fn whose n-th run draws He-normal arrays of shapes_per_run[n] (run 0: the shape trace)."""
  runs = []

  def init_fn():
    runs.append(None)
    shapes = shapes_per_run[len(runs) - 1]
    return [layers.kaiming_normal((0,))(jax.random.PRNGKey(i), s) for i, s in enumerate(shapes)]
  return init_fn


def test_one_draw_refuses_an_init_that_draws_differently_from_its_trace():
  key = jax.random.PRNGKey(0)
  with pytest.raises(RuntimeError, match=r"draw 1 of init_fn \(\(6,\), float32\) is not the one its trace made"):
    layers.one_draw(_drawing_init([[(3, 4), (5,)], [(3, 4), (6,)]]), key)
  with pytest.raises(RuntimeError, match="init_fn made 1 draws, its trace 2"):
    layers.one_draw(_drawing_init([[(3, 4), (5,)], [(3, 4)]]), key)
  with pytest.raises(RuntimeError, match=r"draw 2 of init_fn"):
    layers.one_draw(_drawing_init([[(3, 4), (5,)], [(3, 4), (5,), (5,)]]), key)
