"""The training state and the jitted functions that make and advance it.

* `TrainState`: parameters, EMA, optimiser state, step, skip counters and the base PRNG key (step t draws with
  `fold_in(rng, t)`), replicated over the device mesh;
* `create_train_state` / `abstract_train_state`: a fresh state (data-dependent init on a real batch) and its
  shapes without data (for restoring checkpoints);
* `make_train_step`: one optimisation step, with the schedules, free nats, gradient clipping, update skipping and
  the EMA;
* `init_state` / `jit_train_step`: those two jitted over a mesh, as the training loop runs them.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hvaeood import bounds
from hvaeood import datasets_info
from hvaeood import devices
from hvaeood.models import build_model, init_params
from hvaeood.schedules import schedule_values

Array = jax.Array


@flax.struct.dataclass
class TrainState:
  step: Array
  params: Any
  opt_state: Any
  ema_params: Any  # None when EMA is off
  skipped: Array  # total skipped updates
  consecutive_skips: Array
  rng: Array  # base PRNG key (raw uint32[2]); step t uses fold_in(rng, t)


def train_precision(config: ml_collections.ConfigDict) -> str:
  return devices.check_precision(config.train.get("precision", "default"), "--config.train.precision")


def eval_precision(config: ml_collections.ConfigDict) -> str:
  return devices.check_precision(config.eval.get("precision", "highest"), "--config.eval.precision")


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  o = config.optim
  return optax.adam(o.lr, b1=o.b1, b2=o.b2, eps=o.eps)


def model_for_config(config: ml_collections.ConfigDict) -> nn.Module:
  return build_model(config.model, datasets_info.image_shape(config.data.name))


def ema_step_size(step, decay: float):
  """Weight of the new parameters in the EMA update at `step` (0-based): max(1 - decay, 1 / (step + 1)).

  Until 1 / (step + 1) falls to 1 - decay the EMA is the plain mean of the parameters after each update so far (the
  first update replaces the initial parameters outright), then the usual exponential average. Without this start
  the initial parameters keep a weight of decay**t, e.g. 0.995**500 = 8% after a 500-step run.
  """
  return jnp.maximum(1.0 - decay, 1.0 / (step.astype(jnp.float32) + 1.0))


def create_train_state(config: ml_collections.ConfigDict, model: nn.Module, init_batch) -> TrainState:
  """Fresh state: data-dependent init of the model on a real batch (at the training precision)."""
  rng = jax.random.PRNGKey(config.seed)
  init_rng, train_rng = jax.random.split(rng)
  with jax.default_matmul_precision(train_precision(config)):
    params = init_params(model, init_rng, jnp.asarray(init_batch))
  opt_state = make_optimizer(config).init(params)
  ema = jax.tree_util.tree_map(jnp.copy, params) if config.optim.ema_decay > 0 else None
  zero = lambda: jnp.zeros((), jnp.int32)  # distinct buffers: the state is donated
  return TrainState(zero(), params, opt_state, ema, zero(), zero(), train_rng)


def abstract_train_state(config: ml_collections.ConfigDict, sharding=None) -> TrainState:
  """The state's shapes and dtypes (no data needed), optionally with a sharding for every leaf."""
  model = model_for_config(config)
  batch = jax.ShapeDtypeStruct((2,) + tuple(model.spec.image_shape), jnp.float32)
  abstract = jax.eval_shape(functools.partial(create_train_state, config, model), batch)
  if sharding is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)


