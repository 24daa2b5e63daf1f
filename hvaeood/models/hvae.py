"""The paper's hierarchical VAE (bottom-up inference, top-down generation) and its ladder variant.

Graph (SPEC 1.1-1.3), L stages, stage l holding an encoder Enc_l (residual blocks), one Gaussian latent z_l
and a decoder Dec_l (the encoder's blocks reversed, upsampling):

* inference ("bottom_up", the paper's HVAE): h_l = Enc_l(u_l), u_1 = x, u_l = Proj^q(z_{l-1});
  q(z_l | z_{l-1}) from a head on ReLU(h_l).
* inference ("ladder", top-down inference): h_l = Enc_l(h_{l-1}) is deterministic; q(z_l | x, z_{>l}) comes
  from a merge block on (h_l, aux = d_{l+1}) during the top-down pass.
* generation: z_L ~ N(0, I); d_l = Dec_l(Proj^p(z_l), skips = block outputs of Dec_{l+1});
  p(z_{l-1} | z_{>=l}) from a head on ReLU(d_l); p(x | z) = Likelihood(d_1).

One call evaluates R *replicas* of a batch: `n_skip` is an int vector [R], replica r computing the bound
L^{>n_skip[r]} (0 = the ELBO) with its own samples. Everything that does not depend on the samples (Enc_1 and
q(z_1|x) bottom-up; the whole deterministic encoder in the ladder) runs once on the B inputs and is shared by
all replicas; this is what makes all-k evaluation and importance sampling cheap.
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
from hvaeood.layers import ResBlock, WNConv, WNDense

Array = jax.Array


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


@dataclasses.dataclass(frozen=True)
class HVAESpec(StageShapes):
  """Hashable, validated model description built from `config.model` (see `spec_from_config`)."""
  image_shape: tuple[int, int, int]
  stages: tuple[StageSpec, ...]
  likelihood: str = "bernoulli"
  nr_mix: int = 10
  inference: str = "bottom_up"
  aux_identity_add: bool = False
  compute_dtype: str = "float32"

  @property
  def num_layers(self) -> int:
    return len(self.stages)


def spec_from_config(model_cfg: ml_collections.ConfigDict, image_shape: Sequence[int]) -> HVAESpec:
  """Builds and validates the model description.

  `model_cfg` fields: kernels [L], channels [L][n_blocks], strides [L][n_blocks], latent_types [L]
  ('conv'|'dense'), latent_dims [L], likelihood ('bernoulli'|'dlm'|'gaussian'), nr_mix, inference
  ('bottom_up'|'ladder'), aux_identity_add, compute_dtype.
  """
  n = len(model_cfg.kernels)
  fields = dict(channels=model_cfg.channels, strides=model_cfg.strides, latent_types=model_cfg.latent_types,
                latent_dims=model_cfg.latent_dims)
  for name, val in fields.items():
    if len(val) != n:
      raise ValueError(f"config.model.{name} has {len(val)} entries but config.model.kernels has {n}; "
                       "give one entry per stage.")
  stages = []
  for i in range(n):
    if len(model_cfg.channels[i]) != len(model_cfg.strides[i]):
      raise ValueError(f"Stage {i + 1}: channels {tuple(model_cfg.channels[i])} and strides "
                       f"{tuple(model_cfg.strides[i])} must have one entry per block.")
    if model_cfg.latent_types[i] not in ("conv", "dense"):
      raise ValueError(f"Stage {i + 1}: latent type {model_cfg.latent_types[i]!r} is not 'conv' or 'dense'.")
    stages.append(StageSpec(int(model_cfg.kernels[i]), tuple(int(c) for c in model_cfg.channels[i]),
                            tuple(int(s) for s in model_cfg.strides[i]), str(model_cfg.latent_types[i]),
                            int(model_cfg.latent_dims[i])))
  if model_cfg.likelihood not in D.LIKELIHOODS:
    raise ValueError(f"Unknown likelihood {model_cfg.likelihood!r}; choose one of {sorted(D.LIKELIHOODS)}.")
  if model_cfg.inference not in ("bottom_up", "ladder"):
    raise ValueError(f"Unknown inference {model_cfg.inference!r}; choose 'bottom_up' or 'ladder'.")
  spec = HVAESpec(tuple(int(s) for s in image_shape), tuple(stages), str(model_cfg.likelihood),
                  int(model_cfg.get("nr_mix", 10)), str(model_cfg.inference),
                  bool(model_cfg.get("aux_identity_add", False)), str(model_cfg.get("compute_dtype", "float32")))
  if spec.likelihood == "dlm" and spec.image_shape[-1] != 3:
    raise ValueError(f"The 'dlm' likelihood needs RGB images, but the data has shape {spec.image_shape}.")
  return spec


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


class _Stack(nn.Module):
  """A sequence of residual blocks (an encoder, decoder or merge) that also returns every block's output."""

  features: tuple[int, ...]
  kernel: int
  strides: tuple[int, ...]
  residual_first: bool
  upsample: bool
  aux_identity_add: bool
  dtype: Any

  @nn.compact
  def __call__(self, x: Array, aux: Optional[Sequence[Optional[Array]]] = None):
    outs = []
    for j, (c, s) in enumerate(zip(self.features, self.strides)):
      a = aux[j] if aux is not None else None
      x = ResBlock(c, self.kernel, s, residual=(j > 0 or self.residual_first), upsample=self.upsample,
                   aux_identity_add=self.aux_identity_add, dtype=self.dtype, name=f"block{j}")(x, a)
      outs.append(x)
    return x, outs


