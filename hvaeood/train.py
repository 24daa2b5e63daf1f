"""Training: data-parallel jit over a device mesh, paper schedules, orbax auto-resume, logging.

`train_and_evaluate(config, workdir)` is the whole run. It is resumable at any point: the state (parameters,
EMA, optimiser, step, skip counters, base PRNG key) is checkpointed with orbax; the data position is a function
of the step (the input pipeline can start at any step) and per-step randomness is `fold_in(key, step)`, so a
resumed run continues exactly the run it resumes. Every decision that leads to a collective (save, evaluate,
stop) is the same on every process at the same step (`run_control`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import time
from typing import Any, Iterator, Optional

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hvaeood import bounds
from hvaeood import checkpoints as ckpt
from hvaeood import datasets_info
from hvaeood import devices
from hvaeood import io_utils
from hvaeood import ood_metrics
from hvaeood import plots
from hvaeood import run_control
from hvaeood import scoring
from hvaeood import state as state_lib
from hvaeood.errors import CheckpointError, TrainingError
from hvaeood.models import blocks
from hvaeood.workdir_lock import WorkdirLock

Array = jax.Array


# ---------------------------------------------------------------------------------------------------------------
# Evaluation during training


def evaluate_model(model: nn.Module, params, config: ml_collections.ConfigDict, mesh: Mesh, rng: Array,
                   datasets: list[str]) -> dict[str, dict[str, np.ndarray]]:
  """Single-sample ELBO and every L^{>k} for the test split of each dataset (per-example arrays, file order)."""
  from hvaeood import input_pipeline  # pylint: disable=import-outside-toplevel  (TensorFlow, imported late)
  ks = tuple(range(model.spec.num_layers))
  sharding = NamedSharding(mesh, P("data"))
  fn = scoring.make_bounds_fn(model, mesh, iw_samples=1, iw_samples_k=1, ks=ks, max_rows=None,
                              precision=state_lib.eval_precision(config))
  local_batch = devices.padded_batch_size(config.eval.batch_size, mesh) // jax.process_count()
  results = {}
  for i, name in enumerate(datasets):
    it, _ = input_pipeline.create_eval_dataset(
        name, "test", preprocessing=datasets_info.eval_preprocessing(config, name),
        batch_size=local_batch, seed=config.seed, max_examples=config.eval.max_examples,
        data_dir=config.data.data_dir, process_index=jax.process_index(), process_count=jax.process_count(),
        target_shape=model.spec.image_shape)
    cols, _ = scoring.score_pass(fn, params, it, sharding, jax.random.fold_in(rng, i), local_batch)
    results[name] = {k: cols[k] for k in ("elbo", "lk", "log_px", "kl")}
  return results


def eval_summary(results: dict, in_name: str, num_dims: int) -> dict[str, float]:
  """Scalar validation metrics: ELBO, bits/dim, every L^{>k}, and AUROC of -L^{>k} and LLR^{>k} per OOD set."""
  r = results[in_name]
  out = {"eval_elbo": float(np.mean(r["elbo"])),
         "eval_bits_per_dim": float(bounds.bits_per_dim(np.mean(r["elbo"]), num_dims)),
         "eval_log_px": float(np.mean(r["log_px"]))}
  for i, kl in enumerate(r["kl"]):
    out[f"eval_kl_z{i + 1}"] = float(np.mean(kl))
  for k, lk in enumerate(r["lk"]):
    out[f"eval_L>{k}"] = float(np.mean(lk))
  scores = lambda d: {s: v for k in range(1, r["lk"].shape[0])
                      for s, v in ((f"LLR>{k}", d["elbo"] - d["lk"][k]), (f"L>{k}", -d["lk"][k]))}
  oods = {n: scores(o) for n, o in results.items() if n != in_name}
  if not oods or r["lk"].shape[0] < 2:  # no OOD set, or one stage (no k >= 1)
    return out
  for name, per_score in ood_metrics.ood_table(scores(r), oods, seed=0).items():
    for score, m in per_score.items():
      out[f"eval_auroc_{score}_{name}"] = float(m["auroc"])
  return out


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
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel  (multi-process only)
    available = np.asarray(multihost_utils.broadcast_one_to_all(available))
  for name, ok in zip(candidates, available):
    if not ok:
      logging.warning("OOD set %s (config.eval.ood_datasets) is not prepared in %s, so the in-training "
                      "evaluation skips it. To prepare it: %s", name, datasets_info.data_dir_description(data_dir),
                      datasets_info.prepare_command(name, data_dir))
  return [in_name] + [n for n, ok in zip(candidates, available) if ok]


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
    mean = devices.host_local(self._samples(params, rng))
    recon = devices.host_local(self._recon(params, np.asarray(x, np.float32), rng))
    pairs = np.stack([x, recon], axis=1).reshape((2 * len(x),) + x.shape[1:])
    return mean, pairs


# ---------------------------------------------------------------------------------------------------------------
# The run


def total_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  return config.train.num_steps if config.train.num_steps > 0 else config.schedule.epochs * steps_per_epoch


def _config_json(config: ml_collections.ConfigDict) -> str:
  return config.to_json_best_effort(sort_keys=True)


def _model_section(config_json: str) -> str:
  """The config's model section without the fields that choose how it runs (a run may resume on another backend)."""
  model = json.loads(config_json).get("model") or {}
  return json.dumps({k: v for k, v in model.items() if k not in blocks.EXECUTION_FIELDS}, sort_keys=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming from the workdir's latest good checkpoint) and evaluates periodically.

  Returns:
    A summary dict: final step, last training metrics, last evaluation metrics, images/sec, stop reason.
  """
  if config.train.distributed:
    jax.distributed.initialize(**_distributed_kwargs(config))
  datasets_info.validate_config(config)
  state_lib.train_precision(config)
  state_lib.eval_precision(config)
  bounds.check_granularity(config.schedule.free_nats_granularity)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  lock = WorkdirLock(workdir)
  if jax.process_index() == 0:
    lock.acquire()
  try:
    return _run(config, workdir)
  finally:
    if jax.process_index() == 0:
      lock.release()


def _distributed_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """jax.distributed.initialize arguments from config.train (optional fields; None = let JAX detect them).

  TPU pods, SLURM, Open MPI and Kubernetes are detected by JAX itself. Elsewhere, e.g. several CPU processes on one
  machine, set config.train.coordinator_address ('host:port' of process 0), num_processes and process_id.
  """
  names = ("coordinator_address", "num_processes", "process_id")
  return {k: config.train.get(k) for k in names if config.train.get(k) is not None}


@dataclasses.dataclass
class _Run:
  """What a run holds while it trains: set up by `_setup`, advanced by the loop."""
  config: ml_collections.ConfigDict
  workdir: str
  mesh: Mesh
  model: nn.Module
  steps_per_epoch: int
  num_steps: int
  manager: Any
  best_manager: Any
  train_step: Any
  mask: tuple  # () or (the global mask of a padded batch,)
  local_rows: int
  data: Iterator
  writer: Any
  grids: ImageGrids
  eval_sets: list[str]
  state: Any = None
  step: int = 0
  start_step: int = 0
  elapsed: float = 0.0  # training seconds (evaluation and checkpointing excluded), kept across resumes
  best_elbo: Optional[float] = None
  last_metrics: dict = dataclasses.field(default_factory=dict)
  last_eval: dict = dataclasses.field(default_factory=dict)
  last_log: tuple = (0.0, 0)  # (time, step) of the last logged step
  stop_reason: str = "completed"

  def meta(self, step: int) -> dict:
    return {"config": _config_json(self.config), "step": int(step), "train_seconds": self.elapsed,
            "best_eval_elbo": self.best_elbo, "steps_per_epoch": self.steps_per_epoch}

  def save(self, manager=None) -> None:
    ckpt.save(manager or self.manager, self.step, self.state, self.meta(self.step))


def _restore(config, workdir: str, manager, replicated) -> Optional[tuple]:
  """(step, state, train seconds, best ELBO) of the workdir's latest good checkpoint, or None."""
  restored = ckpt.restore_latest_good(manager, state_lib.abstract_train_state(config, replicated))
  if restored is None:
    return None
  step, state, meta = restored
  if meta.get("config") is not None and _model_section(meta["config"]) != _model_section(_config_json(config)):
    raise CheckpointError(
        f"The checkpoint in {workdir} was trained with a different model config than the one given. Use the "
        "same config to resume, or a new --workdir.")
  logging.info("Resumed from step %d of %s.", step, workdir)
  return step, state, float(meta.get("train_seconds", 0.0)), meta.get("best_eval_elbo")


def _setup(config: ml_collections.ConfigDict, workdir: str) -> _Run:
  """Mesh, model, checkpoints (resumed if any), the jitted step, the data, the writer and the image grids."""
  from hvaeood import input_pipeline  # pylint: disable=import-outside-toplevel  (TensorFlow, imported late)
  from hvaeood import logging_utils  # pylint: disable=import-outside-toplevel  (CLU imports TensorFlow)
  mesh = devices.make_mesh()
  batch = config.train.batch_size
  padded = state_lib.check_batch(batch, mesh)
  if padded != batch:
    logging.info("The global batch of %d is padded to %d rows for %d devices; the padding is masked out of the "
                 "loss and the metrics.", batch, padded, mesh.devices.size)
  model = state_lib.model_for_config(config)
  spe = input_pipeline.steps_per_epoch(config, jax.process_count())
  manager = ckpt.make_manager(os.path.join(workdir, ckpt.CHECKPOINT_DIR), keep=config.checkpoint.keep)
  restored = _restore(config, workdir, manager, NamedSharding(mesh, P()))
  if jax.process_index() == 0:  # only once the checkpoints are known to fit: never overwrite a run's own config
    io_utils.write_text(os.path.join(workdir, ckpt.CONFIG_FILE), _config_json(config))
  local_rows = padded // jax.process_count()
  # The mask of a padded batch is the same every step: built once, passed as the step's third argument.
  mask = () if padded == batch else (devices.to_global(np.arange(local_rows) < batch // jax.process_count(),
                                                       NamedSharding(mesh, P("data"))),)
  start = restored[0] if restored else 0
  data = iter(input_pipeline.create_train_iterator(config, seed=config.seed, process_index=jax.process_index(),
                                                   process_count=jax.process_count(), start_step=start))
  run = _Run(config, workdir, mesh, model, spe, total_steps(config, spe), manager,
             ckpt.make_manager(os.path.join(workdir, ckpt.BEST_DIR), keep=1),
             state_lib.jit_train_step(config, model, spe, mesh, masked=bool(mask)), mask, local_rows, data,
             logging_utils.create_writer(workdir),
             ImageGrids(model, mesh, config.eval.num_samples, state_lib.eval_precision(config)), eval_datasets(config))
  if restored:
    run.step, run.state, run.elapsed, run.best_elbo = restored
  else:  # data-dependent init on the first training batch, which is then also the first step's batch
    first = next(data)
    run.data = itertools.chain([first], data)
    run.state = state_lib.init_state(config, model, first["image"], mesh, padded=padded != batch)
  run.start_step, run.last_log = run.step, (time.time(), run.step)
  return run


def _run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  from clu import periodic_actions  # pylint: disable=import-outside-toplevel  (CLU imports TensorFlow)
  run = _setup(config, workdir)
  report = periodic_actions.ReportProgress(num_train_steps=run.num_steps, writer=run.writer, every_secs=60.0)
  with run_control.Preemption() as preempt:
    control = run_control.RunControl(
        sync_every=config.train.get("sync_every_steps", 10), budget_seconds=config.train.time_budget_minutes * 60,
        checkpoint_every_seconds=60.0 * config.checkpoint.every_minutes, preemption=preempt)
    while run.step < run.num_steps:
      metrics = _train_step(run)
      decision = control.poll(run.step, run.elapsed)
      if decision.train_seconds is not None:
        run.elapsed = decision.train_seconds  # process 0's clock, on every process
      report(run.step)
      _log(run, metrics)
      if _checkpoint_and_evaluate(run, decision):
        control.checkpoint_saved()
      if decision.preempted or decision.out_of_time:
        run.stop_reason = ("preempted (SIGTERM): checkpoint saved" if decision.preempted else
                           f"time budget of {config.train.time_budget_minutes:g} min reached")
        break
  return _finish(run)


def _train_step(run: _Run) -> dict:
  """One training step (the metrics stay on the device until logged); stops the run after too many skips."""
  t0 = time.time()
  batch = next(run.data)
  x = devices.to_global(devices.pad_rows(batch["image"], run.local_rows), NamedSharding(run.mesh, P("data")))
  previous = run.last_metrics.get("_consecutive_skips")
  run.state, metrics = run.train_step(run.state, x, *run.mask)
  run.step += 1
  # The previous step's skip counter, read while this step runs. It is replicated, so every process stops at
  # the same step.
  if previous is not None and int(previous) >= run.config.optim.max_consecutive_skips:
    run.save()
    run.manager.wait_until_finished()
    raise TrainingError(
        f"{int(previous)} consecutive updates were skipped (non-finite or over-threshold gradients) at step "
        f"{run.step}; the run stopped. Lower --config.optim.lr, enable --config.optim.grad_clip, or check the "
        "data for NaNs. The last checkpoint holds the last good parameters.")
  run.last_metrics["_consecutive_skips"] = metrics["consecutive_skips"]
  run.elapsed += time.time() - t0
  return metrics


def _log(run: _Run, metrics: dict) -> None:
  """Writes the step's scalars every `log_every_steps` steps (and the last step), with training images/s."""
  if run.step % run.config.train.log_every_steps and run.step != run.num_steps:
    return
  m = jax.device_get(metrics)
  now = time.time()
  ips = (run.step - run.last_log[1]) * run.config.train.batch_size / max(now - run.last_log[0], 1e-9)
  run.last_log = (now, run.step)
  scalars = {f"train_{k}": float(v) for k, v in m.items()}
  scalars["train_images_per_sec"] = ips
  run.writer.write_scalars(run.step, scalars)
  run.last_metrics.update(scalars)


def _checkpoint_and_evaluate(run: _Run, decision: run_control.Decision) -> bool:
  """Evaluates (and keeps the best checkpoint) and saves at their cadences; True if a checkpoint was saved."""
  c = run.config
  done = run.step >= run.num_steps or decision.out_of_time or decision.preempted
  eval_every = (c.train.eval_every_steps if c.train.eval_every_steps > 0 else
                max(1, int(round(c.eval.every_epochs * run.steps_per_epoch))))
  if run.step % eval_every == 0 or (done and not decision.preempted):
    run.last_eval = _evaluate_and_log(run)
    if run.last_eval and (run.best_elbo is None or run.last_eval["eval_elbo"] > run.best_elbo):
      run.best_elbo = run.last_eval["eval_elbo"]
      run.save(run.best_manager)
  if run.step % c.checkpoint.every_steps == 0 or done or decision.save_for_time:
    run.save()
    return True
  return False


def _evaluate_and_log(run: _Run) -> dict[str, float]:
  """Validation bounds and image grids of the evaluated parameters (EMA when kept). Every process runs the
  jitted calls; process 0 logs and writes the files."""
  from hvaeood import input_pipeline  # pylint: disable=import-outside-toplevel  (TensorFlow, imported late)
  c, model = run.config, run.model
  params = run.state.ema_params if run.state.ema_params is not None else run.state.params
  rng = jax.random.fold_in(jax.random.PRNGKey(c.seed + 1), run.step)
  results = evaluate_model(model, params, c, run.mesh, rng, run.eval_sets)
  summary = eval_summary(results, datasets_info.canonical(c.data.name), math.prod(model.spec.image_shape))
  run.writer.write_scalars(run.step, summary)
  # Reconstructions: the first test images (the same on every process), each beside the mean of p(x|z), z ~ q(z|x).
  it, _ = input_pipeline.create_eval_dataset(
      c.data.name, "test", preprocessing=c.data.preprocessing, batch_size=run.grids.num, seed=c.seed,
      max_examples=run.grids.num, data_dir=c.data.data_dir, target_shape=model.spec.image_shape)
  mean, pairs = run.grids(params, next(iter(it))["image"], rng)
  if jax.process_index() == 0:
    imgdir = os.path.join(run.workdir, "images")
    ncols = 2 * int(np.ceil(np.sqrt(run.grids.num)))
    plots.save_image_grid(mean, os.path.join(imgdir, f"samples_{run.step:08d}.png"))
    plots.save_image_grid(pairs, os.path.join(imgdir, f"reconstructions_{run.step:08d}.png"), ncols=ncols)
    as_image = lambda g: g[..., None] if g.ndim == 2 else g  # [H, W, C] for TensorBoard
    run.writer.write_images(run.step, {"samples": as_image(plots.image_grid(mean)),
                                       "reconstructions": as_image(plots.image_grid(pairs, ncols=ncols))})
  return summary


def _finish(run: _Run) -> dict[str, Any]:
  """Waits for the checkpoints, flushes the writer, writes summary.json (process 0) and returns the summary."""
  run.manager.wait_until_finished()
  run.best_manager.wait_until_finished()
  run.writer.flush()
  train = {k: v for k, v in run.last_metrics.items() if not k.startswith("_")}
  summary = {"step": run.step, "train_seconds": run.elapsed, "stop_reason": run.stop_reason, **train,
             **run.last_eval}
  if jax.process_index() == 0:
    io_utils.write_json(os.path.join(run.workdir, "summary.json"), summary)
    logging.info("Stopped at step %d: %s.", run.step, run.stop_reason)
  return summary
