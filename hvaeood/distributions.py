"""Log-densities, samplers and likelihood heads.

All log-probabilities are in nats and returned per element (Gaussian) or per example summed over pixels and
channels (likelihoods). Numerics follow the reference (docs/design.md §2): softplus with beta = ln 2 and a
1e-6 floor for standard deviations, log-scales of the logistic mixture clamped at -7, `where` branches
computed on safe inputs so that no NaN reaches the gradients.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from hvaeood.layers import ConvPolicy, WNConv

Array = jax.Array

SOFTPLUS_BETA = math.log(2.0)
MIN_STD = 1e-6
LOG_2PI = math.log(2.0 * math.pi)


def softplus_std(raw: Array, beta: float = SOFTPLUS_BETA, min_std: float = MIN_STD) -> Array:
  """sigma = softplus_beta(raw) = log(1 + exp(beta raw)) / beta, floored; raw = 0 gives sigma = 1."""
  return jnp.maximum(jax.nn.softplus(beta * raw) / beta, min_std)


class Gaussian(NamedTuple):
  """Diagonal Gaussian with mean `mu` and standard deviation `sigma` (same shape)."""
  mu: Array
  sigma: Array

  def log_prob(self, z: Array) -> Array:
    """Elementwise log-density."""
    return -0.5 * jnp.square((z - self.mu) / self.sigma) - jnp.log(self.sigma) - 0.5 * LOG_2PI

  def sample(self, key: Array) -> Array:
    """Reparameterised sample mu + sigma * eps."""
    return self.mu + self.sigma * jax.random.normal(key, self.mu.shape, self.mu.dtype)


def standard_normal_like(z: Array) -> Gaussian:
  return Gaussian(jnp.zeros_like(z), jnp.ones_like(z))


def gaussian_kl(q: Gaussian, p: Gaussian) -> Array:
  """Analytic elementwise KL(q || p) (used by tests and diagnostics; the bounds use the MC estimate)."""
  return (jnp.log(p.sigma / q.sigma) + (jnp.square(q.sigma) + jnp.square(q.mu - p.mu))
          / (2.0 * jnp.square(p.sigma)) - 0.5)


def _sum_per_example(x: Array) -> Array:
  return jnp.sum(x.reshape(x.shape[0], -1), axis=-1)


# ---------------------------------------------------------------------------------------------------------------
# Bernoulli


def bernoulli_log_prob(x: Array, logits: Array) -> Array:
  """sum over pixels of x*l - softplus(l), the stable form of x log s(l) + (1-x) log(1-s(l))."""
  return _sum_per_example(x * logits - jax.nn.softplus(logits))


# ---------------------------------------------------------------------------------------------------------------
# Discretised logistic mixture (PixelCNN++ form, 256 bins, RGB with autoregressive means over colours)

DLM_LOG_SCALE_MIN = -7.0


def dlm_num_params(nr_mix: int, channels: int = 3) -> int:
  if channels != 3:
    raise ValueError(f"The discretised logistic mixture is defined for RGB (3 channels), got {channels}.")
  return (3 * channels + 1) * nr_mix


def _dlm_unpack(params: Array, nr_mix: int):
  """Splits [..., (3*3+1)*nr_mix] into logits [..., M] and per-colour means, log-scales, coeffs [..., 3, M]."""
  logits = params[..., :nr_mix]
  rest = params[..., nr_mix:].reshape(params.shape[:-1] + (3, 3 * nr_mix))
  means = rest[..., :nr_mix]
  log_scales = jnp.maximum(rest[..., nr_mix:2 * nr_mix], DLM_LOG_SCALE_MIN)
  coeffs = jnp.tanh(rest[..., 2 * nr_mix:])
  return logits, means, log_scales, coeffs


def dlm_log_prob(x: Array, params: Array, nr_mix: int = 10, per_pixel: bool = False) -> Array:
  """Log-probability of images x in [0, 1] (NHWC, 3 channels) under the mixture.

  Args:
    x: [B, H, W, 3] in [0, 1].
    params: [B, H, W, 10 * nr_mix].
    nr_mix: number of mixture components.
    per_pixel: return [B, H, W] instead of the per-example sum.
  """
  x = 2.0 * x - 1.0
  logits, means, log_scales, coeffs = _dlm_unpack(params.astype(jnp.float32), nr_mix)
  xr = x[..., :, None]  # [..., 3, 1]
  m_r = means[..., 0, :]
  m_g = means[..., 1, :] + coeffs[..., 0, :] * xr[..., 0, :]
  m_b = means[..., 2, :] + coeffs[..., 1, :] * xr[..., 0, :] + coeffs[..., 2, :] * xr[..., 1, :]
  means = jnp.stack([m_r, m_g, m_b], axis=-2)
  centred = xr - means
  inv_s = jnp.exp(-log_scales)
  plus_in = inv_s * (centred + 1.0 / 255.0)
  min_in = inv_s * (centred - 1.0 / 255.0)
  cdf_plus = jax.nn.sigmoid(plus_in)
  cdf_min = jax.nn.sigmoid(min_in)
  log_cdf_plus = plus_in - jax.nn.softplus(plus_in)  # log sigma(a), for the x = 0 edge
  log_one_minus_cdf_min = -jax.nn.softplus(min_in)   # log (1 - sigma(b)), for the x = 255 edge
  cdf_delta = cdf_plus - cdf_min
  mid_in = inv_s * centred
  log_pdf_mid = mid_in - log_scales - 2.0 * jax.nn.softplus(mid_in)
  log_mid = jnp.where(cdf_delta > 1e-5, jnp.log(jnp.maximum(cdf_delta, 1e-12)), log_pdf_mid - math.log(127.5))
  log_probs = jnp.where(xr < -0.999, log_cdf_plus, jnp.where(xr > 0.999, log_one_minus_cdf_min, log_mid))
  log_probs = jnp.sum(log_probs, axis=-2) + jax.nn.log_softmax(logits, axis=-1)
  per_px = jax.nn.logsumexp(log_probs, axis=-1)
  return per_px if per_pixel else _sum_per_example(per_px)


def dlm_sample(key: Array, params: Array, nr_mix: int = 10) -> Array:
  """A sample in [0, 1] (Gumbel-max over components, logistic noise, colours clamped in sequence)."""
  logits, means, log_scales, coeffs = _dlm_unpack(params.astype(jnp.float32), nr_mix)
  k1, k2 = jax.random.split(key)
  gumbel = -jnp.log(-jnp.log(jax.random.uniform(k1, logits.shape, minval=1e-5, maxval=1.0 - 1e-5)))
  onehot = jax.nn.one_hot(jnp.argmax(logits + gumbel, axis=-1), nr_mix)[..., None, :]  # [..., 1, M]
  mu = jnp.sum(means * onehot, axis=-1)
  ls = jnp.sum(log_scales * onehot, axis=-1)
  co = jnp.sum(coeffs * onehot, axis=-1)
  u = jax.random.uniform(k2, mu.shape, minval=1e-5, maxval=1.0 - 1e-5)
  x = mu + jnp.exp(ls) * (jnp.log(u) - jnp.log1p(-u))
  r = jnp.clip(x[..., 0], -1.0, 1.0)
  g = jnp.clip(x[..., 1] + co[..., 0] * r, -1.0, 1.0)
  b = jnp.clip(x[..., 2] + co[..., 1] * r + co[..., 2] * g, -1.0, 1.0)
  return (jnp.stack([r, g, b], axis=-1) + 1.0) / 2.0


def dlm_mean(params: Array, nr_mix: int = 10) -> Array:
  """Mixture-weighted mean image in [0, 1], ignoring the autoregressive coupling noise (a plot summary)."""
  logits, means, _, coeffs = _dlm_unpack(params.astype(jnp.float32), nr_mix)
  w = jax.nn.softmax(logits, axis=-1)[..., None, :]
  mu = jnp.clip(jnp.sum(w * means, axis=-1), -1.0, 1.0)
  c = jnp.sum(w * coeffs, axis=-1)
  r = mu[..., 0]
  g = jnp.clip(mu[..., 1] + c[..., 0] * r, -1.0, 1.0)
  b = jnp.clip(mu[..., 2] + c[..., 1] * r + c[..., 2] * g, -1.0, 1.0)
  return (jnp.stack([r, g, b], axis=-1) + 1.0) / 2.0


# ---------------------------------------------------------------------------------------------------------------
# Likelihood heads: map the decoder's output d_1 to the parameters of p(x|z).


class Likelihood(nn.Module):
  """Output distribution p(x|z). Subclasses define the head and the static maths.

  `__call__(d)` gives parameters; `log_prob(x, params)` per-example nats; `mean(params)` an image in [0,1];
  `sample(key, params)` a sample in the data space.
  """

  channels: int
  dtype: Any = jnp.float32
  conv: ConvPolicy = ConvPolicy()

  def head_conv(self, features: int, kernel: int) -> WNConv:
    return WNConv(features, kernel, dtype=self.dtype, fast=self.conv.fast, chunk_bytes=self.conv.chunk_bytes,
                  onednn=self.conv.onednn, name="conv")


class BernoulliLikelihood(Likelihood):
  """ReLU then a weight-normalised 3x3 conv to one logit per channel. Data must be in {0, 1}."""

  @nn.compact
  def __call__(self, d: Array) -> Array:
    return self.head_conv(self.channels, 3)(nn.relu(d)).astype(jnp.float32)

  def log_prob(self, x: Array, params: Array) -> Array:
    return bernoulli_log_prob(x, params)

  def mean(self, params: Array) -> Array:
    return jax.nn.sigmoid(params)

  def sample(self, key: Array, params: Array) -> Array:
    return jax.random.bernoulli(key, jax.nn.sigmoid(params)).astype(jnp.float32)


class DiscretizedLogisticMixLikelihood(Likelihood):
  """A weight-normalised 1x1 conv (no activation before it: docs/design.md §2) to (3*3+1)*nr_mix channels."""

  nr_mix: int = 10

  @nn.compact
  def __call__(self, d: Array) -> Array:
    return self.head_conv(dlm_num_params(self.nr_mix, self.channels), 1)(d).astype(jnp.float32)

  def log_prob(self, x: Array, params: Array) -> Array:
    return dlm_log_prob(x, params, self.nr_mix)

  def mean(self, params: Array) -> Array:
    return dlm_mean(params, self.nr_mix)

  def sample(self, key: Array, params: Array) -> Array:
    return dlm_sample(key, params, self.nr_mix)


class GaussianLikelihood(Likelihood):
  """ReLU then a weight-normalised 3x3 conv to a mean and a softplus scale per channel (continuous data)."""

  @nn.compact
  def __call__(self, d: Array) -> Array:
    return self.head_conv(2 * self.channels, 3)(nn.relu(d)).astype(jnp.float32)

  def _dist(self, params: Array) -> Gaussian:
    mu, raw = jnp.split(params, 2, axis=-1)
    return Gaussian(mu, softplus_std(raw))

  def log_prob(self, x: Array, params: Array) -> Array:
    return _sum_per_example(self._dist(params).log_prob(x))

  def mean(self, params: Array) -> Array:
    return jnp.clip(self._dist(params).mu, 0.0, 1.0)

  def sample(self, key: Array, params: Array) -> Array:
    return self._dist(params).sample(key)


LIKELIHOODS = {
    "bernoulli": BernoulliLikelihood,
    "dlm": DiscretizedLogisticMixLikelihood,
    "gaussian": GaussianLikelihood,
}
