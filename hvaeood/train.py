"""Training: data-parallel jit over a device mesh, paper schedules, orbax auto-resume, logging.

`train_and_evaluate(config, workdir)` is the whole run. It is resumable at any point: the state (parameters,
EMA, optimiser, step, skip counters, base PRNG key) is checkpointed with orbax; the data position is a function
of the step (the input pipeline can start at any step) and per-step randomness is `fold_in(key, step)`, so a
resumed run continues exactly the run it resumes.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import os
import time
from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hvaeood import bounds
from hvaeood import checkpoints as ckpt
from hvaeood import datasets_info
from hvaeood import run_control
from hvaeood.models import build_model, init_params

Array = jax.Array


class TrainingError(RuntimeError):
  """A run that cannot continue (e.g. too many consecutive skipped updates); the message says why."""


@flax.struct.dataclass
class TrainState:
  step: Array
  params: Any
  opt_state: Any
  ema_params: Any  # None when EMA is off
  skipped: Array  # total skipped updates
  consecutive_skips: Array
  rng: Array  # base PRNG key (raw uint32[2]); step t uses fold_in(rng, t)


# ---------------------------------------------------------------------------------------------------------------
# Schedules (SPEC 3)


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


# ---------------------------------------------------------------------------------------------------------------
# State


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  o = config.optim
  return optax.adam(o.lr, b1=o.b1, b2=o.b2, eps=o.eps)


def model_for_config(config: ml_collections.ConfigDict) -> nn.Module:
  return build_model(config.model, datasets_info.image_shape(config.data.name))


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


# ---------------------------------------------------------------------------------------------------------------
# Steps


PRECISIONS = ("default", "high", "highest")


def check_precision(value: str, flag: str) -> str:
  """A matmul/conv precision name (see `PRECISIONS`); ValueError naming the flag otherwise."""
  if value not in PRECISIONS:
    raise ValueError(f"{flag}={value!r} is not a precision; choose one of {', '.join(PRECISIONS)}.")
  return value


def train_precision(config: ml_collections.ConfigDict) -> str:
  return check_precision(config.train.get("precision", "default"), "--config.train.precision")


def eval_precision(config: ml_collections.ConfigDict) -> str:
  return check_precision(config.eval.get("precision", "highest"), "--config.eval.precision")


def make_train_step(config: ml_collections.ConfigDict, model: nn.Module, steps_per_epoch: int):
  """The jitted-to-be training step: (state, images[, mask]) -> (state, metrics).

  `mask` ([B] bool, optional) marks the real rows of a batch padded to a multiple of the devices: the loss and
  the metrics are means over the real rows only, so a padded batch gives the unpadded batch's update. Matmuls and
  convolutions run at `config.train.precision`.
  """
  tx = make_optimizer(config)
  o = config.optim
  granularity = config.schedule.free_nats_granularity
  num_layers = model.spec.num_layers
  precision = train_precision(config)

  def step_fn(state: TrainState, images: Array, mask: Optional[Array] = None):
    with jax.default_matmul_precision(precision):
      return _step(state, images, mask)

  def _step(state: TrainState, images: Array, mask: Optional[Array]):
    beta, lam = schedule_values(state.step, config, steps_per_epoch)
    rng = jax.random.fold_in(state.rng, state.step)
    weights = None if mask is None else mask.astype(jnp.float32)
    mean = lambda v: jnp.mean(v) if weights is None else jnp.sum(v * weights) / jnp.sum(weights)

    def loss_fn(params):
      out = model.apply({"params": params}, images, 0, rngs={"sample": rng})
      loss, elbo = bounds.training_loss(out, beta, lam, granularity, weights)
      return loss, out

    (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    gnorm = optax.global_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
    if o.skip_threshold > 0:
      ok = ok & (gnorm < o.skip_threshold)
    if o.grad_clip > 0:
      scale = jnp.minimum(1.0, o.grad_clip / (gnorm + 1e-12))
      grads = jax.tree_util.tree_map(lambda g: g * scale, grads)
    # Zero non-finite gradients so that the (discarded) candidate update stays finite.
    grads = jax.tree_util.tree_map(lambda g: jnp.where(ok, g, 0.0), grads)
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)
    params = keep(new_params, state.params)
    opt_state = keep(new_opt, state.opt_state)
    ema = state.ema_params
    if ema is not None:
      d = o.ema_decay
      ema = keep(jax.tree_util.tree_map(lambda e, p: d * e + (1 - d) * p, ema, new_params), ema)
    skipped = (~ok).astype(jnp.int32)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema,
                              skipped=state.skipped + skipped,
                              consecutive_skips=jnp.where(ok, 0, state.consecutive_skips + 1))
    metrics = {
        "loss": loss, "elbo": mean(out.elbo[0]), "log_px": mean(out.log_px[0]),
        "kl": mean(sum(out.kl)[0]), "beta": beta, "free_nats": lam, "grad_norm": gnorm,
        "skipped_update": skipped, "skipped_total": new_state.skipped,
        "consecutive_skips": new_state.consecutive_skips,
        "param_norm": optax.global_norm(state.params),
    }
    for i in range(num_layers):
      metrics[f"kl_z{i + 1}"] = mean(out.kl[i][0])
    return new_state, metrics

  return step_fn


# ---------------------------------------------------------------------------------------------------------------
# Mesh and data placement


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D 'data' mesh over every device (or the first `num_devices`, for benchmarks)."""
  devices = jax.devices()
  if num_devices is not None:
    if not 1 <= num_devices <= len(devices):
      raise ValueError(f"num_devices={num_devices} but {len(devices)} devices are available; choose 1.."
                       f"{len(devices)}.")
    devices = devices[:num_devices]
  return Mesh(np.array(devices), ("data",))