class _GaussianHead(nn.Module):
  """ReLU then a weight-normalised 3x3 conv (conv latent) or dense (dense latent) to (mu, raw scale)."""

  latent: str
  dim: int
  dtype: Any

  @nn.compact
  def __call__(self, h: Array) -> D.Gaussian:
    h = nn.relu(h)
    if self.latent == "conv":
      out = WNConv(2 * self.dim, 3, dtype=self.dtype, name="conv")(h)
    else:
      out = WNDense(2 * self.dim, dtype=self.dtype, name="dense")(h.reshape(h.shape[0], -1))
    out = out.astype(jnp.float32)
    mu, raw = jnp.split(out, 2, axis=-1)
    return D.Gaussian(mu, D.softplus_std(raw))


class _Projection(nn.Module):
  """AsFeatureMap: dense latent -> WN dense to C*H*W, reshaped; conv latent -> identity."""

  shape: tuple[int, int, int]
  latent: str
  dtype: Any

  @nn.compact
  def __call__(self, z: Array) -> Array:
    if self.latent == "conv":
      return z
    return WNDense(math.prod(self.shape), dtype=self.dtype, name="dense")(z).reshape((-1,) + self.shape)


def _replicas(spec, x: Array, n_skip: Any) -> tuple[int, int, Array]:
  """Checks x [B, H, W, C] against `spec.image_shape`; returns R, B and the skip count of each of the R*B rows
  (replica-major, like `_tile`) for `n_skip` (an int or an int vector [R])."""
  if tuple(x.shape[1:]) != spec.image_shape:
    raise ValueError(f"Input images have shape {tuple(x.shape[1:])} but the model was built for "
                     f"{spec.image_shape} (H, W, C); use a dataset of that shape or a matching config.")
  n_skip = jnp.atleast_1d(jnp.asarray(n_skip, jnp.int32))
  R, B = n_skip.shape[0], x.shape[0]
  return R, B, jnp.repeat(n_skip, B)


def _likelihood_output(likelihood: nn.Module, d: Array, x: Array, R: int, kl, kl_elem) -> Output:
  """p(x | z) from the bottom decoder state d [R*B, ...] for the R replicas of x [B, ...], packed as an `Output`."""
  B = x.shape[0]
  lik_params = likelihood(d)
  log_px = likelihood.log_prob(_tile(x, R), lik_params)
  return Output(log_px.reshape(R, B), tuple(kl), tuple(kl_elem), lik_params.reshape((R, B) + lik_params.shape[1:]))


