"""ELBO, the per-layer bounds L^{>k}, importance weighting, LLR^{>k}, free nats and bits/dim.

Definitions (docs/design.md §3; nats per example, summed over pixels and channels):
* KL_l: single-sample Monte-Carlo estimate log q(z_l|.) - log p(z_l|z_{>l}) at the same reparameterised z_l.
* ELBO: log p(x|z) - sum_l KL_l.
* L^{>k}: z_1..z_k are the conditional prior's mean (the reference, default) or a sample of it (the paper,
  `prior_sample=True`) and carry no KL term; the posterior means of z_1..z_k feed the inference path.
  L^{>0} = ELBO; with S_k = S, `compute_bounds` reports the ELBO's own value (same samples, no extra pass).
* Importance weighting over S samples: L_S = log (1/S) sum_s exp L^{(s)} (a log-mean-exp).
* LLR^{>k} = L_S(x) - L^{>k}_{S_k}(x); larger means more out-of-distribution.

Everything here is a pure function of a model, its parameters, a batch and a PRNG key, and jit-compiles.
The model call takes a vector of skip counts, one per replica, so every bound of a batch (the ELBO's S
samples and each L^{>k}'s S_k samples) comes out of chunked passes that share the sample-independent work.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hvaeood.models.blocks import Output

Array = jax.Array

# Replica-chunk size used when the caller gives none: rows of (replica x batch) evaluated at once.
DEFAULT_MAX_ROWS = 2048


def bits_per_dim(nats: Array, num_dims: int) -> Array:
  """-nats / (D ln 2): the negative log-likelihood bound in bits per dimension."""
  return -nats / (num_dims * math.log(2.0))


def log_mean_exp(x: Array, axis: int = 0) -> Array:
  """log(mean(exp(x))) along `axis`, computed stably."""
  return jax.nn.logsumexp(x, axis=axis) - math.log(x.shape[axis])


def apply_model(model: nn.Module, params, x: Array, n_skip, rng: Array, prior_sample: bool = False) -> Output:
  """One forward pass: replicas [R] = len(n_skip) of the batch x, independent samples from `rng`."""
  return model.apply({"params": params}, x, n_skip, prior_sample, rngs={"sample": rng})


def single_sample_bounds(model: nn.Module, params, x: Array, rng: Array, ks: Sequence[int],
                         prior_sample: bool = False) -> Output:
  """L^{>k} for each k in `ks` (one sample each) in one pass. `Output.elbo[i]` is L^{>ks[i]}, shape [len(ks), B]."""
  return apply_model(model, params, x, jnp.asarray(ks, jnp.int32), rng, prior_sample)


class Bounds(NamedTuple):
  """Per-example bounds of one batch. Shapes: [B] or [K, B] with K = len(ks)."""
  elbo: Array          # importance-weighted with S samples (S = 1: the plain ELBO)
  lk: Array            # [K, B] L^{>k}, importance-weighted with S_k samples
  llr: Array           # [K, B] elbo - lk
  log_px: Array        # log p(x|z), averaged over the ELBO's S samples
  kl: Array            # [L, B] per-layer KL, averaged over the ELBO's S samples
  ks: tuple            # the k of each row of lk / llr


def _row_plan(iw_samples: int, iw_samples_k: int, ks: Sequence[int], max_rows: int, batch: int):
  """Static plan: rows (replicas) with their skip count and group; group 0 = ELBO, group i = ks[i-1]."""
  skips = [0] * iw_samples
  groups = [0] * iw_samples
  for g, k in enumerate(ks, start=1):
    skips += [k] * iw_samples_k
    groups += [g] * iw_samples_k
  chunk = max(1, min(len(skips), max_rows // max(batch, 1)))
  n_chunks = -(-len(skips) // chunk)
  pad = n_chunks * chunk - len(skips)
  skips = np.array(skips + [0] * pad, np.int32).reshape(n_chunks, chunk)
  groups = np.array(groups + [-1] * pad, np.int32).reshape(n_chunks, chunk)
  return skips, groups


@functools.partial(jax.jit, static_argnames=("model", "iw_samples", "iw_samples_k", "ks", "max_rows",
                                             "prior_sample"))
def compute_bounds(model: nn.Module, params, x: Array, rng: Array, *, iw_samples: int = 1,
                   iw_samples_k: int = 1, ks: tuple[int, ...] = (1,), max_rows: int = DEFAULT_MAX_ROWS,
                   prior_sample: bool = False) -> Bounds:
  """All bounds of a batch in one compiled function.

  Args:
    model: the (hashable) Flax module.
    params: its parameters.
    x: images [B, H, W, C].
    rng: PRNG key; every sample of every bound gets its own draws.
    iw_samples: S, importance samples of the ELBO.
    iw_samples_k: S_k, importance samples of each L^{>k}.
    ks: the k values (each in 0..L-1). L^{>0} is the ELBO: with S_k = S its row is the ELBO's own (same
      samples, not recomputed: one pass fewer per batch); with S_k != S it is the ELBO with S_k fresh samples.
    max_rows: bound on replicas x batch evaluated at once; memory is O(max_rows) whatever S is.
    prior_sample: sample z_{<=k} from the conditional prior (paper) instead of its mean (reference).

  Returns:
    A `Bounds` tuple.
  """
  num_layers = model.spec.num_layers
  for k in ks:
    if not 0 <= k < num_layers:
      raise ValueError(f"k = {k} is out of range: the model has {num_layers} latent layers, so k must be in "
                       f"0..{num_layers - 1}.")
  if iw_samples < 1 or iw_samples_k < 1:
    raise ValueError(f"Importance samples must be >= 1, got S = {iw_samples}, S_k = {iw_samples_k}.")
  B = x.shape[0]
  # L^{>0} with S_k = S samples is the ELBO itself: its row is the ELBO's (one pass fewer per batch).
  reuse = iw_samples_k == iw_samples
  row_ks = tuple(k for k in ks if not (reuse and k == 0))
  skips, groups = _row_plan(iw_samples, iw_samples_k, row_ks, max_rows, B)
  n_groups = len(row_ks) + 1
  onehot = jnp.asarray(groups[..., None] == np.arange(n_groups), jnp.float32)  # [n_chunks, chunk, G]
  counts = np.array([iw_samples] + [iw_samples_k] * len(row_ks), np.float32)

  def body(carry, inp):
    m, s, log_px_sum, kl_sum = carry
    i, skip_c, hot = inp
    out = apply_model(model, params, x, skip_c, jax.random.fold_in(rng, i), prior_sample)
    vals = out.elbo  # [chunk, B]
    masked = jnp.where(hot[:, :, None] > 0, vals[:, None, :], -jnp.inf)  # [chunk, G, B]
    cmax = jnp.max(masked, axis=0)
    new_m = jnp.maximum(m, cmax)
    safe_m = jnp.where(jnp.isfinite(new_m), new_m, 0.0)
    s = s * jnp.exp(m - safe_m) + jnp.sum(jnp.exp(masked - safe_m[None]), axis=0)
    elbo_rows = hot[:, 0][:, None]  # [chunk, 1]
    log_px_sum = log_px_sum + jnp.sum(out.log_px * elbo_rows, axis=0)
    kl_sum = kl_sum + jnp.stack([jnp.sum(k * elbo_rows, axis=0) for k in out.kl])
    return (new_m, s, log_px_sum, kl_sum), None

  init = (jnp.full((n_groups, B), -jnp.inf), jnp.zeros((n_groups, B)), jnp.zeros((B,)),
          jnp.zeros((num_layers, B)))
  (m, s, log_px_sum, kl_sum), _ = jax.lax.scan(
      body, init, (jnp.arange(skips.shape[0]), jnp.asarray(skips), onehot))
  lse = m + jnp.log(s) - jnp.log(jnp.asarray(counts))[:, None]
  elbo = lse[0]
  group = {k: g for g, k in enumerate(row_ks, start=1)}  # a reused L>0 reads group 0, the ELBO's
  lk = lse[np.asarray([group.get(k, 0) for k in ks], np.int32)]
  return Bounds(elbo, lk, elbo[None] - lk, log_px_sum / iw_samples, kl_sum / iw_samples, tuple(ks))


FREE_NATS_GRANULARITIES = ("per_layer_total", "per_channel", "per_layer_batch")


def check_granularity(granularity: str) -> str:
  """`granularity`, or a one-line error naming the config field and the accepted values."""
  if granularity not in FREE_NATS_GRANULARITIES:
    raise ValueError(f"Unknown free-nats granularity {granularity!r} (--config.schedule.free_nats_granularity); "
                     f"use one of {', '.join(FREE_NATS_GRANULARITIES)}.")
  return granularity


def free_nats_kl(kl_elem: Sequence[Array], free_nats: Array, granularity: str = "per_layer_total",
                 weights: Array | None = None) -> Array:
  """The KL term of the training loss under a free-nats budget lambda, per example [R, B].

  With lambda = 0 (every step after the free-nats anneal) the KL is returned unchanged, as the reference's
  `FreeNats` does: a floor at 0 would clip the negative single-sample KL elements and bias the objective away
  from the negative ELBO (for a nearly inactive unit the clipped term is several times its true KL).

  Args:
    kl_elem: per layer, elementwise KL [R, B, *latent_shape] (the model's `Output.kl_elem`).
    free_nats: lambda, the free-nats budget per layer (a scalar, may be traced).
    granularity: where the floor acts.
      "per_layer_total": every element at lambda / n_l with n_l the layer's element count, so lambda nats per
      layer (the paper), on each example's single-sample KL.
      "per_channel": n_l = channels (conv) or dims (dense), the reference HEAD's floor of lambda per spatial
      position.
      "per_layer_batch": the free bits of Kingma et al. (2016): each layer's KL averaged over the batch (and the
      samples) is floored at lambda, max(lambda, mean_b KL_l). The batch mean averages out the single-sample
      noise that lets a per-example floor leak (the elements drawn above the floor are pushed down, those below
      are not, so the layer's expected KL sinks under lambda). Per example a layer contributes its KL while the
      batch mean is at least lambda, else the constant lambda (no gradient): the batch mean of the result is
      the floored batch-mean KL.
    weights: [B] example weights of the batch mean ("per_layer_batch": 0 for the padding rows of a padded
      batch); ignored by the per-example granularities.

  Returns:
    [R, B] the floored (lambda > 0) or raw (lambda = 0) KL summed over layers.
  """
  check_granularity(granularity)
  if granularity == "per_layer_batch":  # the batch-mean weights, the same for every layer
    r, b = kl_elem[0].shape[:2]
    w = jnp.ones((b,), kl_elem[0].dtype) if weights is None else jnp.asarray(weights, kl_elem[0].dtype)
    denom = r * jnp.sum(w)
  total = raw = 0.0
  for kl in kl_elem:
    layer = jnp.sum(kl.reshape(kl.shape[:2] + (-1,)), axis=-1)  # [R, B]
    raw = raw + layer
    if granularity == "per_layer_batch":
      batch_mean = jnp.sum(layer * w) / denom
      total = total + jnp.where(batch_mean >= free_nats, layer, jnp.asarray(free_nats, layer.dtype))
      continue
    n = math.prod(kl.shape[-_latent_rank(kl):]) if granularity == "per_layer_total" else kl.shape[-1]
    floored = jnp.maximum(kl, free_nats / n)
    total = total + jnp.sum(floored.reshape(kl.shape[:2] + (-1,)), axis=-1)
  # lambda may be traced (it is annealed), so both sums are formed and the budget picks one.
  return jnp.where(jnp.asarray(free_nats) > 0, total, raw)


def _latent_rank(kl: Array) -> int:
  # Output.kl_elem arrays are [R, B, *latent_shape].
  return kl.ndim - 2


def training_loss(out: Output, beta: Array, free_nats: Array, granularity: str = "per_layer_total",
                  weights: Array | None = None):
  """Batch-mean loss -log p(x|z) + beta * `free_nats_kl` (the raw KL once lambda = 0), and the raw ELBO per example.

  `weights` ([B], optional) weight the examples of the mean (0 for the padding rows of a padded batch).
  """
  per_example = -out.log_px + beta * free_nats_kl(out.kl_elem, free_nats, granularity, weights)  # [R, B]
  if weights is None:
    loss = jnp.mean(per_example)
  else:
    loss = jnp.sum(per_example * weights) / (per_example.shape[0] * jnp.sum(weights))
  return loss, out.elbo