def padded_batch_size(batch: int, mesh: Mesh) -> int:
  """The smallest multiple of the mesh's devices (and of the processes) >= `batch`.

  Any batch runs on any device count: a batch is padded to this size and the padding masked, so no default asks
  for a multiple of the device count.
  """
  n = math.lcm(int(mesh.devices.size), jax.process_count())
  return -(-int(batch) // n) * n


def check_batch(global_batch: int, mesh: Mesh) -> int:
  """Checks the training batch against the processes (each reads an equal share); returns its padded size."""
  if global_batch < 1:
    raise ValueError(f"config.train.batch_size must be positive, got {global_batch}.")
  if global_batch % jax.process_count():
    raise ValueError(f"The global batch size {global_batch} does not divide over {jax.process_count()} "
                     f"processes (each reads an equal share); set --config.train.batch_size to a multiple of "
                     f"{jax.process_count()}.")
  return padded_batch_size(global_batch, mesh)


def pad_rows(local: np.ndarray, rows: int) -> np.ndarray:
  """Zero rows appended to a host-local batch so that it has `rows` rows."""
  extra = rows - local.shape[0]
  if extra < 0:
    raise ValueError(f"A local batch of {local.shape[0]} rows does not fit in {rows}.")
  if extra == 0:
    return local
  return np.concatenate([local, np.zeros((extra,) + local.shape[1:], local.dtype)])


def to_global(local_batch: np.ndarray, sharding: NamedSharding) -> Array:
  return jax.make_array_from_process_local_data(sharding, local_batch)


def replicate(tree, sharding: NamedSharding):
  """Host-identical numpy values (or a tree of them) as global arrays replicated over `sharding`'s mesh.

  Works across processes: every process must pass the same values.
  """
  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
  return jax.tree_util.tree_map(put, jax.device_get(tree))


def host_local(x: Array) -> np.ndarray:
  """The value of a replicated global array on this host (no collective)."""
  return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


def all_real_rows(local: np.ndarray) -> np.ndarray:
  """The real rows of every process's local batch, concatenated in process order (identical on every host)."""
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return np.asarray(multihost_utils.process_allgather(local, tiled=True))


# ---------------------------------------------------------------------------------------------------------------
# Evaluation during training


def evaluate_model(model: nn.Module, params, config: ml_collections.ConfigDict, mesh: Mesh, rng: Array,
                   datasets: list[str]) -> dict[str, dict[str, np.ndarray]]:
  """Single-sample ELBO and every L^{>k} for the test split of each dataset (per-example arrays, file order)."""
  from hvaeood import evaluate as evaluate_lib  # pylint: disable=import-outside-toplevel
  from hvaeood import input_pipeline  # pylint: disable=import-outside-toplevel
  ks = tuple(range(model.spec.num_layers))
  sharding = NamedSharding(mesh, P("data"))
  fn = evaluate_lib.make_bounds_fn(model, mesh, iw_samples=1, iw_samples_k=1, ks=ks, max_rows=None,
                                   precision=eval_precision(config))
  local_batch = padded_batch_size(config.eval.batch_size, mesh) // jax.process_count()
  results = {}
  for i, name in enumerate(datasets):
    it, _ = input_pipeline.create_eval_dataset(
        name, "test", preprocessing=datasets_info.eval_preprocessing(config, name),
        batch_size=local_batch, seed=config.seed, max_examples=config.eval.max_examples,
        data_dir=config.data.data_dir, process_index=jax.process_index(), process_count=jax.process_count(),
        target_shape=model.spec.image_shape)
    cols, _ = evaluate_lib.score_pass(fn, params, it, sharding, jax.random.fold_in(rng, i), local_batch)
    results[name] = {k: cols[k] for k in ("elbo", "lk", "log_px", "kl")}
  return results


def eval_summary(results: dict, in_name: str, num_dims: int) -> dict[str, float]:
  """Scalar validation metrics: ELBO, bits/dim, every L^{>k}, and AUROC of -L^{>k} and LLR^{>k} per OOD set."""
  from hvaeood import ood_metrics  # pylint: disable=import-outside-toplevel
  r = results[in_name]
  out = {"eval_elbo": float(np.mean(r["elbo"])),
         "eval_bits_per_dim": float(bounds.bits_per_dim(np.mean(r["elbo"]), num_dims)),
         "eval_log_px": float(np.mean(r["log_px"]))}
  for i, kl in enumerate(r["kl"]):
    out[f"eval_kl_z{i + 1}"] = float(np.mean(kl))
  for k, lk in enumerate(r["lk"]):
    out[f"eval_L>{k}"] = float(np.mean(lk))
  for name, o in results.items():
    if name == in_name:
      continue
    for k in range(1, r["lk"].shape[0]):
      for score, f in (("LLR", lambda d: d["elbo"] - d["lk"][k]), ("L", lambda d: -d["lk"][k])):
        idx_in, idx_ood = ood_metrics.subsample_to_equal(len(r["elbo"]), len(o["elbo"]), 0)
        s_in, s_ood = f(r)[idx_in], f(o)[idx_ood]
        labels = np.r_[np.zeros(len(s_in)), np.ones(len(s_ood))]
        out[f"eval_auroc_{score}>{k}_{name}"] = float(ood_metrics.auroc(labels, np.r_[s_in, s_ood]))
  return out


# ---------------------------------------------------------------------------------------------------------------
# The run


def total_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  return config.train.num_steps if config.train.num_steps > 0 else config.schedule.epochs * steps_per_epoch


def _config_json(config: ml_collections.ConfigDict) -> str:
  return config.to_json_best_effort(sort_keys=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming from the workdir's latest good checkpoint) and evaluates periodically.

  Returns:
    A summary dict: final step, last training metrics, last evaluation metrics, images/sec, stop reason.
  """
  from hvaeood import input_pipeline  # pylint: disable=import-outside-toplevel
  from hvaeood import logging_utils  # pylint: disable=import-outside-toplevel

  if config.train.distributed:
    jax.distributed.initialize(**_distributed_kwargs(config))
  datasets_info.validate_config(config)
  train_precision(config)
  eval_precision(config)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  lock = ckpt.WorkdirLock(workdir)
  if is_main:
    lock.acquire()
  try:
    return _run(config, workdir, is_main, input_pipeline, logging_utils)
  finally:
    if is_main:
      lock.release()


def _distributed_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """jax.distributed.initialize arguments from config.train (optional fields; None = let JAX detect them).

  TPU pods, SLURM, Open MPI and Kubernetes are detected by JAX itself. Elsewhere, e.g. several CPU processes on one
  machine, set config.train.coordinator_address ('host:port' of process 0), num_processes and process_id.
  """
  names = ("coordinator_address", "num_processes", "process_id")
  return {k: config.train.get(k) for k in names if config.train.get(k) is not None}


def eval_datasets(config: ml_collections.ConfigDict) -> list[str]:
  """The in-distribution set and the configured OOD sets that are prepared, for the in-training evaluation.

  A configured OOD set that is not prepared is skipped with a warning that names it and how to prepare it. The
  check reads process 0's filesystem and is broadcast, so every process evaluates the same sets.
  """
  data_dir = config.data.get("data_dir")
  in_name = datasets_info.canonical(config.data.name)
  candidates = []
  for name in config.eval.ood_datasets:
    name = datasets_info.canonical(name)
    if name != in_name and name not in candidates:
      candidates.append(name)
  available = np.array([datasets_info.is_available(n, data_dir) for n in candidates], np.int32)
  if jax.process_count() > 1 and len(candidates):
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    available = np.asarray(multihost_utils.broadcast_one_to_all(available))
  for name, ok in zip(candidates, available):
    if not ok:
      logging.warning("OOD set %s (config.eval.ood_datasets) is not prepared in %s, so the in-training "
                      "evaluation skips it. To prepare it: %s", name, datasets_info.data_dir_description(data_dir),
                      datasets_info.prepare_command(name, data_dir))
  return [in_name] + [n for n, ok in zip(candidates, available) if ok]


def _init_state(config, model, local_images: np.ndarray, batch_sharding, replicated, padded: bool) -> TrainState:
  """Data-dependent init on the first training batch, created replicated on the mesh."""
  init = jax.jit(functools.partial(create_train_state, config, model), out_shardings=replicated)
  if not padded:
    return init(to_global(local_images, batch_sharding))
  # Padding rows would skew the init statistics: the init sees the real rows of every process, replicated.
  return init(replicate(all_real_rows(local_images), replicated))


class ImageGrids:
  """Jitted prior samples and reconstructions for the image grids, compiled once per run.

  Every process calls them (their inputs are global arrays); only process 0 writes the files.
  """

  def __init__(self, model: nn.Module, mesh: Mesh, num: int, precision: str):
    replicated = NamedSharding(mesh, P())

    def samples(params, rng):
      with jax.default_matmul_precision(precision):
        return model.apply({"params": params}, num, method=model.generate, rngs={"sample": rng})[0]

    def reconstructions(params, x, rng):
      with jax.default_matmul_precision(precision):
        return model.apply({"params": params}, x, method=model.reconstruct, rngs={"sample": rng})

    self._samples = jax.jit(samples, in_shardings=(replicated, replicated), out_shardings=replicated)
    self._recon = jax.jit(reconstructions, in_shardings=(replicated,) * 3, out_shardings=replicated)
    self.num = num

  def __call__(self, params, x: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """(samples [n, ...], originals interleaved with their reconstructions [2n, ...]) on this host."""
    rng = np.asarray(rng)
    mean = host_local(self._samples(params, rng))
    recon = host_local(self._recon(params, np.asarray(x, np.float32), rng))
    pairs = np.stack([x, recon], axis=1).reshape((2 * len(x),) + x.shape[1:])
    return mean, pairs


def _run(config, workdir, is_main, input_pipeline, logging_utils):
  mesh = make_mesh()
  batch_size = config.train.batch_size
  padded = check_batch(batch_size, mesh)
  model = model_for_config(config)
  num_dims = math.prod(model.spec.image_shape)
  spe = input_pipeline.steps_per_epoch(config, jax.process_count())
  num_steps = total_steps(config, spe)
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))
  if padded != batch_size:
    logging.info("The global batch of %d is padded to %d rows for %d devices; the padding is masked out of the "
                 "loss and the metrics.", batch_size, padded, mesh.devices.size)

  manager = ckpt.make_manager(os.path.join(workdir, ckpt.CHECKPOINT_DIR), keep=config.checkpoint.keep)
  best_manager = ckpt.make_manager(os.path.join(workdir, ckpt.BEST_DIR), keep=1)
  abstract = abstract_train_state(config, replicated)
  restored = ckpt.restore_latest_good(manager, abstract)
  if restored is not None:
    start_step, state, meta = restored
    if meta.get("config") is not None and _model_section(meta["config"]) != _model_section(_config_json(config)):
      raise ckpt.CheckpointError(
          f"The checkpoint in {workdir} was trained with a different model config than the one given. Use the "
          "same config to resume, or a new --workdir.")
    elapsed = float(meta.get("train_seconds", 0.0))
    best_elbo = meta.get("best_eval_elbo")
    logging.info("Resumed from step %d of %s.", start_step, workdir)
  else:
    start_step, elapsed, best_elbo = 0, 0.0, None
  if is_main:  # only once the checkpoints are known to fit this config: never overwrite a run's own config
    _write_config(workdir, config)

  # The mask of a padded batch is the same every step: built once, passed as the step's third argument.
  local_rows, local_real = padded // jax.process_count(), batch_size // jax.process_count()
  mask = () if padded == batch_size else (to_global(np.arange(local_rows) < local_real, batch_sharding),)
  train_step = jax.jit(make_train_step(config, model, spe), in_shardings=(replicated,) + (batch_sharding,) *
                       (1 + len(mask)), out_shardings=(replicated, replicated), donate_argnums=(0,))
  writer = logging_utils.MetricWriter(workdir, enabled=is_main)
  data_iter = iter(input_pipeline.create_train_iterator(
      config, seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count(),
      start_step=start_step))
  if restored is None:
    # Data-dependent init on the first training batch (which is then also the first step's batch).
    first = next(data_iter)
    data_iter = itertools.chain([first], data_iter)
    state = _init_state(config, model, first["image"], batch_sharding, replicated, padded != batch_size)
  eval_every = config.train.eval_every_steps if config.train.eval_every_steps > 0 else \
      max(1, int(round(config.eval.every_epochs * spe)))
  budget_s = config.train.time_budget_minutes * 60.0
  eval_sets = eval_datasets(config)
  grids = ImageGrids(model, mesh, config.eval.num_samples, eval_precision(config))

  def meta(step):
    return {"format_version": ckpt.FORMAT_VERSION, "config": _config_json(config), "step": int(step),
            "train_seconds": elapsed, "best_eval_elbo": best_elbo, "steps_per_epoch": spe}

  def save(step, st):
    ckpt.save(manager, step, st, meta(step))

  last_log_time, last_log_step = time.time(), start_step
  last_metrics, last_eval, stop_reason = {}, {}, "completed"
  prev_consec = None
  step = start_step
  with run_control.Preemption() as preempt:
    control = run_control.RunControl(
        sync_every=config.train.get("sync_every_steps", 10), budget_seconds=budget_s,
        checkpoint_every_seconds=60.0 * config.checkpoint.every_minutes, preemption=preempt)
    while step < num_steps:
      t0 = time.time()
      batch = next(data_iter)
      x = to_global(pad_rows(batch["image"], local_rows), batch_sharding)
      state, metrics = train_step(state, x, *mask)
      step += 1
      # Read the previous step's skip counter: this step keeps running while we look. The counter is replicated,
      # so every process stops at the same step.
      if prev_consec is not None and int(prev_consec) >= config.optim.max_consecutive_skips:
        save(step, state)
        manager.wait_until_finished()
        raise TrainingError(
            f"{int(prev_consec)} consecutive updates were skipped (non-finite or over-threshold gradients) at "
            f"step {step}; the run stopped. Lower --config.optim.lr, enable --config.optim.grad_clip, or check "
            "the data for NaNs. The last checkpoint holds the last good parameters.")
      prev_consec = metrics["consecutive_skips"]
      elapsed += time.time() - t0
      decision = control.poll(step, elapsed)
      if decision.train_seconds is not None:
        elapsed = decision.train_seconds  # process 0's clock, on every process

      if step % config.train.log_every_steps == 0 or step == num_steps:
        m = jax.device_get(metrics)
        now = time.time()
        ips = (step - last_log_step) * batch_size / max(now - last_log_time, 1e-9)
        last_log_time, last_log_step = now, step
        last_metrics = {f"train_{k}": float(v) for k, v in m.items()}
        last_metrics["train_images_per_sec"] = ips
        writer.write_scalars(step, last_metrics)
        if is_main:
          remaining = num_steps - step
          if budget_s > 0:
            remaining = min(remaining, int(max(budget_s - elapsed, 0) / max(elapsed / max(step - start_step, 1), 1e-9)))
          eta = remaining * batch_size / max(ips, 1e-9)
          logging.info("step %d/%d  loss %.2f  elbo %.2f  beta %.3f  fn %.2f  gnorm %.1f  skipped %d  "
                       "%.1f img/s (%.2f steps/s)  eta %s", step, num_steps, m["loss"], m["elbo"], m["beta"],
                       m["free_nats"], m["grad_norm"], m["skipped_total"], ips, ips / batch_size,
                       _fmt_time(eta))

      done = step >= num_steps or decision.out_of_time or decision.preempted
      if step % eval_every == 0 or (done and not decision.preempted):
        last_eval = _evaluate_and_log(model, state, config, mesh, eval_sets, step, num_dims, writer, workdir,
                                      grids)
        if last_eval and (best_elbo is None or last_eval["eval_elbo"] > best_elbo):
          best_elbo = last_eval["eval_elbo"]
          ckpt.save(best_manager, step, state, meta(step))
      if step % config.checkpoint.every_steps == 0 or done or decision.save_for_time:
        save(step, state)
        control.checkpoint_saved()
      if decision.preempted:
        stop_reason = "preempted (SIGTERM): checkpoint saved"
        break
      if decision.out_of_time:
        stop_reason = f"time budget of {config.train.time_budget_minutes:g} min reached"
        break
  manager.wait_until_finished()
  best_manager.wait_until_finished()
  writer.flush()
  summary = {"step": step, "train_seconds": elapsed, "stop_reason": stop_reason, **last_metrics, **last_eval}
  if is_main:
    with open(os.path.join(workdir, "summary.json.tmp"), "w") as f:
      json.dump(summary, f, indent=1, sort_keys=True)
    os.replace(os.path.join(workdir, "summary.json.tmp"), os.path.join(workdir, "summary.json"))
    logging.info("Stopped at step %d: %s.", step, stop_reason)
  return summary


def _evaluate_and_log(model, state, config, mesh, eval_sets, step, num_dims, writer, workdir, grids: ImageGrids):
  """Validation bounds and image grids of the evaluated parameters (EMA when kept). Every process runs the
  jitted calls; process 0 logs and writes the files."""
  from hvaeood import input_pipeline  # pylint: disable=import-outside-toplevel
  from hvaeood import plots  # pylint: disable=import-outside-toplevel
  params = state.ema_params if state.ema_params is not None else state.params
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed + 1), step)
  results = evaluate_model(model, params, config, mesh, rng, eval_sets)
  summary = eval_summary(results, datasets_info.canonical(config.data.name), num_dims)
  writer.write_scalars(step, summary)
  # Reconstructions: the first test images (the same on every process), each beside the mean of p(x|z), z ~ q(z|x).
  it, _ = input_pipeline.create_eval_dataset(
      config.data.name, "test", preprocessing=config.data.preprocessing, batch_size=grids.num, seed=config.seed,
      max_examples=grids.num, data_dir=config.data.data_dir, target_shape=model.spec.image_shape)
  mean, pairs = grids(params, next(iter(it))["image"], rng)
  if jax.process_index() == 0:
    logging.info("eval step %d: %s", step, "  ".join(f"{k} {v:.4g}" for k, v in summary.items()))
    imgdir = os.path.join(workdir, "images")
    plots.save_image_grid(mean, os.path.join(imgdir, f"samples_{step:08d}.png"))
    plots.save_image_grid(pairs, os.path.join(imgdir, f"reconstructions_{step:08d}.png"),
                          ncols=2 * int(np.ceil(np.sqrt(grids.num))))
    writer.write_images(step, {"samples": mean, "reconstructions": pairs})
  return summary


def _model_section(config_json: str) -> str:
  return json.dumps(json.loads(config_json).get("model"), sort_keys=True)


def _write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  path = os.path.join(workdir, ckpt.CONFIG_FILE)
  with open(path + ".tmp", "w") as f:
    f.write(_config_json(config))
  os.replace(path + ".tmp", path)


def _fmt_time(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
