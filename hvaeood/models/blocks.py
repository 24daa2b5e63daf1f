"""Building blocks shared by the HVAE and BIVA: stage descriptions, the per-replica `Output`, residual stacks,
Gaussian heads, latent projections, replica helpers and the one validator of `config.model`'s stage fields.

`hvae.py` and `biva.py` build their graphs from these; `bounds.py` reads `Output`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from hvaeood import distributions as D
from hvaeood.layers import CONV_IMPLS, ConvPolicy, ResBlock, WNConv, WNDense

Array = jax.Array

COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """One stage: its encoder blocks and its latent."""
  kernel: int
  channels: tuple[int, ...]
  strides: tuple[int, ...]
  latent: str  # 'conv' or 'dense'
  latent_dim: int


class StageShapes:
  """Shapes that follow from `image_shape` and `stages` (shared by the HVAE's and BIVA's specs)."""

  def encoder_output_shapes(self) -> tuple[tuple[int, int, int], ...]:
    """(H, W, C) of h_l (the encoders' outputs) for every stage, given SAME convs (ceil division by each stride)."""
    h, w, _ = self.image_shape
    shapes = []
    for st in self.stages:
      for s in st.strides:
        h, w = -(-h // s), -(-w // s)
      shapes.append((h, w, st.channels[-1]))
    return tuple(shapes)

  def latent_shapes(self) -> tuple[tuple[int, ...], ...]:
    """Per-example shape of each z_l: (H, W, c) for a conv latent (at h_l's resolution), (c,) for dense."""
    return tuple((hs[0], hs[1], st.latent_dim) if st.latent == "conv" else (st.latent_dim,)
                 for hs, st in zip(self.encoder_output_shapes(), self.stages))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Output:
  """What one forward pass returns; leading axes [R, B] (replicas, batch).

  log_px: log p(x | z) per example.
  kl: per layer, the single-sample MC KL summed over the latent's elements (0 for layers <= n_skip).
  kl_elem: per layer, the elementwise MC KL [R, B, *latent_shape] (for free nats; 0 where skipped).
  lik_params: parameters of p(x|z), [R, B, H, W, P].
  """
  log_px: Array
  kl: tuple[Array, ...]
  kl_elem: tuple[Array, ...]
  lik_params: Array

  @property
  def elbo(self) -> Array:
    """log p(x|z) - sum_l KL_l: the single-sample L^{>k} of each replica."""
    return self.log_px - sum(self.kl)


class Stack(nn.Module):
  """A sequence of residual blocks (an encoder, decoder or merge) that also returns every block's output."""

  features: tuple[int, ...]
  kernel: int
  strides: tuple[int, ...]
  residual_first: bool
  upsample: bool
  aux_identity_add: bool
  dtype: Any
  conv: ConvPolicy = ConvPolicy()

  @nn.compact
  def __call__(self, x: Array, aux: Optional[Sequence[Optional[Array]]] = None):
    outs = []
    for j, (c, s) in enumerate(zip(self.features, self.strides)):
      a = aux[j] if aux is not None else None
      x = ResBlock(c, self.kernel, s, residual=(j > 0 or self.residual_first), upsample=self.upsample,
                   aux_identity_add=self.aux_identity_add, dtype=self.dtype, conv=self.conv,
                   name=f"block{j}")(x, a)
      outs.append(x)
    return x, outs


class GaussianHead(nn.Module):
  """ReLU then a weight-normalised 3x3 conv (conv latent) or dense (dense latent) to (mu, raw scale)."""

  latent: str
  dim: int
  dtype: Any
  conv: ConvPolicy = ConvPolicy()

  @nn.compact
  def __call__(self, h: Array) -> D.Gaussian:
    h = nn.relu(h)
    if self.latent == "conv":
      out = WNConv(2 * self.dim, 3, dtype=self.dtype, fast=self.conv.fast, chunk_bytes=self.conv.chunk_bytes,
                   onednn=self.conv.onednn, name="conv")(h)
    else:
      out = WNDense(2 * self.dim, dtype=self.dtype, name="dense")(h.reshape(h.shape[0], -1))
    out = out.astype(jnp.float32)
    mu, raw = jnp.split(out, 2, axis=-1)
    return D.Gaussian(mu, D.softplus_std(raw))


class Projection(nn.Module):
  """AsFeatureMap: dense latent -> WN dense to C*H*W, reshaped; conv latent -> identity."""

  shape: tuple[int, int, int]
  latent: str
  dtype: Any

  @nn.compact
  def __call__(self, z: Array) -> Array:
    if self.latent == "conv":
      return z
    return WNDense(math.prod(self.shape), dtype=self.dtype, name="dense")(z).reshape((-1,) + self.shape)


def replica_rows(spec, x: Array, n_skip: Any) -> tuple[int, int, Array]:
  """Checks x [B, H, W, C] against `spec.image_shape`; returns R, B and the skip count of each of the R*B rows
  (replica-major, like `_tile`) for `n_skip` (an int or an int vector [R])."""
  if tuple(x.shape[1:]) != spec.image_shape:
    raise ValueError(f"Input images have shape {tuple(x.shape[1:])} but the model was built for "
                     f"{spec.image_shape} (H, W, C); use a dataset of that shape or a matching config.")
  n_skip = jnp.atleast_1d(jnp.asarray(n_skip, jnp.int32))
  R, B = n_skip.shape[0], x.shape[0]
  return R, B, jnp.repeat(n_skip, B)


def likelihood_output(likelihood: nn.Module, d: Array, x: Array, R: int, kl, kl_elem) -> Output:
  """p(x | z) from the bottom decoder state d [R*B, ...] for the R replicas of x [B, ...], packed as an `Output`."""
  B = x.shape[0]
  lik_params = likelihood(d)
  log_px = likelihood.log_prob(tile(x, R), lik_params)
  return Output(log_px.reshape(R, B), tuple(kl), tuple(kl_elem), lik_params.reshape((R, B) + lik_params.shape[1:]))


def tile(x: Array, r: int) -> Array:
  """[B, ...] -> [R*B, ...] with replica-major order."""
  return jnp.broadcast_to(x[None], (r,) + x.shape).reshape((r * x.shape[0],) + x.shape[1:])


def row_mask(mask: Array, like: Array) -> Array:
  return mask.reshape(mask.shape + (1,) * (like.ndim - 1))



# ---------------------------------------------------------------------------------------------------------------
# Validation of config.model (one validator for every model)


def field_error(field: str, problem: str, fix: str) -> ValueError:
  return ValueError(f"config.model.{field}: {problem}. Fix: {fix}.")


@dataclasses.dataclass(frozen=True)
class ModelFields:
  """The validated fields every model shares (see `parse_model_fields`)."""
  image_shape: tuple[int, int, int]
  stages: tuple[StageSpec, ...]
  likelihood: str
  nr_mix: int
  aux_identity_add: bool
  compute_dtype: str
  conv: ConvPolicy


# config.model fields that choose how the model runs, not what it computes: a checkpoint may be resumed or
# evaluated with other values (e.g. on another backend).
EXECUTION_FIELDS = ("conv_impl", "conv_chunk_bytes")


def parse_model_fields(model_cfg: ml_collections.ConfigDict, image_shape: Sequence[int], *, min_stages: int = 1,
                       why_min: str = "") -> ModelFields:
  """Validates the stage fields and the likelihood of `config.model` for images of shape (H, W, C).

  Fields: kernels [L], channels [L][blocks], strides [L][blocks], latent_types [L] ('conv'|'dense'),
  latent_dims [L], likelihood ('bernoulli'|'dlm'|'gaussian'), nr_mix, aux_identity_add, compute_dtype
  ('float32'|'bfloat16'), conv_impl ('auto'|'onednn'|'fast'|'plain', `layers.ConvPolicy`), conv_chunk_bytes.

  Raises:
    ValueError: naming the offending field and how to fix it.
  """
  image_shape = tuple(int(s) for s in image_shape)
  stages = _parse_stages(model_cfg, image_shape, min_stages, why_min)
  if model_cfg.likelihood not in D.LIKELIHOODS:
    raise field_error("likelihood", f"unknown likelihood {model_cfg.likelihood!r}",
                      f"choose one of {sorted(D.LIKELIHOODS)}")
  if model_cfg.likelihood == "dlm" and image_shape[-1] != 3:
    raise field_error("likelihood", f"'dlm' needs RGB images but the data has shape {image_shape}",
                      "use an RGB dataset, or 'bernoulli' for binarised grayscale data")
  dtype = str(model_cfg.get("compute_dtype", "float32"))
  if dtype not in COMPUTE_DTYPES:
    raise field_error("compute_dtype", f"{dtype!r} is not supported", f"choose one of {COMPUTE_DTYPES}")
  impl = str(model_cfg.get("conv_impl", "auto"))
  if impl not in CONV_IMPLS:
    raise field_error("conv_impl", f"{impl!r} is not a convolution implementation",
                      "choose 'auto' (the CPU rewrites on CPU only, on oneDNN where usable), 'onednn', 'fast' or 'plain'")
  chunk = model_cfg.get("conv_chunk_bytes", None)
  conv = ConvPolicy.from_name(impl, None if chunk is None else int(chunk))
  return ModelFields(image_shape, stages, str(model_cfg.likelihood), int(model_cfg.get("nr_mix", 10)),
                     bool(model_cfg.get("aux_identity_add", False)), dtype, conv)


def _parse_stages(model_cfg, image_shape, min_stages: int, why_min: str) -> tuple[StageSpec, ...]:
  """The validated StageSpec of every stage; strides must keep dividing the feature map."""
  n = len(model_cfg.kernels)
  if n < min_stages:
    raise field_error("kernels", f"{n} stage(s) given but the model needs at least {min_stages}{why_min}",
                      "give one entry per stage in kernels, channels, strides, latent_types and latent_dims, at "
                      f"least {min_stages} stage(s)")
  for name in ("channels", "strides", "latent_types", "latent_dims"):
    if len(model_cfg[name]) != n:
      raise field_error(name, f"{len(model_cfg[name])} entries but config.model.kernels has {n}",
                        "give one entry per stage")
  h, w = image_shape[0], image_shape[1]
  stages = []
  for i in range(n):
    stage = f"stage {i + 1}"
    chans, strides = tuple(model_cfg.channels[i]), tuple(model_cfg.strides[i])
    if not chans or len(chans) != len(strides):
      raise field_error(f"channels[{i}]", f"{stage} has channels {chans} and strides {strides}",
                        "give one channel count and one stride per residual block (at least one block)")
    if int(model_cfg.kernels[i]) < 1 or any(int(c) < 1 for c in chans):
      raise field_error(f"kernels[{i}] / channels[{i}]", f"{stage} has kernel {model_cfg.kernels[i]} and channels "
                        f"{chans}", "use positive kernel sizes and channel counts")
    for s in strides:
      if int(s) < 1:
        raise field_error(f"strides[{i}]", f"{stage} has stride {s}", "use strides >= 1")
      if h % int(s) or w % int(s):
        raise field_error(f"strides[{i}]", f"{stage} strides a {h}x{w} feature map by {s}, which does not divide "
                          "it, so the decoder's transposed convs could not restore the size",
                          "choose strides whose running product divides the image height and width")
      h, w = h // int(s), w // int(s)
    if model_cfg.latent_types[i] not in ("conv", "dense"):
      raise field_error(f"latent_types[{i}]", f"{model_cfg.latent_types[i]!r} is not 'conv' or 'dense'",
                        "use 'conv' (a latent feature map) or 'dense' (a latent vector)")
    if int(model_cfg.latent_dims[i]) < 1:
      raise field_error(f"latent_dims[{i}]", f"{stage} has latent dimension {model_cfg.latent_dims[i]}",
                        "use a positive latent dimension")
    stages.append(StageSpec(int(model_cfg.kernels[i]), tuple(int(c) for c in chans), tuple(int(s) for s in strides),
                            str(model_cfg.latent_types[i]), int(model_cfg.latent_dims[i])))
  return tuple(stages)


def build_likelihood(spec) -> nn.Module:
  """The likelihood head of a model spec (named 'likelihood' in the parameter tree)."""
  return D.LIKELIHOODS[spec.likelihood](spec.image_shape[-1], dtype=jnp.dtype(spec.compute_dtype), conv=spec.conv,
                                        name="likelihood",
                                        **({"nr_mix": spec.nr_mix} if spec.likelihood == "dlm" else {}))
