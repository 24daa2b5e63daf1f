"""The fast convolution paths of hvaeood.layers equal the plain lax paths, in values and gradients.

The fast paths (sub-pixel transposed conv, strided conv with a sub-pixel input gradient, batch chunking) are
exact rewrites; they must agree with lax.conv_transpose / lax.conv_general_dilated to float32 rounding, and
WNConv's parameters must be interchangeable between the two paths. oneDNN's convolution (`hvaeood.onednn`) is
checked against a float64 numpy convolution, and the fast paths on it against lax.
"""

import math
import platform
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hvaeood import layers
from hvaeood import onednn
from hvaeood.layers import WNConv

TOL = dict(rtol=1e-5, atol=1e-5)


def _rand(rng, shape, scale=1.0):
  return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)


def _inputs(seed, n, h, w, c, k, f):
  rng = np.random.default_rng(seed)
  return rng, _rand(rng, (n, h, w, c)), _rand(rng, (k, k, c, f), 1.0 / math.sqrt(k * k * c))


def _check_same(f_ref, f_fast, x, w, rng):
  """Values, and the vjp (dx, dw) for a random cotangent, of two functions of (x, w); one compile."""
  ct = _rand(rng, jax.eval_shape(f_ref, x, w).shape)

  @jax.jit
  def both(x, w, ct):
    y_ref, vjp_ref = jax.vjp(f_ref, x, w)
    y_fast, vjp_fast = jax.vjp(f_fast, x, w)
    return (y_ref,) + vjp_ref(ct), (y_fast,) + vjp_fast(ct)

  for a_ref, a_fast in zip(*both(x, w, ct)):
    assert a_fast.shape == a_ref.shape
    # Both sum hundreds of float32 products (a weight gradient: batch x space), in different orders (chunks,
    # oneDNN's blocking): they differ by a few float32 ulps of the array's largest entries, ~2e-6 relative.
    scale = float(np.max(np.abs(a_ref)))
    np.testing.assert_allclose(a_fast, a_ref, rtol=TOL["rtol"], atol=max(TOL["atol"], 2e-6 * scale))


@pytest.mark.parametrize("k,s,h,w", [
    (3, 2, 7, 7), (3, 2, 6, 9), (5, 2, 7, 7), (5, 2, 14, 8), (5, 2, 1, 3), (2, 2, 5, 4), (4, 2, 3, 6),
    (5, 3, 3, 4)])
def test_subpixel_transposed_conv_equals_conv_transpose(k, s, h, w):
  rng, x, wt = _inputs(k * 100 + h, 2, h, w, 3, k, 4)
  pads = (layers.transpose_pads(k, s),) * 2
  _check_same(lambda x, wt: layers.conv_transpose_plain(x, wt, s, pads),
              lambda x, wt: layers.conv_transpose_subpixel(x, wt, s, pads), x, wt, rng)


@pytest.mark.parametrize("k,pads", [(3, ((0, 0), (0, 0))), (5, ((2, 1), (0, 3))), (5, ((4, 4), (1, 0))),
                                    (3, ((-1, 2), (3, -1)))])
def test_subpixel_transposed_conv_any_padding(k, pads):
  rng, x, wt = _inputs(k + 7, 2, 5, 6, 3, k, 2)
  _check_same(lambda x, wt: layers.conv_transpose_plain(x, wt, 2, pads),
              lambda x, wt: layers.conv_transpose_subpixel(x, wt, 2, pads), x, wt, rng)


@pytest.mark.parametrize("k,s,h,w", [
    (3, 2, 14, 14), (3, 2, 7, 8), (5, 2, 28, 28), (5, 2, 7, 9), (5, 2, 2, 3), (3, 3, 9, 10)])