def make_train_step(config: ml_collections.ConfigDict, model: nn.Module, steps_per_epoch: int):
  """The jitted-to-be training step: (state, images[, mask]) -> (state, metrics).

  `mask` ([B] bool, optional) marks the real rows of a batch padded to a multiple of the devices: the loss and
  the metrics are means over the real rows only, so a padded batch gives the unpadded batch's update. Matmuls and
  convolutions run at `config.train.precision`.
  """
  precision = train_precision(config)
  granularity = config.schedule.free_nats_granularity

  def step_fn(state: TrainState, images: Array, mask: Optional[Array] = None):
    with jax.default_matmul_precision(precision):
      beta, lam = schedule_values(state.step, config, steps_per_epoch)
      rng = jax.random.fold_in(state.rng, state.step)
      weights = None if mask is None else mask.astype(jnp.float32)

      def loss_fn(params):
        out = model.apply({"params": params}, images, 0, rngs={"sample": rng})
        return bounds.training_loss(out, beta, lam, granularity, weights)[0], out

      (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
      new_state, gnorm, skipped = _apply_update(config, state, loss, grads)
      return new_state, _step_metrics(state, new_state, out, weights, loss, beta, lam, gnorm, skipped)

  return step_fn


def _apply_update(config: ml_collections.ConfigDict, state: TrainState, loss: Array, grads):
  """Clipping, the optimiser and the EMA, or a skipped update: (new state, gradient norm, skipped 0/1).

  optax gives the clipping and the EMA. The skip stays ours: `optax.apply_if_finite` skips only non-finite
  updates and keeps its counters in the optimiser state, while this run also skips updates above a gradient-norm
  threshold, freezes the EMA with the parameters, and needs the counters in the checkpointed TrainState for the
  stop-after-N-consecutive-skips rule.
  """
  o = config.optim
  gnorm = optax.global_norm(grads)
  ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
  if o.skip_threshold > 0:
    ok = ok & (gnorm < o.skip_threshold)
  if o.grad_clip > 0:
    grads, _ = optax.clip_by_global_norm(o.grad_clip).update(grads, optax.EmptyState())
  # Zero non-finite gradients so that the (discarded) candidate update stays finite.
  grads = jax.tree_util.tree_map(lambda g: jnp.where(ok, g, 0.0), grads)
  updates, new_opt = make_optimizer(config).update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)
  ema = state.ema_params
  if ema is not None:
    ema = keep(optax.incremental_update(new_params, ema, step_size=ema_step_size(state.step, o.ema_decay)), ema)
  skipped = (~ok).astype(jnp.int32)
  new_state = state.replace(step=state.step + 1, params=keep(new_params, state.params),
                            opt_state=keep(new_opt, state.opt_state), ema_params=ema,
                            skipped=state.skipped + skipped,
                            consecutive_skips=jnp.where(ok, 0, state.consecutive_skips + 1))
  return new_state, gnorm, skipped


def _step_metrics(state, new_state, out, weights, loss, beta, lam, gnorm, skipped) -> dict[str, Array]:
  """The step's scalars; batch means are over the real rows (`weights`) of a padded batch."""
  mean = lambda v: jnp.mean(v) if weights is None else jnp.sum(v * weights) / jnp.sum(weights)
  metrics = {
      "loss": loss, "elbo": mean(out.elbo[0]), "log_px": mean(out.log_px[0]),
      "kl": mean(sum(out.kl)[0]), "beta": beta, "free_nats": lam, "grad_norm": gnorm,
      "skipped_update": skipped, "skipped_total": new_state.skipped,
      "consecutive_skips": new_state.consecutive_skips,
      "param_norm": optax.global_norm(state.params),
  }
  for i, kl in enumerate(out.kl):
    metrics[f"kl_z{i + 1}"] = mean(kl[0])
  return metrics


# ---------------------------------------------------------------------------------------------------------------
# Jitted over a mesh


def check_batch(global_batch: int, mesh: Mesh) -> int:
  """Checks the training batch against the processes (each reads an equal share); returns its padded size."""
  if global_batch < 1:
    raise ValueError(f"config.train.batch_size must be positive, got {global_batch}.")
  if global_batch % jax.process_count():
    raise ValueError(f"The global batch size {global_batch} does not divide over {jax.process_count()} "
                     f"processes (each reads an equal share); set --config.train.batch_size to a multiple of "
                     f"{jax.process_count()}.")
  return devices.padded_batch_size(global_batch, mesh)


def init_state(config: ml_collections.ConfigDict, model: nn.Module, local_images: np.ndarray, mesh: Mesh,
               padded: bool = False) -> TrainState:
  """The data-dependent init on this process's first training batch, jitted; the state comes out replicated.

  With a padded batch the padding rows would skew the init statistics, so the init sees the real rows of every
  process, replicated; otherwise the batch sharded over the mesh, as the training step sees it.
  """
  replicated = NamedSharding(mesh, P())
  init = jax.jit(functools.partial(create_train_state, config, model), out_shardings=replicated)
  if not padded:
    return init(devices.to_global(local_images, NamedSharding(mesh, P("data"))))
  return init(devices.replicate(devices.all_real_rows(local_images), replicated))


def jit_train_step(config: ml_collections.ConfigDict, model: nn.Module, steps_per_epoch: int, mesh: Mesh,
                   masked: bool = False, step_fn: Optional[Callable] = None):
  """`make_train_step` (or `step_fn`) jitted over `mesh`: state replicated and donated, batch (and mask) sharded."""
  replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  fn = step_fn or make_train_step(config, model, steps_per_epoch)
  return jax.jit(fn, in_shardings=(replicated, data) + ((data,) if masked else ()),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))
