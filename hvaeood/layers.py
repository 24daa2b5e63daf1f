"""Weight-normalised layers with data-dependent initialisation, and the residual block.

Layout is NHWC throughout. Every layer stores `v` (direction), `g` (per-output-unit scale) and `b` (bias);
the effective weight is `w = g * v / ||v||` with the norm taken per output unit over all other axes. The
weight is folded once per call (a tiny op on the parameters), so each layer costs exactly one conv or matmul.

Data-dependent initialisation (Salimans & Kingma 2016, as in the reference): when the module is being
initialised (`model.init(...)` on a real batch), each layer computes its pre-activations on its actual input
and sets `g = 1 / sqrt(var + 1e-8)`, `b = -mean * g` per output unit, using the *unbiased* variance over
batch and space, so its outputs start at zero mean and unit variance. Channels with (numerically) zero
variance keep `g = 1` instead of the reference's 1e4.

A transposed conv takes these statistics over its *uncropped* output ((in-1)s + k per axis, e.g. 15x15 and
31x31 for FashionMNIST's 7->14 and 14->28 upsamplings), before the crop that makes it 'same'-sized, exactly as
the reference (docs/design.md §7: its init runs on the raw transposed-conv output and the crop follows). The
cropped output then starts only close to zero mean and unit variance; following the reference keeps the initial
parameters, and so the start of training, identical to the paper's code (a cropped-statistics init would move
the decoder's transposed-conv scales g and the initial ELBO measurably).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import itertools
import math
from typing import Any, Callable, Optional, Sequence, TypeVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from hvaeood import onednn as onednn_lib

Array = jax.Array

_DN = ("NHWC", "HWIO", "NHWC")
_WN_EPS = 1e-8
_MIN_INIT_VAR = 1e-10


# Where `kaiming_normal` takes its standard normal values from inside `one_draw`: a function of (shape, dtype).
_DRAW: contextvars.ContextVar = contextvars.ContextVar("hvaeood_kaiming_draw", default=None)
T = TypeVar("T")


def kaiming_normal(fan_in_axes: Sequence[int]) -> Callable[..., Array]:
  """He-normal init (ReLU gain, fan-in mode) with the fan-in taken over `fan_in_axes`.

  Its standard normal values are `jax.random.normal(key, shape)` with flax's per-parameter key, or, inside
  `one_draw`, the next slice of that function's single draw.
  """

  def init(key, shape, dtype=jnp.float32):
    fan_in = math.prod(shape[a] for a in fan_in_axes)
    draw = _DRAW.get()
    z = jax.random.normal(key, shape, dtype) if draw is None else draw(tuple(shape), jnp.dtype(dtype))
    return z * math.sqrt(2.0 / fan_in)

  return init


@contextlib.contextmanager
def _drawing(draw):
  token = _DRAW.set(draw)
  try:
    yield
  finally:
    _DRAW.reset(token)


def one_draw(init_fn: Callable[[], T], key: Array) -> T:
  """`init_fn()` (a model's init) with all its `kaiming_normal` values cut from ONE `jax.random.normal(key, [n])`.

  Flax draws every parameter with a key of its own, derived from the init key by `fold_in`s, and XLA compiles
  each draw and each key's derivation as code of its own: the jitted init's first call took 30.5 CPU s for the
  tiny FashionMNIST model and 15.7 with one draw, 22.5 and 19.0 for the paper's (benchmarks/README.md, "Issue 14,
  eleventh session"). Here `init_fn` is traced once with `jax.eval_shape` (no computation) to list the shapes
  of its draws in the order it makes them; then one normal draw of their total size is made (float32, cast to
  each draw's dtype), and the real `init_fn()` gets consecutive slices of it, in that order. The values are i.i.d. standard normal as before (each `v` is still
  He-normal, and different `v` get disjoint slices), but not flax's: the key decides them all, and a parameter's
  values depend on its place in the creation order. `init_fn` must make the same draws each time (a model's init
  does); one that does not raises a RuntimeError.
  """
  shapes: list = []

  def record(shape, dtype):
    shapes.append((shape, dtype))
    return jnp.zeros(shape, dtype)

  with _drawing(record):
    jax.eval_shape(init_fn)
  sizes = [math.prod(shape) for shape, _ in shapes]
  flat = jax.random.normal(key, (sum(sizes),), jnp.float32)
  offsets = [0, *itertools.accumulate(sizes)]
  served = 0

  def replay(shape, dtype):
    nonlocal served
    if served >= len(shapes) or shapes[served] != (shape, dtype):
      raise RuntimeError(f"one_draw: draw {served} of init_fn ({shape}, {dtype}) is not the one its trace made; "
                         "init_fn must make the same draws each time")
    start, size = offsets[served], sizes[served]
    served += 1
    return flat[start:start + size].reshape(shape).astype(dtype)

  with _drawing(replay):
    out = init_fn()
  if served != len(shapes):
    raise RuntimeError(f"one_draw: init_fn made {served} draws, its trace {len(shapes)}")
  return out


def same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TensorFlow 'SAME' padding for one spatial axis: output ceil(size/stride), extra pixel at the end."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def transpose_pads(kernel: int, stride: int) -> tuple[int, int]:
  """Crop (as negative pad) of a transposed conv so that out = stride * in.

  The reference runs the transposed conv unpadded (out = (in-1)s + k) and crops floor((k-s)/2) at the start
  and ceil((k-s)/2) at the end. In lax.conv_transpose terms (explicit padding of the dilated input) that is
  padding (k-1-floor((k-s)/2), k-1-ceil((k-s)/2)), e.g. (2, 1) for k=3, s=2 and (3, 2) for k=5, s=2.
  """
  crop_lo = max(kernel - stride, 0) // 2
  crop_hi = max(kernel - stride, 0) - crop_lo
  return kernel - 1 - crop_lo, kernel - 1 - crop_hi


def _init_scale_and_bias(t: Array, reduce_axes: tuple[int, ...]) -> tuple[Array, Array]:
  """Per-unit g and b that map pre-activations t to zero mean, unit (unbiased) variance."""
  t = t.astype(jnp.float32)
  n = math.prod(t.shape[a] for a in reduce_axes)
  mean = jnp.mean(t, axis=reduce_axes)
  var = jnp.sum(jnp.square(t - jnp.expand_dims(mean, reduce_axes)), axis=reduce_axes) / max(n - 1, 1)
  g = jnp.where(var > _MIN_INIT_VAR, lax.rsqrt(var + _WN_EPS), 1.0)
  return g, -mean * g


class _WeightNormBase(nn.Module):
  """Shared machinery: builds v, g, b and returns the folded weight."""

  def weight_norm_params(self, v_shape, norm_axes, fan_in_axes, pre_activation: Callable[[Array], Array]):
    features = v_shape[-1]
    v = self.param("v", kaiming_normal(fan_in_axes), v_shape)
    inv_norm = lax.rsqrt(jnp.sum(jnp.square(v), axis=norm_axes))
    if self.is_initializing():
      t = pre_activation(v * inv_norm)
      reduce_axes = tuple(range(t.ndim - 1))
      g0, b0 = _init_scale_and_bias(t, reduce_axes)
    else:
      g0 = b0 = None
    g = self.param("g", lambda *_: g0, (features,))
    b = self.param("b", lambda *_: b0, (features,))
    return v * (g * inv_norm), b


# --------------------------------------------------------------------------------------------------------------
# Convolution kernels. XLA:CPU runs stride-1 convolutions through a fast library path, but a transposed conv
# and the input gradient of a strided conv are lhs-dilated convolutions that it runs through a slow generic
# loop, many times slower than a plain conv (figures: benchmarks/README.md). The fast paths:
#   * transposed conv -> sub-pixel form: ONE stride-1 conv producing all s*s output phases as channels, then
#     depth-to-space; its gradients are stride-1 convs too;
#   * strided conv -> the plain forward (fast), with a custom VJP whose input gradient is that sub-pixel
#     transposed conv (the space-to-depth rewrite `conv_strided_s2d` is exact as well, but measured slower);
#   * a large batch is split into cache-sized static chunks (cuts the gradient convs' CPU time);
#   * the two inputs of every weight-gradient conv are materialised (`materialised`): XLA:CPU transposes both for
#     its conv kernel, and a transpose into which XLA fused their elementwise producers (residual adds, ReLU,
#     chunk slices) ran ~10x slower than the same transpose of a stored array;
#   * on a single CPU device with jaxlib's oneDNN runtime (`hvaeood.onednn`; 'auto' where usable): the forward
#     convs and the input gradients of stride-1 convs on oneDNN's kernels (1.2-1.4x XLA's Eigen kernels per op
#     here), the weight gradients of stride-1 5x5s too where the CPU has AVX-512 (`onednn_weight_grad`), the
#     other weight gradients with XLA. Several devices keep XLA's kernels: the custom call has no SPMD
#     partitioning rule.
# The sub-pixel kernel is built from the folded weight w by pads, reshapes, transposes and flips only (a static
# gather), so the stored parameters are the same for both paths, and results agree to float32 rounding
# (tests/test_layers_fast.py). Measurements: benchmarks/README.md, benchmarks/microbench_convs.py.

@dataclasses.dataclass(frozen=True)
class ConvPolicy:
  """How `WNConv` runs its convolutions (hashable, so models carry it in their spec).

  Attributes:
    fast: the stride-1 rewrites and batch chunking above (True), plain lax convolutions (False), or None: fast on
      the CPU backend, where they were measured faster, plain on GPU and TPU, where XLA's own convolutions are
      used until the rewrites are measured there (`resolve_fast`).
    chunk_bytes: the fast path splits a conv's batch into static chunks whose input and output stay under about
      this many bytes, so the gradient convs run in cache; a batch that would need more than `CONV_MAX_CHUNKS`
      chunks (e.g. an evaluation's 1,500 rows) is not split, since its chunks would not fit either and the split
      only adds copies (benchmarks/README.md, change 9); 0 turns chunking off, None is
      `DEFAULT_CONV_CHUNK_BYTES`.
    onednn: run the fast path's forward and input-gradient convs on oneDNN (`hvaeood.onednn`), and the 5x5
      weight gradients on an AVX-512 CPU (`onednn_weight_grad`); None: where
      `resolve_onednn` finds it usable (CPU backend, one device, float32, a verified jaxlib), True: required
      (an error where it cannot run), False: XLA's kernels only.
  """
  fast: Optional[bool] = None
  chunk_bytes: Optional[int] = None
  onednn: Optional[bool] = None

  @classmethod
  def from_name(cls, impl: str, chunk_bytes: Optional[int] = None) -> "ConvPolicy":
    """'auto' | 'onednn' | 'fast' | 'plain' (config.model.conv_impl) -> a policy."""
    if impl not in CONV_IMPLS:
      raise ValueError(f"config.model.conv_impl={impl!r} is not one of {CONV_IMPLS}.")
    fast, dnn = {"auto": (None, None), "onednn": (True, True), "fast": (True, False), "plain": (False, False)}[impl]
    return cls(fast, chunk_bytes, dnn)


# auto: the CPU rewrites on the CPU backend only, on oneDNN's kernels where `resolve_onednn` finds them usable
# (one device, float32), else XLA's; onednn: the rewrites on oneDNN's kernels (required: an error where they
# cannot run); fast: the rewrites on XLA's kernels on any backend; plain: lax.
CONV_IMPLS = ("auto", "onednn", "fast", "plain")
DEFAULT_CONV_CHUNK_BYTES = 8 << 20
CONV_MAX_CHUNKS = 8


def resolve_fast(fast: Optional[bool]) -> bool:
  """`fast`, or for None whether the default backend is the CPU (the only backend the fast paths were measured on)."""
  return jax.default_backend() == "cpu" if fast is None else bool(fast)


def resolve_onednn(onednn: Optional[bool], fast: bool, dtype=jnp.float32) -> bool:
  """Whether the fast path runs its convs on oneDNN: `onednn`, or for None whether it can here (the fast path on
  the CPU backend, float32, a single device: the custom call has no SPMD partitioning rule, and
  `onednn.available()`).

  Raises:
    ValueError: `onednn` is True where oneDNN cannot run, naming why and the fix.
  """
  if onednn is False or not fast:
    return False
  usable = (jax.default_backend() == "cpu" and jnp.dtype(dtype) == jnp.float32 and jax.device_count() == 1)
  if onednn is None:
    return usable and onednn_lib.available()
  if not usable or not onednn_lib.available():
    raise ValueError(
        "config.model.conv_impl='onednn' needs the CPU backend, float32 compute, a single device and jaxlib's "
        f"oneDNN runtime on x86-64 Linux (a verified jaxlib: {onednn_lib.VERIFIED_JAXLIB}); here backend="
        f"{jax.default_backend()}, dtype={jnp.dtype(dtype).name}, devices={jax.device_count()}: use "
        "conv_impl='auto'.")
  return True


def conv_plain(x: Array, w: Array, stride: int, pads) -> Array:
  """Reference strided conv, explicit (lo, hi) padding per spatial axis (HWIO kernel, NHWC)."""
  return lax.conv_general_dilated(x, w, (stride, stride), pads, dimension_numbers=_DN)


def materialised(x: Array) -> Array:
  """x, as the output of an operation that XLA cannot fuse into x's consumers.

  A conditional on x's first value whose two branches both return x's values: `v`, and, only when that value is
  NaN (a diverged step, whose gradients are not finite anyway), abs(v) * sign(v), which is v for every float
  (NaN, infinities and signed zeros included) except that XLA:CPU may flush subnormals to zero. XLA cannot fold
  the predicate, so it keeps the conditional (two identical branches it would fold), and the consumers read the
  stored array instead of recomputing its elementwise producers (`lax.optimization_barrier` does not do this:
  XLA:CPU drops it before fusion). Costs one copy of x.
  """
  first = x[(0,) * x.ndim]
  return lax.cond(first != first, lambda v: jnp.abs(v) * jnp.sign(v), lambda v: v, x)


def conv_fwd(x: Array, w: Array, stride: int, pads, dnn: bool = False) -> Array:
  """conv_plain, on oneDNN when `dnn` (forward only: no autodiff rule; callers define the VJP)."""
  return onednn_lib.conv(x, w, stride, pads) if dnn else conv_plain(x, w, stride, pads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_s1(x: Array, w: Array, pads, dnn: bool = False) -> Array:
  """conv_plain(x, w, 1, pads), whose weight gradient reads materialised inputs (`materialised`); with `dnn`
  the forward conv and the input gradient run on oneDNN."""
  return conv_fwd(x, w, 1, pads, dnn)


def _conv_s1_fwd(x, w, pads, dnn):
  return conv_fwd(x, w, 1, pads, dnn), (x, w)


# On the oneDNN path, the stride-1 weight gradients of kernels of at least ONEDNN_DW_MIN_KERNEL run on oneDNN
# (`weight_grad_onednn`, ONEDNN_DW_CHUNK examples per call) where the CPU has AVX-512 (or anywhere when
# ONEDNN_DW_NEEDS_AVX512 is False); the others keep XLA's kernel. Measurements: benchmarks/README.md, change 13.
ONEDNN_DW_MIN_KERNEL = 5
ONEDNN_DW_CHUNK = 16
ONEDNN_DW_NEEDS_AVX512 = True


def onednn_weight_grad(kernel: Sequence[int], pads) -> bool:
  """Whether the oneDNN path runs the weight gradient of a stride-1 conv with this kernel size and these pads on
  oneDNN (the rule above; non-negative pads only)."""
  return (min(kernel) >= ONEDNN_DW_MIN_KERNEL and min(min(p) for p in pads) >= 0
          and (onednn_lib.cpu_has_avx512() or not ONEDNN_DW_NEEDS_AVX512))


def _slices(n: int, parts: int) -> list[tuple[int, int]]:
  """(lo, hi) bounds of `parts` static, nearly equal, consecutive slices of range(n)."""
  bounds = [round(i * n / parts) for i in range(parts + 1)]
  return list(zip(bounds[:-1], bounds[1:]))


def weight_grad_onednn(x: Array, ct: Array, pads, chunk: Optional[int] = None) -> Array:
  """The weight gradient of conv_plain(x, w, 1, pads) (cotangent ct) as oneDNN forward convolutions.

  dw[a, b, c, o] = sum_{n, i, j} xp[n, i + a, j + b, c] ct[n, i, j, o] (xp: x padded by `pads`) is a stride-1
  conv, with the same pads, of x read as [c, h, w, n] (x's channels as the batch, its batch as the channels)
  with ct read as an [i, j, n, o] kernel; its [c, a, b, o] output is dw with the first axes swapped. The batch
  is contracted in static slices of about `chunk` examples (None: `ONEDNN_DW_CHUNK`; oneDNN runs this shape
  fastest with few input channels, benchmarks/README.md, change 13), summed in order. Needs non-negative pads.
  """
  n, chunk = x.shape[0], chunk or ONEDNN_DW_CHUNK
  dw = None
  for lo, hi in _slices(n, max(1, -(-n // chunk))):
    part = onednn_lib.conv(x[lo:hi].transpose(3, 1, 2, 0), ct[lo:hi].transpose(1, 2, 0, 3), 1, pads)
    dw = part if dw is None else dw + part
  return dw.transpose(1, 2, 0, 3)


def _conv_s1_bwd(pads, dnn, res, ct):
  x, w = res
  k = w.shape[:2]
  dx_pads = tuple((k[a] - 1 - lo, k[a] - 1 - hi) for a, (lo, hi) in enumerate(pads))
  if not (dnn and min(min(p) for p in dx_pads) >= 0):
    _, vjp = jax.vjp(lambda x_, w_: conv_plain(x_, w_, 1, pads), materialised(x), w)
    return vjp(materialised(ct))
  # dx[i] = sum_j ct[i + j - (k-1-lo)] w[k-1-j]: a stride-1 conv of ct with the flipped kernel read as HWOI.
  dx = onednn_lib.conv(ct, jnp.flip(w, (0, 1)), 1, dx_pads, kernel_transposed=True)
  if onednn_weight_grad(k, pads):
    dw = weight_grad_onednn(materialised(x), materialised(ct), pads)
  else:
    dw = jax.vjp(lambda w_: conv_plain(materialised(x), w_, 1, pads), w)[1](materialised(ct))[0]
  return dx, dw.astype(w.dtype)


conv_s1.defvjp(_conv_s1_fwd, _conv_s1_bwd)


def conv_transpose_plain(x: Array, w: Array, stride: int, pads) -> Array:
  """Reference transposed conv: lax.conv_transpose with explicit padding of the dilated input, no flip."""
  return lax.conv_transpose(x, w, (stride, stride), pads, dimension_numbers=_DN)


def _pad_axis(a: Array, axis: int, lo: int, hi: int) -> Array:
  """Zero-pads (or, for negative amounts, crops) one axis."""
  cfg = [(0, 0, 0)] * a.ndim
  cfg[axis] = (lo, hi, 0)
  return lax.pad(a, jnp.zeros((), a.dtype), cfg)


def space_to_depth_kernel(w: Array, s: int) -> Array:
  """(k, k, C, F) kernel of a stride-s conv -> (T, T, s*s*C, F), T = ceil(k/s), for the stride-1 conv on a
  space-to-depth input: K[ty, tx, (ry, rx, c), f] = w[s*ty + ry, s*tx + rx, c, f], zero where the tap >= k."""
  k, c, f = w.shape[0], w.shape[2], w.shape[3]
  t = -(-k // s)
  w = _pad_axis(_pad_axis(w, 0, 0, s * t - k), 1, 0, s * t - k)
  w = w.reshape(t, s, t, s, c, f).transpose(0, 2, 1, 3, 4, 5)
  return w.reshape(t, t, s * s * c, f)


def conv_strided_s2d(x: Array, w: Array, stride: int, pads) -> Array:
  """Equals conv_plain(x, w, stride, pads) for any (lo, hi) pads, as one stride-1 VALID conv.

  y[q] = sum_j xp[s*q + j] w[j] with xp the padded input; writing j = s*t + r this is a stride-1 conv over t of
  the space-to-depth input xs[m, r] = xp[s*m + r] with the kernel K[t, r] = w[s*t + r] (zero for j >= k).
  """
  s, k = stride, w.shape[0]
  if s == 1:
    return conv_plain(x, w, 1, pads)
  n, c = x.shape[0], x.shape[-1]
  t = -(-k // s)
  outs, cfg = [], [(0, 0, 0)]
  for axis, (lo, hi) in zip((1, 2), pads):
    size = x.shape[axis]
    out = (size + lo + hi - k) // s + 1
    outs.append(out)
    cfg.append((lo, s * (out - 1 + t) - size - lo, 0))  # taps past the kernel meet zero weights
  cfg.append((0, 0, 0))
  xp = lax.pad(x, jnp.zeros((), x.dtype), cfg)
  hs, ws = outs[0] - 1 + t, outs[1] - 1 + t
  xs = xp.reshape(n, hs, s, ws, s, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, hs, ws, s * s * c)
  return lax.conv_general_dilated(xs, space_to_depth_kernel(w, s), (1, 1), "VALID", dimension_numbers=_DN)


def _subpixel_geometry(k: int, s: int, lo: int) -> tuple[int, int, int]:
  """Tap range of the sub-pixel form of a transposed conv along one axis: (d_min, taps, offset c).

  Output phase r = o mod s reads y[s*q + r] = sum_d x[q + d] w[s*d + lo - r] over the d with 0 <= s*d+lo-r < k,
  so d runs over [d_min, d_max] = [ceil(-lo/s), floor((k + s - 2 - lo)/s)] across all phases. With r' = s-1-r
  the tap is j = s*t + r' + c, t = d - d_min, c = s*d_min + lo - (s-1).
  """
  d_min = -(lo // s)
  d_max = (k + s - 2 - lo) // s
  return d_min, d_max - d_min + 1, s * d_min + lo - (s - 1)


def subpixel_kernel(w: Array, s: int, lo: tuple[int, int]) -> Array:
  """(k, k, C, F) transposed-conv kernel -> (Ty, Tx, C, s*s*F) stride-1 kernel producing all s*s phases:
  K[ty, tx, c, (ry, rx, f)] = w[s*(d_min_y+ty) + lo_y - ry, s*(d_min_x+tx) + lo_x - rx, c, f], zero off-kernel."""
  k, c, f = w.shape[0], w.shape[2], w.shape[3]
  (_, ty, cy), (_, tx, cx) = _subpixel_geometry(k, s, lo[0]), _subpixel_geometry(k, s, lo[1])
  w = _pad_axis(w, 0, -cy, s * ty - k + cy)  # w_ext[i] = w[i + c]: length s*T, zero outside [0, k)
  w = _pad_axis(w, 1, -cx, s * tx - k + cx)
  w = w.reshape(ty, s, tx, s, c, f)[:, ::-1, :, ::-1]  # [t, r'] -> [t, r]
  return w.transpose(0, 2, 4, 1, 3, 5).reshape(ty, tx, c, s * s * f)


def conv_transpose_subpixel(x: Array, w: Array, stride: int, pads, dnn: bool = False) -> Array:
  """Equals conv_transpose_plain(x, w, stride, pads) as one stride-1 conv (all s*s output phases as channels,
  `conv_s1`, on oneDNN when `dnn`) followed by depth-to-space."""
  s, k = stride, w.shape[0]
  if s == 1:
    return conv_transpose_plain(x, w, 1, pads)
  n, f = x.shape[0], w.shape[-1]
  conv_pads, outs, qs = [], [], []
  for axis, (lo, hi) in zip((1, 2), pads):
    size = x.shape[axis]
    out = (size - 1) * s + 1 + lo + hi - k + 1
    q = -(-out // s)
    d_min, taps, _ = _subpixel_geometry(k, s, lo)
    conv_pads.append((-d_min, q - size + d_min + taps - 1))
    outs.append(out)
    qs.append(q)
  kern = subpixel_kernel(w, s, (pads[0][0], pads[1][0]))
  z = conv_s1(x, kern, tuple(conv_pads), dnn)
  z = z.reshape(n, qs[0], qs[1], s, s, f).transpose(0, 1, 3, 2, 4, 5).reshape(n, qs[0] * s, qs[1] * s, f)
  if (qs[0] * s, qs[1] * s) != tuple(outs):
    z = z[:, :outs[0], :outs[1]]
  return z


def conv_transpose_uncropped(x: Array, w: Array, stride: int) -> Array:
  """The transposed conv before the 'same' crop: out = (in-1)s + k per axis (the data-dependent init's input)."""
  k = w.shape[0]
  return conv_transpose_plain(x, w, stride, ((k - 1, k - 1),) * 2)


def _strided_conv_lhs_pads(k: int, s: int, size: int, out: int, lo: int) -> tuple[int, int]:
  """Padding of the transposed conv that maps a stride-s conv's output cotangent back to its input (size)."""
  return k - 1 - lo, size - (out - 1) * s - 1 + lo


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_strided_fastgrad(x: Array, w: Array, stride: int, pads, dnn: bool = False) -> Array:
  """Equals conv_plain(x, w, stride, pads) in value and gradient. The forward pass is the plain strided conv
  (fast in XLA:CPU); the input gradient, which autodiff would emit as an lhs-dilated conv (slow generic loop),
  is the transposed conv of the cotangent with the flipped kernel, run as a sub-pixel stride-1 conv; the weight
  gradient is autodiff's (a rhs-dilated conv, which XLA:CPU runs well) of materialised inputs. With `dnn` the
  forward conv and the sub-pixel conv run on oneDNN."""
  return conv_fwd(x, w, stride, pads, dnn)


def _conv_strided_fastgrad_fwd(x, w, stride, pads, dnn):
  return conv_fwd(x, w, stride, pads, dnn), (x, w)


def _conv_strided_fastgrad_bwd(stride, pads, dnn, res, ct):
  x, w = res
  k = w.shape[0]
  lhs_pads = tuple(_strided_conv_lhs_pads(k, stride, x.shape[a], ct.shape[a], lo)
                   for a, (lo, _) in zip((1, 2), pads))
  w_t = jnp.flip(w, (0, 1)).swapaxes(2, 3)
  dx = conv_transpose_subpixel(ct, w_t, stride, lhs_pads, dnn)
  dw = jax.vjp(lambda w_: conv_plain(materialised(x), w_, stride, pads), w)[1](materialised(ct))[0]
  return dx.astype(x.dtype), dw.astype(w.dtype)


conv_strided_fastgrad.defvjp(_conv_strided_fastgrad_fwd, _conv_strided_fastgrad_bwd)


def _num_chunks(x: Array, out_shape, chunk_bytes: Optional[int]) -> int:
  chunk_bytes = DEFAULT_CONV_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
  if chunk_bytes <= 0 or x.ndim != 4:
    return 1
  n = x.shape[0]
  per_example = max(math.prod(x.shape[1:]), math.prod(out_shape[1:])) * x.dtype.itemsize
  chunks = -(-n * per_example // chunk_bytes)
  if chunks > CONV_MAX_CHUNKS:  # chunks over the budget stay out of cache: the split would only add copies
    return 1
  return max(1, min(n, chunks))


def _batch_chunked(fn: Callable[[Array], Array], x: Array, chunks: int) -> Array:
  """fn over static, nearly equal batch slices of x, concatenated (a Python loop: lax.map's gradient is slow)."""
  if chunks <= 1:
    return fn(x)
  return jnp.concatenate([fn(x[lo:hi]) for lo, hi in _slices(x.shape[0], chunks)], axis=0)


def conv2d(x: Array, w: Array, stride: int = 1, transpose: bool = False, fast: Optional[bool] = None,
           chunk_bytes: Optional[int] = None, onednn: Optional[bool] = None) -> Array:
  """WNConv's convolution: TF-'SAME' conv (out = ceil(in/s)) or transposed conv (out = s*in, the reference's
  crop). On the fast path (`fast`, or on CPU when None: `resolve_fast`) a transposed conv runs as a sub-pixel
  stride-1 conv, a strided conv's input gradient likewise, and large batches in chunks of about `chunk_bytes`
  (see `ConvPolicy`), and its convs on oneDNN where `resolve_onednn(onednn, ...)`. All paths take and give the
  same arrays."""
  fast = resolve_fast(fast)
  dnn = resolve_onednn(onednn, fast, x.dtype) and x.dtype == w.dtype
  k = w.shape[0]
  if transpose:
    pads = (transpose_pads(k, stride),) * 2
    if not (fast and stride > 1):
      return conv_transpose_plain(x, w, stride, pads)
    conv = lambda xc: conv_transpose_subpixel(xc, w, stride, pads, dnn)
    out_hw = tuple(stride * d for d in x.shape[1:3])
  else:
    pads = (same_pads(x.shape[1], k, stride), same_pads(x.shape[2], k, stride))
    if not fast:
      return conv_plain(x, w, stride, pads)
    if stride > 1:
      conv = lambda xc: conv_strided_fastgrad(xc, w, stride, pads, dnn)
    else:
      conv = lambda xc: conv_s1(xc, w, pads, dnn)
    out_hw = tuple(-(-d // stride) for d in x.shape[1:3])
  return _batch_chunked(conv, x, _num_chunks(x, (x.shape[0],) + out_hw + (w.shape[-1],), chunk_bytes))


class WNConv(_WeightNormBase):
  """Weight-normalised 2-D convolution (or transposed convolution) with TF 'SAME' semantics.

  Attributes:
    features: output channels.
    kernel_size: square kernel size.
    stride: spatial stride (upsampling factor when `transpose`).
    transpose: run a transposed conv whose output is exactly `stride * input` spatially.
    dtype: compute dtype (parameters stay float32).
    fast: use the stride-1 rewrites of strided/transposed convs (None: on CPU only, `resolve_fast`); the
      parameters are the same either way.
    chunk_bytes: the fast path's batch-chunk budget (None: `DEFAULT_CONV_CHUNK_BYTES`).
    onednn: the fast path's convs on oneDNN (None: where usable, `resolve_onednn`).
  """

  features: int
  kernel_size: int
  stride: int = 1
  transpose: bool = False
  dtype: Any = jnp.float32
  fast: Optional[bool] = None
  chunk_bytes: Optional[int] = None
  onednn: Optional[bool] = None

  def _conv(self, x: Array, w: Array) -> Array:
    return conv2d(x.astype(self.dtype), w.astype(self.dtype), self.stride, self.transpose, self.fast,
                  self.chunk_bytes, self.onednn)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k = self.kernel_size
    if self.transpose:  # init statistics over the uncropped output, as the reference (module docstring)
      pre_activation = lambda wn: conv_transpose_uncropped(x.astype(self.dtype), wn.astype(self.dtype), self.stride)
    else:
      pre_activation = lambda wn: self._conv(x, wn)
    w, b = self.weight_norm_params(
        (k, k, x.shape[-1], self.features), norm_axes=(0, 1, 2), fan_in_axes=(0, 1, 2),
        pre_activation=pre_activation)
    return self._conv(x, w) + b.astype(self.dtype)


class WNDense(_WeightNormBase):
  """Weight-normalised dense layer on the last axis."""

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    matmul = lambda w: jnp.dot(x.astype(self.dtype), w.astype(self.dtype))
    w, b = self.weight_norm_params(
        (x.shape[-1], self.features), norm_axes=(0,), fan_in_axes=(0,), pre_activation=matmul)
    return matmul(w) + b.astype(self.dtype)


def avg_pool_residual(x: Array, stride: int) -> Array:
  """3x3 average pool with stride s, SAME zero padding (extra at bottom/right) counted in the divisor of 9."""
  pads = (same_pads(x.shape[1], 3, stride), same_pads(x.shape[2], 3, stride))
  return nn.avg_pool(x, (3, 3), (stride, stride), pads, count_include_pad=True)


def match_channels(x: Array, channels: int) -> Array:
  """Zero-pads extra channels at the end, or truncates, so that x has `channels` channels."""
  c = x.shape[-1]
  if c < channels:
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, channels - c)])
  return x[..., :channels]


_WNConv = WNConv


class ResBlock(nn.Module):
  """The reference's residual block (docs/design.md §2), ungated, weight-normalised.

  y = Conv_k(ReLU?(x)) [+ AuxOp(ReLU(aux))] -> ReLU -> Conv_k,stride s (transposed in an upsampling decoder
  block) [+ R(x)]. The aux op is chosen from aux's shape against conv1's output: a strided conv if aux is
  larger, a transposed conv if smaller, a 1x1 conv if only the channels differ. If the shapes are identical the
  reference drops the aux input; `aux_identity_add=True` adds ReLU(aux) instead.

  Attributes:
    features: output channels.
    kernel_size: kernel of both convs (and of a resampling aux op).
    stride: stride of conv2 (upsampling factor in a decoder).
    residual: pre-activate the input and add the (resampled, channel-matched) input to the output.
    upsample: conv2 is a transposed conv (decoder block with stride > 1).
    aux_identity_add: add ReLU(aux) when its shape equals conv1's output (the reference drops it).
    dtype: compute dtype.
    conv: how the convolutions run (`ConvPolicy`).
  """

  features: int
  kernel_size: int
  stride: int = 1
  residual: bool = True
  upsample: bool = False
  aux_identity_add: bool = False
  dtype: Any = jnp.float32
  conv: ConvPolicy = ConvPolicy()

  @nn.compact
  def __call__(self, x: Array, aux: Optional[Array] = None) -> Array:
    k, c = self.kernel_size, self.features
    # pylint: disable-next=invalid-name
    WNConv = functools.partial(_WNConv, fast=self.conv.fast, chunk_bytes=self.conv.chunk_bytes,
                               onednn=self.conv.onednn)
    u = nn.relu(x) if self.residual else x
    y = WNConv(c, k, 1, dtype=self.dtype, name="conv1")(u)
    if aux is not None:
      a = nn.relu(aux)
      ah, yh = aux.shape[1], y.shape[1]
      if ah > yh:
        y = y + WNConv(c, k, ah // yh, dtype=self.dtype, name="aux")(a)
      elif ah < yh:
        y = y + WNConv(c, k, yh // ah, transpose=True, dtype=self.dtype, name="aux")(a)
      elif aux.shape[-1] != c:
        y = y + WNConv(c, 1, 1, dtype=self.dtype, name="aux")(a)
      elif self.aux_identity_add:
        y = y + a.astype(y.dtype)
    y = nn.relu(y)
    y = WNConv(c, k, self.stride, transpose=self.upsample and self.stride > 1, dtype=self.dtype,
               name="conv2")(y)
    if self.residual:
      r = x.astype(y.dtype)
      if y.shape[1] < r.shape[1]:
        r = avg_pool_residual(r, self.stride)
      if y.shape[1] == r.shape[1]:  # growing spatial size (decoder upsampling) disables the residual
        y = y + match_channels(r, c)
    return y
