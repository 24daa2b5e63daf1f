"""BIVA, the bidirectional-inference hierarchical VAE (Maaløe et al. 2019) as ported to the paper's code.

Graph, L stages; stage l < L holds two Gaussian latents z_l = (z_l^TD, z_l^BU), the top stage one latent z_L:

* inference, bottom-up (BU) path: h^BU_l = Enc^BU_l(u_l), u_1 = x, u_l = Proj^BU(z^BU_{l-1});
  q(z^BU_l | .) from a head on ReLU(h^BU_l); z^BU_l is drawn during inference and feeds the next stage.
* inference, top-down (TD) path: h^TD_l = Enc^TD_l(h^TD_{l-1}, aux = h^BU_l), h^TD_0 = x (deterministic given
  the BU samples).
* top stage: merge = stride-1 residual block on concat(h^BU_L, h^TD_L) (2C channels -> C); q(z_L | .) from it;
  p(z_L) = N(0, I).
* generation: d_L = Dec_L(Proj(z_L)); for l = L-1..1: priors p(z^TD_l | d_{l+1}) and p(z^BU_l | d_{l+1}) from
  heads on ReLU(d_{l+1}); q(z^TD_l | x, z_{>l}) from a head on merge_l(h^TD_l, aux = d_{l+1}) (as the LVAE);
  d_l = Dec_l(Proj(concat(z^TD_l, z^BU_l)), skips = block outputs of Dec_{l+1}); p(x | z) = Likelihood(d_1).
* KL: the single-sample MC estimate log q - log p for both latents of every intermediate stage and for z_L.

Choices against the reference port and why:

* Top merge: the reference's residual *truncates* the 2C concatenated channels to the first C (the BU half);
  this keeps that truncation (the `ResBlock` residual does it), so the TD half enters through the block's convs.
* The TD encoders' aux (h^BU_l) and the merges' aux (d_{l+1}) are always added, also when shapes match. The
  reference's ResBlock drops an identically shaped aux (docs/design.md §7), which would leave the TD path of every
  stride-1 stage blind to the BU path and make q(z^TD) ignore the generative state entirely; the HVAE's ladder merges
  make the same choice. Decoder skips follow `aux_identity_add` like the HVAE (default: dropped when shaped
  like conv1's output, as the reference).
* Decoders use the encoder's blocks reversed (biva-pytorch; the port's non-reversed intermediate decoder is a
  known bug of the port). There is no inference skip into the BU path (the port's inverted flag turns it off), no
  conditional-BU prior (broken in the port), ReLU everywhere, no gating, no dropout.

L^{>k} counts *stages*: replica r with n_skip[r] = k uses the posterior means of z^BU_1..z^BU_k on the BU
inference path, takes both latents of stages 1..k from the conditional priors' means (or a sample of them when
`prior_sample`), and drops their KL terms. k = 0 is the ELBO; k <= L-1 (z_L is never skipped).

Output: the HVAE's `Output`. `kl` has one entry per stage (the sum of its two latents' KLs); `kl_elem` has one
entry per latent *variable*, 2L-1 of them, ordered (TD_1, BU_1, TD_2, BU_2, ..., z_L): the free-nats floor
(`bounds.free_nats_kl`) then applies lambda per latent variable, as in the reference port and biva-pytorch.

Sample-independent work (Enc^BU_1, q(z^BU_1 | x), Enc^TD_1) runs once on the B inputs and is shared by the R
replicas.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from hvaeood import distributions as D
from hvaeood.layers import ConvPolicy
from hvaeood.models.blocks import (GaussianHead, Output, Projection, Stack, StageShapes, StageSpec,
                                   build_likelihood, likelihood_output, parse_model_fields, replica_rows,
                                   row_mask, tile)

Array = jax.Array

@dataclasses.dataclass(frozen=True)
class BIVASpec(StageShapes):
  """Hashable, validated BIVA description built from `config.model` (see `biva_spec_from_config`).

  Every stage uses its `StageSpec` for both inference paths (Enc^BU_l and Enc^TD_l have the same blocks) and for
  its decoder (the blocks reversed); `latent`/`latent_dim` describe each of z^TD_l and z^BU_l (and z_L).
  """
  image_shape: tuple[int, int, int]
  stages: tuple[StageSpec, ...]
  likelihood: str = "dlm"
  nr_mix: int = 10
  aux_identity_add: bool = False
  compute_dtype: str = "float32"
  conv: ConvPolicy = ConvPolicy()

  @property
  def num_layers(self) -> int:
    """Number of stages (the k of L^{>k} counts stages)."""
    return len(self.stages)

  @property
  def num_latent_variables(self) -> int:
    """2L - 1: a TD and a BU latent per intermediate stage, one at the top."""
    return 2 * len(self.stages) - 1


def biva_spec_from_config(model_cfg: ml_collections.ConfigDict, image_shape: Sequence[int]) -> BIVASpec:
  """Builds and validates the BIVA description (`blocks.parse_model_fields`; at least two stages, `inference`
  is ignored: BIVA has its own).

  Raises:
    ValueError: naming the offending field and how to fix it.
  """
  f = parse_model_fields(model_cfg, image_shape, min_stages=2,
                         why_min=" (intermediate stages with a TD and a BU latent, and the top stage)")
  return BIVASpec(f.image_shape, f.stages, f.likelihood, f.nr_mix, f.aux_identity_add, f.compute_dtype, f.conv)


def _fit(aux: Optional[Sequence[Array]], n: int) -> list[Optional[Array]]:
  """Decoder skips for a stack of n blocks: block j gets the block-j output of the stage above, if it has one."""
  aux = list(aux or [])
  return [aux[j] if j < len(aux) else None for j in range(n)]


class BIVA(nn.Module):
  """BIVA. `spec` is a `BIVASpec`; random draws come from the 'sample' RNG stream.

  Same interface as `HVAE`: `__call__(x, n_skip, prior_sample) -> Output` ([R, B] fields), `generate`,
  `reconstruct`; `spec.num_layers` is the number of stages.
  """

  spec: BIVASpec

  def setup(self):
    sp = self.spec
    dt = jnp.dtype(sp.compute_dtype)
    L = sp.num_layers
    enc_shapes = sp.encoder_output_shapes()

    def encoders(prefix: str, aux_add: bool):
      return [Stack(st.channels, st.kernel, st.strides, residual_first=(i > 0), upsample=False,
                    aux_identity_add=aux_add, dtype=dt, conv=sp.conv, name=f"{prefix}{i + 1}")
              for i, st in enumerate(sp.stages)]

    def heads(prefix: str, stages):
      return [GaussianHead(st.latent, st.latent_dim, dt, conv=sp.conv, name=f"{prefix}{i + 1}")
              for i, st in enumerate(stages)]

    inner = sp.stages[:-1]
    top = sp.stages[-1]
    self.bu_encoders = encoders("bu_enc", False)  # no aux
    self.td_encoders = encoders("td_enc", True)   # aux = h^BU_l, always added
    self.q_bu = heads("q_bu", inner)
    self.bu_projs = [Projection(enc_shapes[i], st.latent, dt, name=f"bu_proj{i + 1}") for i, st in enumerate(inner)]
    self.top_merge = Stack((top.channels[-1],), top.kernel, (1,), residual_first=True, upsample=False,
                            aux_identity_add=True, dtype=dt, conv=sp.conv, name="top_merge")
    self.q_top = GaussianHead(top.latent, top.latent_dim, dt, conv=sp.conv, name=f"q{L}")
    self.merges = [Stack((st.channels[-1],), st.kernel, (1,), residual_first=True, upsample=False,
                         aux_identity_add=True, dtype=dt, conv=sp.conv, name=f"merge{i + 1}")
                   for i, st in enumerate(inner)]
    self.q_td = heads("q_td", inner)
    self.p_td = heads("p_td", inner)
    self.p_bu = heads("p_bu", inner)
    self.z_projs = [Projection(enc_shapes[i], st.latent, dt, name=f"z_proj{i + 1}")
                    for i, st in enumerate(sp.stages)]
    self.decoders = [
        Stack(tuple(reversed(st.channels)), st.kernel, tuple(reversed(st.strides)), residual_first=False,
               upsample=True, aux_identity_add=sp.aux_identity_add, dtype=dt, conv=sp.conv, name=f"dec{i + 1}")
        for i, st in enumerate(sp.stages)]
    self.likelihood = build_likelihood(sp)

  def _decode(self, i: int, z: Array, skips) -> tuple[Array, list[Array]]:
    dt = jnp.dtype(self.spec.compute_dtype)
    return self.decoders[i](self.z_projs[i](z.astype(dt)), _fit(skips, len(self.spec.stages[i].strides)))

  def __call__(self, x: Array, n_skip: Any = 0, prior_sample: bool = False) -> Output:
    """Evaluates single-sample bounds.

    Args:
      x: images [B, H, W, C] in [0, 1].
      n_skip: int or int vector [R]; replica r computes L^{>n_skip[r]} (stages 1..n_skip[r] from the
        conditional priors, posterior means on the BU inference path, no KL). 0 gives the ELBO.
      prior_sample: sample the skipped stages from the conditional priors (the paper) instead of taking their
        means (the reference).

    Returns:
      An `Output` with leading axes [R, B]; `kl` per stage, `kl_elem` per latent variable (2L-1 entries).
    """
    R, B, skip = replica_rows(self.spec, x, n_skip)
    q_bu, z_bu, hs_td, q_top = self._inference(x, R, skip)
    d, kl, kl_elem = self._generation(R, B, skip, prior_sample, q_bu, z_bu, hs_td, q_top)
    return likelihood_output(self.likelihood, d, x, R, kl, kl_elem)

  def _inference(self, x: Array, R: int, skip: Array):
    """Both inference paths: q(z^BU_l) and its draws (posterior means for stages <= k), the TD features h^TD_l,
    and q(z_L) from the top merge. Stage 1 depends on x only: computed once, shared by the replicas."""
    sp = self.spec
    L = sp.num_layers
    dt = jnp.dtype(sp.compute_dtype)
    blocks = [len(st.strides) for st in sp.stages]
    xd = x.astype(dt)
    h_bu, _ = self.bu_encoders[0](xd)
    h_td, _ = self.td_encoders[0](xd, [h_bu] * blocks[0])
    q1 = self.q_bu[0](h_bu)
    q_bu = [D.Gaussian(tile(q1.mu, R), tile(q1.sigma, R))]
    hs_td = [tile(h_td, R)]
    z_bu = []
    for i in range(L - 1):
      q = q_bu[i]
      zs = q.sample(self.make_rng("sample"))
      z_bu.append(jnp.where(row_mask(skip > i, zs), q.mu, zs))  # stages <= k: posterior mean
      h_bu, _ = self.bu_encoders[i + 1](self.bu_projs[i](z_bu[i].astype(dt)))
      h_td, _ = self.td_encoders[i + 1](hs_td[i], [h_bu] * blocks[i + 1])
      hs_td.append(h_td)
      if i + 1 < L - 1:
        q_bu.append(self.q_bu[i + 1](h_bu))
    merged, _ = self.top_merge(jnp.concatenate([h_bu, h_td], axis=-1))
    return q_bu, z_bu, hs_td, self.q_top(merged)

  def _generation(self, R: int, B: int, skip: Array, prior_sample: bool, q_bu, z_bu, hs_td, q_top):
    """Top-down: z_L ~ q(z_L), then per stage both latents from q (with their KL terms) or, for stages <= k, from
    the conditional priors; returns the bottom decoder state and the KL terms."""
    L = self.spec.num_layers
    kl, kl_elem = [None] * L, [None] * (2 * L - 1)

    def per_example(elem):
      return elem.reshape((R, B) + elem.shape[1:])

    z = q_top.sample(self.make_rng("sample"))
    elem = q_top.log_prob(z) - D.standard_normal_like(z).log_prob(z)
    kl_elem[-1] = per_example(elem)
    kl[-1] = jnp.sum(elem.reshape(R, B, -1), axis=-1)
    d, skips = self._decode(L - 1, z, None)
    for i in reversed(range(L - 1)):
      p_td, p_bu = self.p_td[i](d), self.p_bu[i](d)
      merged, _ = self.merges[i](hs_td[i], [d])
      q_td = self.q_td[i](merged)
      z_td_post = q_td.sample(self.make_rng("sample"))
      # Prior draws are keyed whether or not they are used, so every other draw is the same in both modes.
      k_td, k_bu = self.make_rng("sample"), self.make_rng("sample")
      z_td_prior = p_td.sample(k_td) if prior_sample else p_td.mu
      z_bu_prior = p_bu.sample(k_bu) if prior_sample else p_bu.mu
      skipped = row_mask(skip > i, z_td_post)
      z_td = jnp.where(skipped, z_td_prior, z_td_post)
      z_bu_i = jnp.where(skipped, z_bu_prior, z_bu[i])
      e_td = jnp.where(skipped, 0.0, q_td.log_prob(z_td) - p_td.log_prob(z_td))
      e_bu = jnp.where(skipped, 0.0, q_bu[i].log_prob(z_bu_i) - p_bu.log_prob(z_bu_i))
      kl_elem[2 * i], kl_elem[2 * i + 1] = per_example(e_td), per_example(e_bu)
      kl[i] = jnp.sum(e_td.reshape(R, B, -1), axis=-1) + jnp.sum(e_bu.reshape(R, B, -1), axis=-1)
      self.sow("intermediates", f"z_td{i + 1}", z_td)
      self.sow("intermediates", f"z_bu{i + 1}", z_bu_i)
      d, skips = self._decode(i, jnp.concatenate([z_td, z_bu_i], axis=-1), skips)
    return d, kl, kl_elem

  def generate(self, num: int, temperature: float = 1.0) -> tuple[Array, Array]:
    """Ancestral samples from the prior: returns (mean images, sampled images), each [num, H, W, C]."""
    sp = self.spec
    L = sp.num_layers
    z = temperature * jax.random.normal(self.make_rng("sample"), (num,) + sp.latent_shapes()[-1])
    d, skips = self._decode(L - 1, z, None)
    for i in reversed(range(L - 1)):
      zs = []
      for p in (self.p_td[i](d), self.p_bu[i](d)):
        zs.append(p.mu + temperature * p.sigma * jax.random.normal(self.make_rng("sample"), p.mu.shape))
      d, skips = self._decode(i, jnp.concatenate(zs, axis=-1), skips)
    params = self.likelihood(d)
    return self.likelihood.mean(params), self.likelihood.sample(self.make_rng("sample"), params)

  def reconstruct(self, x: Array) -> Array:
    """Mean of p(x|z) at a posterior sample z ~ q(z|x): [B, H, W, C]."""
    out = self(x, 0)
    return self.likelihood.mean(out.lik_params[0])
