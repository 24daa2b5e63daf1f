"""The paper's training schedules: KL warm-up (beta) and the free-nats budget (lambda), as functions of the step.

The reference steps both once per epoch, at its start (`continuous=False`: epoch e = step // steps_per_epoch + 1,
beta_e = e / warmup, lambda constant for C epochs then numpy.linspace(lambda, 0, A) over the next A epochs);
`continuous=True` makes them piecewise-linear in fractional epochs, which short runs need. Every function takes
Python or traced (jitted) steps.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections


def epoch_of_step(step, steps_per_epoch: int, continuous: bool):
  """1-based epoch at the start of which beta and lambda step (discrete), or fractional epochs done (continuous)."""
  if continuous:
    return step / steps_per_epoch
  return step // steps_per_epoch + 1


def kl_beta(epoch, warmup_epochs: float):
  """KL warm-up: beta = epoch / warmup (epoch 1 -> 0.005 for 200), 1 from epoch `warmup` on."""
  if warmup_epochs <= 0:
    return jnp.ones_like(jnp.asarray(epoch, jnp.float32))
  return jnp.minimum(jnp.asarray(epoch, jnp.float32) / warmup_epochs, 1.0)


def free_nats(epoch, lam: float, constant_epochs: float, anneal_epochs: float, continuous: bool):
  """Free-nats lambda: constant for `constant_epochs`, then annealed linearly to 0 over `anneal_epochs`.

  Discrete (reference): epochs C+1..C+A take linspace(lam, 0, A), so epoch C+1 -> lam and C+A -> 0.
  Continuous: lam * (1 - (t - C) / A) for fractional epochs t in (C, C+A).
  """
  e = jnp.asarray(epoch, jnp.float32)
  if continuous:
    frac = jnp.clip((e - constant_epochs) / max(anneal_epochs, 1e-12), 0.0, 1.0)
  else:
    frac = jnp.clip((e - constant_epochs - 1.0) / max(anneal_epochs - 1.0, 1.0), 0.0, 1.0)
    frac = jnp.where(e > constant_epochs + anneal_epochs, 1.0, frac)
  return lam * (1.0 - frac)


def schedule_values(step, config: ml_collections.ConfigDict, steps_per_epoch: int):
  s = config.schedule
  epoch = epoch_of_step(step, steps_per_epoch, s.continuous)
  return (kl_beta(epoch, s.warmup_epochs),
          free_nats(epoch, s.free_nats, s.free_nats_constant_epochs, s.free_nats_anneal_epochs, s.continuous))