def _tile(x: Array, r: int) -> Array:
  """[B, ...] -> [R*B, ...] with replica-major order."""
  return jnp.broadcast_to(x[None], (r,) + x.shape).reshape((r * x.shape[0],) + x.shape[1:])


def _row_mask(mask: Array, like: Array) -> Array:
  return mask.reshape(mask.shape + (1,) * (like.ndim - 1))


class HVAE(nn.Module):
  """Hierarchical VAE. `spec` is an `HVAESpec`; random draws come from the 'sample' RNG stream."""

  spec: HVAESpec

  def setup(self):
    sp = self.spec
    dt = jnp.dtype(sp.compute_dtype)
    enc_shapes = sp.encoder_output_shapes()
    ladder = sp.inference == "ladder"
    self.encoders = [
        _Stack(st.channels, st.kernel, st.strides, residual_first=(i > 0), upsample=False,
               aux_identity_add=sp.aux_identity_add, dtype=dt, name=f"enc{i + 1}")
        for i, st in enumerate(sp.stages)]
    self.q_heads = [_GaussianHead(st.latent, st.latent_dim, dt, name=f"q{i + 1}")
                    for i, st in enumerate(sp.stages)]
    # Bottom-up inference feeds Proj^q(z_l) to Enc_{l+1}; the top stage's q-projection would be unused.
    self.q_projs = [] if ladder else [_Projection(enc_shapes[i], st.latent, dt, name=f"q_proj{i + 1}")
                                      for i, st in enumerate(sp.stages[:-1])]
    self.p_projs = [_Projection(enc_shapes[i], st.latent, dt, name=f"p_proj{i + 1}")
                    for i, st in enumerate(sp.stages)]
    self.p_heads = [_GaussianHead(st.latent, st.latent_dim, dt, name=f"p{i + 1}")
                    for i, st in enumerate(sp.stages[:-1])]
    self.decoders = [
        _Stack(tuple(reversed(st.channels)), st.kernel, tuple(reversed(st.strides)), residual_first=False,
               upsample=True, aux_identity_add=sp.aux_identity_add, dtype=dt, name=f"dec{i + 1}")
        for i, st in enumerate(sp.stages)]
    # Ladder: q(z_l) for l < L from a stride-1 residual merge of (h_l, aux = d_{l+1}). A merge that dropped an
    # identically shaped aux would ignore the top-down path, so merges always add it.
    self.merges = [
        _Stack((st.channels[-1],), st.kernel, (1,), residual_first=True, upsample=False, aux_identity_add=True,
               dtype=dt, name=f"merge{i + 1}")
        for i, st in enumerate(sp.stages[:-1])] if ladder else []
    self.likelihood = D.LIKELIHOODS[sp.likelihood](sp.image_shape[-1], dtype=dt, name="likelihood",
                                                   **({"nr_mix": sp.nr_mix} if sp.likelihood == "dlm" else {}))

  def __call__(self, x: Array, n_skip: Any = 0, prior_sample: bool = False) -> Output:
    """Evaluates single-sample bounds.

    Args:
      x: images [B, H, W, C] in [0, 1] (binary for the Bernoulli likelihood).
      n_skip: int or int vector [R]; replica r replaces z_1..z_{n_skip[r]} by the conditional prior's mean
        (or a sample of it when `prior_sample`), uses the posterior means for them during inference, and
        drops their KL terms, giving L^{>n_skip[r]}. 0 gives the ELBO.
      prior_sample: the paper's variant (sample z_{<=k} from p) instead of the reference's prior mode.

    Returns:
      An `Output` with leading axes [R, B].
    """
    sp = self.spec
    L = sp.num_layers
    R, B, skip = _replicas(sp, x, n_skip)
    dt = jnp.dtype(sp.compute_dtype)

    # ---- inference (bottom-up pass)
    h, _ = self.encoders[0](x.astype(dt))
    if sp.inference == "ladder":
      hs = [h]
      for i in range(1, L):
        h, _ = self.encoders[i](h)
        hs.append(h)
      hs = [_tile(h, R) for h in hs]
      q_bu = [None] * (L - 1) + [self.q_heads[L - 1](hs[-1])]
      z_bu = [None] * L
    else:
      q1 = self.q_heads[0](h)
      q_bu = [D.Gaussian(_tile(q1.mu, R), _tile(q1.sigma, R))]
      h_prev = _tile(h, R) if sp.aux_identity_add else None
      z_bu = []
      for i in range(L):
        q = q_bu[i]
        zs = q.sample(self.make_rng("sample"))
        z_bu.append(jnp.where(_row_mask(skip > i, zs), q.mu, zs))  # layers <= k: posterior mean
        if i == L - 1:
          break
        u = self.q_projs[i](z_bu[i].astype(dt))
        aux = None if h_prev is None else [h_prev] * len(sp.stages[i + 1].strides)
        h, _ = self.encoders[i + 1](u, aux)
        h_prev = h
        q_bu.append(self.q_heads[i + 1](h))

    # ---- generation (top-down pass)
    kl, kl_elem = [None] * L, [None] * L
    d = skips = None  # the top stage sets d before any prior head reads it
    for i in reversed(range(L)):
      if i == L - 1:
        p = None
        q = q_bu[i]
        z = z_bu[i] if z_bu[i] is not None else q.sample(self.make_rng("sample"))
        p_lp = D.standard_normal_like(z).log_prob(z)
      else:
        p = self.p_heads[i](d)
        if sp.inference == "ladder":
          merged, _ = self.merges[i](hs[i], [d])
          q = self.q_heads[i](merged)
          z_post = q.sample(self.make_rng("sample"))
        else:
          q, z_post = q_bu[i], z_bu[i]
        z_prior = p.sample(self.make_rng("sample")) if prior_sample else p.mu
        skipped = _row_mask(skip > i, z_post)
        z = jnp.where(skipped, z_prior, z_post)
        p_lp = p.log_prob(z)
      elem = q.log_prob(z) - p_lp
      if i < L - 1:
        elem = jnp.where(skipped, 0.0, elem)
      kl_elem[i] = elem.reshape((R, B) + elem.shape[1:])
      kl[i] = jnp.sum(elem.reshape(R, B, -1), axis=-1)
      self.sow("intermediates", f"z{i + 1}", z)  # the z_l the generative pass uses (for tests; free otherwise)
      d, skips = self.decoders[i](self.p_projs[i](z.astype(dt)), skips)

    return _likelihood_output(self.likelihood, d, x, R, kl, kl_elem)

  def generate(self, num: int, temperature: float = 1.0) -> tuple[Array, Array]:
    """Ancestral samples from the prior: returns (mean images, sampled images), each [num, H, W, C]."""
    sp = self.spec
    dt = jnp.dtype(sp.compute_dtype)
    L = sp.num_layers
    z = temperature * jax.random.normal(self.make_rng("sample"), (num,) + sp.latent_shapes()[-1])
    d = skips = None
    for i in reversed(range(L)):
      if i < L - 1:
        p = self.p_heads[i](d)
        z = p.mu + temperature * p.sigma * jax.random.normal(self.make_rng("sample"), p.mu.shape)
      d, skips = self.decoders[i](self.p_projs[i](z.astype(dt)), skips)
    params = self.likelihood(d)
    return self.likelihood.mean(params), self.likelihood.sample(self.make_rng("sample"), params)

  def reconstruct(self, x: Array) -> Array:
    """Mean of p(x|z) at a posterior sample z ~ q(z|x): [B, H, W, C]."""
    out = self(x, 0)
    return self.likelihood.mean(out.lik_params[0])


def count_params(params) -> int:
  """Number of scalars in a parameter tree (v, g and b of every weight-normalised layer)."""
  return int(sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))
