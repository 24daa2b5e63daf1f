"""Weight-normalised layers with data-dependent initialisation, and the residual block.

Layout is NHWC throughout. Every layer stores `v` (direction), `g` (per-output-unit scale) and `b` (bias);
the effective weight is `w = g * v / ||v||` with the norm taken per output unit over all other axes. The
weight is folded once per call (a tiny op on the parameters), so each layer costs exactly one conv or matmul.

Data-dependent initialisation (Salimans & Kingma 2016, as in the reference): when the module is being
initialised (`model.init(...)` on a real batch), each layer computes its pre-activations on its actual input
and sets `g = 1 / sqrt(var + 1e-8)`, `b = -mean * g` per output unit, using the *unbiased* variance over
batch and space, so its outputs start at zero mean and unit variance. Channels with (numerically) zero
variance keep `g = 1` instead of the reference's 1e4.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

_DN = ("NHWC", "HWIO", "NHWC")
_WN_EPS = 1e-8
_MIN_INIT_VAR = 1e-10


def kaiming_normal(fan_in_axes: Sequence[int]) -> Callable[..., Array]:
  """He-normal init (ReLU gain, fan-in mode) with the fan-in taken over `fan_in_axes`."""

  def init(key, shape, dtype=jnp.float32):
    fan_in = math.prod(shape[a] for a in fan_in_axes)
    return jax.random.normal(key, shape, dtype) * math.sqrt(2.0 / fan_in)

  return init


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


class WNConv(_WeightNormBase):
  """Weight-normalised 2-D convolution (or transposed convolution) with TF 'SAME' semantics.

  Attributes:
    features: output channels.
    kernel_size: square kernel size.
    stride: spatial stride (upsampling factor when `transpose`).
    transpose: run a transposed conv whose output is exactly `stride * input` spatially.
    dtype: compute dtype (parameters stay float32).
  """

  features: int
  kernel_size: int
  stride: int = 1
  transpose: bool = False
  dtype: Any = jnp.float32

  def _conv(self, x: Array, w: Array) -> Array:
    k, s = self.kernel_size, self.stride
    x = x.astype(self.dtype)
    w = w.astype(self.dtype)
    if self.transpose:
      pad = transpose_pads(k, s)
      return lax.conv_transpose(x, w, (s, s), (pad, pad), dimension_numbers=_DN)
    pads = (same_pads(x.shape[1], k, s), same_pads(x.shape[2], k, s))
    return lax.conv_general_dilated(x, w, (s, s), pads, dimension_numbers=_DN)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k = self.kernel_size
    w, b = self.weight_norm_params(
        (k, k, x.shape[-1], self.features), norm_axes=(0, 1, 2), fan_in_axes=(0, 1, 2),
        pre_activation=lambda wn: self._conv(x, wn))
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


class ResBlock(nn.Module):
  """The reference's residual block (SPEC 1.2), ungated, weight-normalised.

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
    aux_identity_add: add ReLU(aux) when its shape equals conv1's output (HEAD drops it).
    dtype: compute dtype.
  """

  features: int
  kernel_size: int
  stride: int = 1
  residual: bool = True
  upsample: bool = False
  aux_identity_add: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, aux: Optional[Array] = None) -> Array:
    k, c = self.kernel_size, self.features
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
