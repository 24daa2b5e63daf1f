"""The paper's hierarchical VAE (bottom-up inference, top-down generation) and its ladder variant.

Graph (docs/design.md §2), L stages, stage l holding an encoder Enc_l (residual blocks), one Gaussian latent z_l
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
from hvaeood.layers import ConvPolicy
from hvaeood.models.blocks import (GaussianHead, Output, Projection, Stack, StageShapes, StageSpec,
                                   build_likelihood, field_error, likelihood_output, parse_model_fields,
                                   replica_rows, row_mask, tile)

Array = jax.Array

INFERENCES = ("bottom_up", "ladder")


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
  conv: ConvPolicy = ConvPolicy()

  @property
  def num_layers(self) -> int:
    return len(self.stages)


def spec_from_config(model_cfg: ml_collections.ConfigDict, image_shape: Sequence[int]) -> HVAESpec:
  """Builds and validates the model description (`blocks.parse_model_fields`, plus `inference`:
  'bottom_up'|'ladder')."""
  f = parse_model_fields(model_cfg, image_shape)
  inference = str(model_cfg.get("inference", "bottom_up"))
  if inference not in INFERENCES:
    raise field_error("inference", f"unknown inference {inference!r}", f"choose one of {INFERENCES}")
  return HVAESpec(f.image_shape, f.stages, f.likelihood, f.nr_mix, inference, f.aux_identity_add,
                  f.compute_dtype, f.conv)


class HVAE(nn.Module):
  """Hierarchical VAE. `spec` is an `HVAESpec`; random draws come from the 'sample' RNG stream."""

  spec: HVAESpec

  def setup(self):
    sp = self.spec
    dt = jnp.dtype(sp.compute_dtype)
    enc_shapes = sp.encoder_output_shapes()
    ladder = sp.inference == "ladder"
    self.encoders = [
        Stack(st.channels, st.kernel, st.strides, residual_first=(i > 0), upsample=False,
              aux_identity_add=sp.aux_identity_add, dtype=dt, conv=sp.conv, name=f"enc{i + 1}")
        for i, st in enumerate(sp.stages)]
    self.q_heads = [GaussianHead(st.latent, st.latent_dim, dt, conv=sp.conv, name=f"q{i + 1}")
                    for i, st in enumerate(sp.stages)]
    # Bottom-up inference feeds Proj^q(z_l) to Enc_{l+1}; the top stage's q-projection would be unused.
    self.q_projs = [] if ladder else [Projection(enc_shapes[i], st.latent, dt, name=f"q_proj{i + 1}")
                                      for i, st in enumerate(sp.stages[:-1])]
    self.p_projs = [Projection(enc_shapes[i], st.latent, dt, name=f"p_proj{i + 1}")
                    for i, st in enumerate(sp.stages)]
    self.p_heads = [GaussianHead(st.latent, st.latent_dim, dt, conv=sp.conv, name=f"p{i + 1}")
                    for i, st in enumerate(sp.stages[:-1])]
    self.decoders = [
        Stack(tuple(reversed(st.channels)), st.kernel, tuple(reversed(st.strides)), residual_first=False,
              upsample=True, aux_identity_add=sp.aux_identity_add, dtype=dt, conv=sp.conv, name=f"dec{i + 1}")
        for i, st in enumerate(sp.stages)]
    # Ladder: q(z_l) for l < L from a stride-1 residual merge of (h_l, aux = d_{l+1}). A merge that dropped an
    # identically shaped aux would ignore the top-down path, so merges always add it.
    self.merges = [
        Stack((st.channels[-1],), st.kernel, (1,), residual_first=True, upsample=False, aux_identity_add=True,
              dtype=dt, conv=sp.conv, name=f"merge{i + 1}")
        for i, st in enumerate(sp.stages[:-1])] if ladder else []
    self.likelihood = build_likelihood(sp)

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
    R, B, skip = replica_rows(self.spec, x, n_skip)
    h, _ = self.encoders[0](x.astype(jnp.dtype(self.spec.compute_dtype)))
    if self.spec.inference == "ladder":
      hs, q_bu, z_bu = self._ladder_encoder(h, R), None, None
    else:
      hs, (q_bu, z_bu) = None, self._bottom_up_inference(h, R, skip)
    d, kl, kl_elem = self._top_down(R, B, skip, prior_sample, q_bu, z_bu, hs)
    return likelihood_output(self.likelihood, d, x, R, kl, kl_elem)

  def _ladder_encoder(self, h: Array, R: int) -> list[Array]:
    """Ladder: the deterministic encoder's outputs h_1..h_L, tiled to the R replicas."""
    hs = [h]
    for i in range(1, self.spec.num_layers):
      h, _ = self.encoders[i](h)
      hs.append(h)
    return [tile(h, R) for h in hs]

  def _bottom_up_inference(self, h: Array, R: int, skip: Array) -> tuple[list[D.Gaussian], list[Array]]:
    """q(z_l | z_{l-1}) and its draws z_l, l = 1..L; layers <= k feed their posterior mean upwards."""
    sp = self.spec
    dt = jnp.dtype(sp.compute_dtype)
    q1 = self.q_heads[0](h)  # depends on x only: computed once, shared by the replicas
    q_bu = [D.Gaussian(tile(q1.mu, R), tile(q1.sigma, R))]
    h_prev = tile(h, R) if sp.aux_identity_add else None
    z_bu = []
    for i in range(sp.num_layers):
      q = q_bu[i]
      zs = q.sample(self.make_rng("sample"))
      z_bu.append(jnp.where(row_mask(skip > i, zs), q.mu, zs))  # layers <= k: posterior mean
      if i == sp.num_layers - 1:
        break
      u = self.q_projs[i](z_bu[i].astype(dt))
      aux = None if h_prev is None else [h_prev] * len(sp.stages[i + 1].strides)
      h, _ = self.encoders[i + 1](u, aux)
      h_prev = h
      q_bu.append(self.q_heads[i + 1](h))
    return q_bu, z_bu

  def _top_down(self, R: int, B: int, skip: Array, prior_sample: bool, q_bu, z_bu, hs):
    """The generative pass: z_l from q (its KL term against p(z_l | z_{l+1}), N(0, I) on top) or, for l <= k, from
    the conditional prior; returns the bottom decoder state d_1 and the KL terms."""
    sp = self.spec
    L = sp.num_layers
    kl, kl_elem = [None] * L, [None] * L
    d = skips = None  # the top stage sets d before any prior head reads it
    for i in reversed(range(L)):
      if i == L - 1:
        q = self.q_heads[i](hs[-1]) if hs is not None else q_bu[i]
        z = z_bu[i] if z_bu is not None else q.sample(self.make_rng("sample"))
        elem = q.log_prob(z) - D.standard_normal_like(z).log_prob(z)
      else:
        p = self.p_heads[i](d)
        if hs is not None:  # ladder: q(z_l | x, z_{>l}) from the merge of h_l and the top-down state
          merged, _ = self.merges[i](hs[i], [d])
          q = self.q_heads[i](merged)
          z_post = q.sample(self.make_rng("sample"))
        else:
          q, z_post = q_bu[i], z_bu[i]
        z_prior = p.sample(self.make_rng("sample")) if prior_sample else p.mu
        skipped = row_mask(skip > i, z_post)
        z = jnp.where(skipped, z_prior, z_post)
        elem = jnp.where(skipped, 0.0, q.log_prob(z) - p.log_prob(z))
      kl_elem[i] = elem.reshape((R, B) + elem.shape[1:])
      kl[i] = jnp.sum(elem.reshape(R, B, -1), axis=-1)
      self.sow("intermediates", f"z{i + 1}", z)  # the z_l the generative pass uses (for tests; free otherwise)
      d, skips = self.decoders[i](self.p_projs[i](z.astype(jnp.dtype(sp.compute_dtype))), skips)
    return d, kl, kl_elem

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