def test_strided_conv_fast_gradient_equals_plain(k, s, h, w):
  rng, x, wt = _inputs(k * 10 + h, 2, h, w, 3, k, 4)
  pads = (layers.same_pads(h, k, s), layers.same_pads(w, k, s))
  _check_same(lambda x, wt: layers.conv_plain(x, wt, s, pads),
              lambda x, wt: layers.conv_strided_fastgrad(x, wt, s, pads), x, wt, rng)


@pytest.mark.parametrize("k,s,h", [(5, 2, 28), (3, 2, 7)])
def test_space_to_depth_conv_equals_plain(k, s, h):
  """The rejected space-to-depth form (kept for the microbenchmark) is exact as well."""
  rng, x, wt = _inputs(k + h, 2, h, h + 1, 3, k, 4)
  pads = (layers.same_pads(h, k, s), layers.same_pads(h + 1, k, s))
  _check_same(lambda x, wt: layers.conv_plain(x, wt, s, pads),
              lambda x, wt: layers.conv_strided_s2d(x, wt, s, pads), x, wt, rng)


def test_subpixel_kernel_uses_every_tap_once():
  """Each weight of the k x k kernel lands in exactly one (tap, phase) slot of the combined kernel."""
  for k, s in [(5, 2), (3, 2), (4, 2), (5, 3)]:
    lo = layers.transpose_pads(k, s)[0]
    ids = jnp.arange(1, k * k + 1, dtype=jnp.float32).reshape(k, k, 1, 1)
    kern = np.asarray(jax.jit(layers.subpixel_kernel, static_argnums=(1, 2))(ids, s, (lo, lo)))
    nonzero = np.sort(kern[kern != 0])
    np.testing.assert_array_equal(nonzero, np.arange(1, k * k + 1))
  # the shapes named in the docs: k5 s2 -> 3x3 taps, k3 s2 -> 2x2 taps, s*s*F output channels
  def shape(k, lo):
    return jax.eval_shape(lambda w: layers.subpixel_kernel(w, 2, (lo, lo)), jnp.ones((k, k, 3, 4))).shape

  assert shape(5, 3) == (3, 3, 3, 16)
  assert shape(3, 2) == (2, 2, 3, 16)


@pytest.mark.parametrize("k,s,transpose,h", [
    (5, 1, False, 9), (5, 2, False, 9), (3, 2, False, 8), (3, 2, True, 5), (5, 2, True, 6), (1, 1, False, 6)])
def test_conv2d_batch_chunks_equal_plain(k, s, transpose, h):
  """With a tiny chunk budget conv2d splits the batch into unequal chunks; results are unchanged."""
  rng, x, wt = _inputs(k + h, 7, h, h, 3, k, 4)
  out_hw = h * s if transpose else -(-h // s)
  budget = 2 * 4 * max(h * h * 3, out_hw * out_hw * 4)  # two examples' input or output: chunks of 2, 2, 1, 2
  assert layers._num_chunks(x, (7, out_hw, out_hw, 4), budget) == 4
  _check_same(lambda x, wt: layers.conv2d(x, wt, s, transpose, fast=False),
              lambda x, wt: layers.conv2d(x, wt, s, transpose, fast=True, chunk_bytes=budget), x, wt, rng)


def test_batch_chunks_only_where_they_fit_the_budget():
  """A batch needing at most CONV_MAX_CHUNKS chunks of the budget is split into that many; one needing more (an
  evaluation's thousands of rows) is not split at all (its chunks would not fit in cache either)."""
  per = 28 * 28 * 64 * 4
  x = jax.ShapeDtypeStruct((128, 28, 28, 64), jnp.float32)
  assert layers._num_chunks(x, (128, 28, 28, 64), 8 << 20) == math.ceil(128 * per / (8 << 20)) == 4
  big = jax.ShapeDtypeStruct((1500, 28, 28, 64), jnp.float32)
  assert math.ceil(1500 * per / (8 << 20)) > layers.CONV_MAX_CHUNKS
  assert layers._num_chunks(big, (1500, 28, 28, 64), 8 << 20) == 1
  assert layers._num_chunks(x, (128, 28, 28, 64), 0) == 1


def test_fast_conv_is_the_default_on_cpu_only():
  """The default (None) resolves per backend: the measured CPU rewrites on CPU, plain lax convs elsewhere."""
  assert layers.resolve_fast(None) is (jax.default_backend() == "cpu")
  assert layers.resolve_fast(False) is False and layers.resolve_fast(True) is True
  assert WNConv(4, 3).fast is None


@pytest.mark.parametrize("k,s,transpose", [(5, 2, True), (3, 2, False)])
def test_wnconv_params_interchangeable_between_paths(k, s, transpose):
  """Same parameter tree (v, g, b) and same outputs whichever path initialises or applies the layer."""
  rng = np.random.default_rng(k + s)
  x = _rand(rng, (3, 6, 7, 4))
  fast, plain = WNConv(5, k, s, transpose=transpose, fast=True), WNConv(5, k, s, transpose=transpose, fast=False)

  @jax.jit
  def run(x):
    p_fast = fast.init(jax.random.key(0), x)["params"]
    p_plain = plain.init(jax.random.key(0), x)["params"]
    return p_fast, p_plain, fast.apply({"params": p_plain}, x), plain.apply({"params": p_fast}, x)

  p_fast, p_plain, y_fast, y_plain = run(x)
  assert sorted(p_fast) == ["b", "g", "v"]
  assert jax.tree.map(jnp.shape, p_fast) == jax.tree.map(jnp.shape, p_plain)
  assert p_fast["v"].shape == (k, k, 4, 5)
  for name in ("v", "g", "b"):  # data-dependent init sees the same pre-activations on both paths
    np.testing.assert_allclose(p_fast[name], p_plain[name], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(y_fast, y_plain, rtol=1e-4, atol=1e-4)


def test_materialised_returns_every_float_bitwise():
  """`materialised` is the identity on every class of float32 value (NaN, infinities, signed zeros, subnormals,
  the largest normal); when the first element is NaN it takes its other branch, which may flush subnormals."""
  special = np.array([np.nan, -0.0, 0.0, np.inf, -np.inf, 1e-45, -3e-39, 3.4e38, -1.5, 2.0], np.float32)
  f = jax.jit(layers.materialised)
  for first in (np.float32(0.5), np.float32(np.nan)):
    x = np.concatenate([[first], special, np.random.default_rng(0).standard_normal(37).astype(np.float32)])
    x = x.reshape(2, 4, 6)
    got = np.asarray(f(jnp.asarray(x)))
    keep = np.ones(x.shape, bool) if first == 0.5 else ~((np.abs(x) < 1.18e-38) & (x != 0))
    np.testing.assert_array_equal(got.view(np.uint32)[keep], x.view(np.uint32)[keep])
    assert np.all(got[~keep] == 0)


def test_weight_gradients_read_materialised_inputs():
  """The compiled gradient of a fast stride-1, strided and transposed conv keeps the conditionals that
  materialise the weight-gradient inputs (two per conv): XLA must not fold them, or the transposes it adds for
  its conv kernel fuse the inputs' producers again (the speed lost is in benchmarks/README.md, change 9)."""
  rng, x, wt = _inputs(3, 4, 8, 8, 3, 5, 4)
  for s, transpose in ((1, False), (2, False), (2, True)):
    loss = lambda x, wt: jnp.sum(jnp.sin(layers.conv2d(jax.nn.relu(x + 1.0), wt, s, transpose, fast=True,
                                                       chunk_bytes=0)))
    hlo = jax.jit(jax.grad(loss, (0, 1))).lower(x, wt).compile().as_text()
    assert hlo.count(" conditional(") == 2, (s, transpose)


# --- oneDNN -------------------------------------------------------------------------------------------------------

import jaxlib  # pylint: disable=wrong-import-position

# Where the path is meant to run (x86-64 Linux, a verified jaxlib) `onednn.available()` must be True: a probe
# that wrongly turned it off there fails test_onednn_is_available_where_verified instead of skipping the rest.
_DNN_PLATFORM = (sys.platform == "linux" and platform.machine().lower() in ("x86_64", "amd64")
                 and jaxlib.__version__ in onednn.VERIFIED_JAXLIB and jax.default_backend() == "cpu")
needs_dnn = pytest.mark.skipif(not _DNN_PLATFORM, reason="oneDNN conv runs on x86-64 Linux with a verified jaxlib")


def _np_conv(x, w, stride, pads):
  """float64 cross-correlation: out[n, i, j, o] = sum_{a, b, c} xpad[n, s*i + a, s*j + b, c] w[a, b, c, o]."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  xp = np.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
  kh, kw = w.shape[:2]
  oh = (xp.shape[1] - kh) // stride + 1
  ow = (xp.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], oh, ow, w.shape[3]))
  for a in range(kh):
    for b in range(kw):
      win = xp[:, a:a + stride * (oh - 1) + 1:stride, b:b + stride * (ow - 1) + 1:stride, :]
      out += np.einsum("nijc,co->nijo", win, w[a, b])
  return out


@needs_dnn
def test_onednn_is_available_where_verified():
  assert onednn.available()
  assert layers.resolve_onednn(None, True) is (jax.device_count() == 1)


@needs_dnn
@pytest.mark.parametrize("k,s,pads,hw,transposed", [
    (3, 1, ((1, 1), (1, 1)), (7, 7), False), (5, 1, ((2, 2), (2, 2)), (9, 6), False),
    (5, 2, ((1, 2), (2, 1)), (9, 8), False), (3, 2, ((0, 1), (0, 1)), (14, 14), False),
    (1, 1, ((0, 0), (0, 0)), (4, 5), False), (3, 1, ((0, 2), (2, 0)), (6, 7), True),
    (5, 1, ((4, 4), (0, 3)), (5, 4), True), (2, 3, ((1, 0), (0, 0)), (8, 10), False)])
def test_onednn_conv_equals_float64_numpy(k, s, pads, hw, transposed):
  """oneDNN's convolution (XLA:CPU's custom call, as `onednn.conv` configures it) computes the cross-correlation
  of lax.conv_general_dilated, for strides, uneven and zero pads and the HWOI kernel layout."""
  rng = np.random.default_rng(k * 31 + s + hw[0])
  x = rng.standard_normal((3, *hw, 5)).astype(np.float32)
  w = (rng.standard_normal((k, k, 5, 6)) / math.sqrt(k * k * 5)).astype(np.float32)
  w_arg = w.swapaxes(2, 3) if transposed else w  # HWOI holds the same kernel
  got = np.asarray(jax.jit(lambda x, w: onednn.conv(x, w, s, pads, transposed))(x, w_arg))
  want = _np_conv(x, w, s, pads)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)


@needs_dnn
def test_onednn_conv_eagerly_and_under_vmap_equals_float64_numpy():
  """The primitive outside jit (its eager rule) and under vmap (its batching rule: a batched input folded into
  the conv's batch at any axis, a batched kernel, both) computes the float64 cross-correlation per slice."""
  rng = np.random.default_rng(7)
  pads, s = ((1, 2), (2, 0)), 2
  x = rng.standard_normal((3, 2, 7, 6, 4)).astype(np.float32)  # (n, vmapped, h, w, c)
  w = (rng.standard_normal((2, 3, 3, 4, 5)) / 6).astype(np.float32)  # (vmapped, kh, kw, i, o)
  conv = lambda x, w: onednn.conv(x, w, s, pads)
  np.testing.assert_allclose(np.asarray(conv(x[:, 0], w[0])), _np_conv(x[:, 0], w[0], s, pads), rtol=1e-5,
                             atol=2e-5)
  cases = {(1, None): lambda b: (x[:, b], w[0]), (None, 0): lambda b: (x[:, 0], w[b]),
           (1, 0): lambda b: (x[:, b], w[b])}
  for axes, args in cases.items():
    xs = x if axes[0] is not None else x[:, 0]
    ws = w if axes[1] is not None else w[0]
    got = np.asarray(jax.jit(jax.vmap(conv, in_axes=axes, out_axes=1))(xs, ws))
    for b in range(2):
      np.testing.assert_allclose(got[:, b], _np_conv(*args(b), s, pads), rtol=1e-5, atol=2e-5, err_msg=str(axes))


@needs_dnn
@pytest.mark.parametrize("k,s,transpose,h,w", [
    (5, 1, False, 9, 8), (3, 1, False, 7, 7), (1, 1, False, 5, 6), (5, 2, False, 14, 9), (3, 2, False, 7, 7),
    (5, 2, True, 7, 6), (3, 2, True, 7, 7), (4, 2, True, 3, 5)])
def test_fast_paths_on_onednn_equal_plain(k, s, transpose, h, w):
  """conv2d on oneDNN (forward convs, stride-1 input gradients and, on any CPU here, the 5x5 stride-1 weight
  gradient; other weight gradients by XLA) equals the plain lax conv in value, input and weight gradient, with
  and without batch chunks."""
  rng, x, wt = _inputs(k * 7 + s + h, 5, h, w, 3, k, 4)
  for budget in (0, 4 * 2 * 3 * max(h * w, (h * s) * (w * s))):
    with mock.patch.object(layers, "ONEDNN_DW_NEEDS_AVX512", False):
      _check_same(lambda x, wt: layers.conv2d(x, wt, s, transpose, fast=False),
                  lambda x, wt: layers.conv2d(x, wt, s, transpose, fast=True, chunk_bytes=budget, onednn=True),
                  x, wt, rng)


@needs_dnn
@pytest.mark.parametrize("k,pads,hw,n,chunk", [
    (5, ((2, 2), (2, 2)), (9, 8), 19, None), (5, ((1, 3), (0, 2)), (7, 10), 10, 4),
    (3, ((0, 0), (2, 1)), (6, 5), 5, 16), (1, ((0, 0), (0, 0)), (4, 4), 7, 3), (6, ((0, 0), (0, 0)), (8, 6), 3, 1)])
def test_onednn_weight_gradient_equals_float64_numpy(k, pads, hw, n, chunk):
  """`weight_grad_onednn` (the batch contracted by oneDNN forward convs, in slices of `chunk` examples that do
  not divide the batch) is the float64 weight gradient dw[a, b, c, o] = sum xpad[n, i + a, j + b, c] ct[n, i, j,
  o] of a stride-1 conv, for uneven and zero pads."""
  rng = np.random.default_rng(k * 13 + n)
  x = rng.standard_normal((n, *hw, 5)).astype(np.float32)
  out_hw = [hw[a] + pads[a][0] + pads[a][1] - k + 1 for a in range(2)]
  ct = rng.standard_normal((n, *out_hw, 6)).astype(np.float32)
  got = np.asarray(jax.jit(lambda x, ct: layers.weight_grad_onednn(x, ct, pads, chunk))(x, ct))
  xp = np.pad(x.astype(np.float64), ((0, 0), pads[0], pads[1], (0, 0)))
  want = np.zeros((k, k, 5, 6))
  for a in range(k):
    for b in range(k):
      want[a, b] = np.einsum("nijc,nijo->co", xp[:, a:a + out_hw[0], b:b + out_hw[1]], ct.astype(np.float64))
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * math.sqrt(n * out_hw[0] * out_hw[1]))


@needs_dnn
@pytest.mark.parametrize("avx512", [True, False])
def test_auto_runs_forward_and_gradients_on_onednn(avx512):
  """On one CPU device `auto` (onednn=None) puts a stride-1 conv's forward and input gradient on oneDNN, and on
  an AVX-512 CPU its weight gradient too for kernels of at least `layers.ONEDNN_DW_MIN_KERNEL` (three custom
  calls in the compiled gradient of a 5x5 conv on 4 examples, two without AVX-512), a strided conv's forward and
  its sub-pixel input gradient, and a transposed conv's sub-pixel conv and its input gradient (their sub-pixel
  kernels are 3x3: weight gradients by XLA); onednn=False leaves none."""
  if jax.device_count() != 1:
    pytest.skip("auto uses oneDNN on a single device only")
  assert layers.ONEDNN_DW_MIN_KERNEL == 5 and layers.ONEDNN_DW_CHUNK >= 4 and layers.ONEDNN_DW_NEEDS_AVX512
  rng, x, wt = _inputs(5, 4, 8, 8, 3, 5, 3)
  with mock.patch.object(onednn, "cpu_has_avx512", lambda: avx512):
    for s, transpose in ((1, False), (2, False), (2, True)):
      for dnn, calls in ((None, 3 if s == 1 and avx512 else 2), (False, 0)):
        loss = lambda x, wt: jnp.sum(jnp.sin(layers.conv2d(x, wt, s, transpose, fast=True, chunk_bytes=0,
                                                           onednn=dnn)))
        hlo = jax.jit(jax.grad(loss, (0, 1))).lower(x, wt).compile().as_text()
        assert hlo.count(f'custom_call_target="{onednn.TARGET}"') == calls, (s, transpose, dnn)


@pytest.mark.parametrize("flags,want", [
    ("fpu sse2 avx2 avx512f avx512dq avx512bw", True), ("fpu sse2 avx2 fma", False),
    ("fpu avx2 avx512fp16 avx512_bf16", False)])
def test_cpu_has_avx512_reads_the_flags_line(flags, want, tmp_path):
  """`onednn.cpu_has_avx512` is True exactly when /proc/cpuinfo's flags hold the token avx512f (not a longer
  flag that starts with it), and False where the file cannot be read."""
  cpuinfo = tmp_path / "cpuinfo"
  cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU avx512f\nflags\t\t: {flags}\n\n")
  real_open = open
  fake_open = lambda path, *a, **kw: real_open(cpuinfo if path == "/proc/cpuinfo" else path, *a, **kw)

  def missing_open(path, *args, **kwargs):
    raise FileNotFoundError(path)

  try:
    for opener, expected in ((fake_open, want), (missing_open, False)):
      onednn.cpu_has_avx512.cache_clear()
      with mock.patch("builtins.open", opener):
        assert onednn.cpu_has_avx512() is expected
  finally:
    onednn.cpu_has_avx512.cache_clear()


def test_onednn_resolution_and_errors():
  """oneDNN is off for the plain path and for bfloat16 compute, and asking for it where it cannot run is a
  one-line error naming the fix; `onednn.conv` rejects what it does not implement."""
  assert layers.resolve_onednn(None, False) is False
  assert layers.resolve_onednn(True, False) is False
  assert layers.resolve_onednn(None, True, jnp.bfloat16) is False
  with pytest.raises(ValueError, match="conv_impl='auto'"):
    layers.resolve_onednn(True, True, jnp.bfloat16)
  assert layers.ConvPolicy.from_name("auto") == layers.ConvPolicy(None, None, None) == layers.ConvPolicy()
  assert WNConv(4, 3).onednn is None  # the layers' default is 'auto' too
  assert layers.ConvPolicy.from_name("onednn") == layers.ConvPolicy(True, None, True)
  assert layers.ConvPolicy.from_name("fast") == layers.ConvPolicy(True, None, False)
  with pytest.raises(ValueError, match="float32"):
    onednn.conv(jnp.ones((1, 4, 4, 2), jnp.bfloat16), jnp.ones((3, 3, 2, 2), jnp.bfloat16), 1, ((1, 1),) * 2)
  with pytest.raises(ValueError, match="non-negative pads"):
    onednn.conv(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2)), 1, ((-1, 1), (1, 1)))
