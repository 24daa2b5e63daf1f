"""OOD evaluation of a trained checkpoint: per-example bounds, the paper's metrics, tables and plots.

`evaluate(checkpoint, output_dir, ...)` is what `python evaluate.py` runs. It loads the checkpoint (the model
config and the in-distribution dataset come from it), scores every example of the in-distribution split, a
second, independently re-drawn pass of it (the sanity row) and each OOD set, and writes to `output_dir`:

* `scores.npz`   per-example raw scores, keys `<dataset>/<score>`: `ELBO` (importance-weighted with S samples),
                 `L>k`, `LLR>k` (every requested k, including k = 0), `log_px` (averaged over the ELBO's S
                 samples) and `kl` ([N, L] per-layer KL, same averaging). Nats; not sign-flipped.
* `roc.png`, `hist.png`  ROC curves per OOD set; histograms of the raw scores in vs OOD.
* `results.md`   the paper-style table (AUROC / AUPRC / FPR80 per OOD set, one row per score) and the settings.
* `results.json` written last, so a directory without it holds no finished run.

Metrics (SPEC 5): OOD is the positive class; every score is oriented so that higher means more OOD: `LLR>k` as
is, `ELBO` and `L>k` negated. Both sides are subsampled to equal size with a seeded generator. The sanity row,
`"<in> (sanity)"`, compares the in-distribution scores with a second pass over the same examples with fresh
binarisation/dequantisation noise and fresh latent samples; its AUROC should be close to 0.5. With
`train_reference`, the in-distribution *train* split, `"<in> (train split)"`, is scored against it too (the
reference's sanity row), capped at the evaluated split's size.

Randomness. Pass `name` (a dataset name, or `"<in> (sanity)"`) uses the key `pass_key(seed, name)`; batch i
of it uses `fold_in(pass_key, i)`, which `bounds.compute_bounds` folds once more with the chunk index. Data noise
uses `seed` (the sanity pass: `seed + 1`) with the dataset and split folded in (`input_pipeline.eval_noise_key`),
so example i of different sets never shares its binarisation or dequantisation noise. The per-example values
therefore do not depend on which other OOD sets are evaluated.

Parallelism: each batch, padded to a multiple of the devices with the padding masked, is sharded over all
devices (`P('data')`) and all bounds of a batch come out of one
compiled `bounds.compute_bounds` call; with several processes each feeds its contiguous slice of the split,
the scores are gathered in file order on every process and process 0 writes the files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import zlib
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hvaeood import bounds
from hvaeood import cli
from hvaeood import checkpoints as ckpt
from hvaeood import datasets_info
from hvaeood import ood_metrics
from hvaeood import plots
from hvaeood import train as train_lib

log = logging.getLogger(__name__)

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
SCORES_NPZ = "scores.npz"
ROC_PNG = "roc.png"
HIST_PNG = "hist.png"
SANITY_SUFFIX = " (sanity)"
TRAIN_SUFFIX = " (train split)"
LK_MODES = {False: "conditional-prior mean (reference)", True: "conditional-prior sample (paper)"}


# ---------------------------------------------------------------------------------------------------------------
# Small pure helpers (also used by the tests)


def pass_key(seed: int, name: str) -> jax.Array:
  """The PRNG key of one scoring pass; batch i of the pass uses `fold_in(pass_key, i)`."""
  return jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)


def score_names(ks: Sequence[int]) -> list[str]:
  """The scores of the metric table, in table order: ELBO, every L>k, every LLR>k with k >= 1."""
  return ["ELBO"] + [f"L>{k}" for k in ks] + [f"LLR>{k}" for k in ks if k >= 1]


def oriented_scores(raw: dict[str, np.ndarray], ks: Sequence[int]) -> dict[str, np.ndarray]:
  """Scores with higher = more OOD: -ELBO, -L>k, LLR>k (SPEC 5)."""
  out = {}
  for name in score_names(ks):
    out[name] = raw[name] if name.startswith("LLR") else -raw[name]
  return out


def parse_ks(ks: Optional[Sequence[int]], num_layers: int) -> tuple[int, ...]:
  """Sorted unique k values, each in 0..L-1 (default: all of them)."""
  if ks is None or len(ks) == 0:
    return tuple(range(num_layers))
  out = []
  for k in ks:
    try:
      k = int(k)
    except (TypeError, ValueError):
      raise ValueError(f"--k must be a comma-separated list of integers, got {k!r}.") from None
    if not 0 <= k < num_layers:
      raise ValueError(f"k = {k} is out of range: the model has {num_layers} latent layers, so k must be in "
                       f"0..{num_layers - 1}.")
    out.append(k)
  return tuple(sorted(set(out)))


def make_bounds_fn(model, mesh: Mesh, *, iw_samples: int, iw_samples_k: int, ks: tuple[int, ...],
                   max_rows: Optional[int], prior_sample: bool = False, precision: str = "highest") -> Callable:
  """jit of (params, x sharded P('data'), key) -> bounds.Bounds with every output replicated on all devices.

  Replicated outputs let every process read the whole batch's scores without a further collective. Matmuls and
  convolutions run at `precision` (the lowered program carries it, whatever the backend's default).
  """
  replicated = NamedSharding(mesh, P())
  rows = bounds.DEFAULT_MAX_ROWS if max_rows is None else int(max_rows)

  def fn(params, x, key):
    with jax.default_matmul_precision(precision):
      b = bounds.compute_bounds(model, params, x, key, iw_samples=iw_samples, iw_samples_k=iw_samples_k, ks=ks,
                                max_rows=rows, prior_sample=prior_sample)
    return b._replace(ks=())

  return jax.jit(fn, in_shardings=(replicated, NamedSharding(mesh, P("data")), replicated),
                 out_shardings=replicated)


# ---------------------------------------------------------------------------------------------------------------
# Scoring passes


class _Pass:
  """One dataset pass: its iterator (already validated) and where its scores go."""

  def __init__(self, name: str, dataset: str, data_seed: int, it, num_local: int):
    self.name, self.dataset, self.data_seed, self.it, self.num_local = name, dataset, data_seed, it, num_local


def row_owners(sharding: NamedSharding, global_batch: int) -> np.ndarray:
  """The process that feeds each row of a global batch sharded with `sharding`."""
  owner = np.full(global_batch, -1)
  for device, index in sharding.devices_indices_map((global_batch,)).items():
    owner[index[0]] = device.process_index
  return owner


def to_file_order(batches: np.ndarray, owner: np.ndarray, masks: np.ndarray) -> np.ndarray:
  """Per-batch global outputs -> the real examples in file order.

  Each process feeds a contiguous slice of the split (padded at its end), and its local rows land in the global
  batch at the rows it owns, in order (`jax.make_array_from_process_local_data`).

  Args:
    batches: [nb, *lead, B] outputs of each global batch.
    owner: [B] the process of each row (`row_owners`).
    masks: [P, nb, lb] every process's local masks (True = real example).

  Returns:
    [*lead, N] with N = masks.sum(), examples in file order.
  """
  n_proc, nb, local_batch = masks.shape
  perm = np.concatenate([np.flatnonzero(owner == p) for p in range(n_proc)])  # process-major rows
  a = batches[..., perm]
  lead = a.shape[1:-1]
  a = a.reshape((nb,) + lead + (n_proc, local_batch))
  a = np.moveaxis(a, 0, -2)  # [*lead, P, nb, lb]: process p's slice, batch by batch
  return a.reshape(lead + (-1,))[..., masks.reshape(-1)]


def _gather_masks(local_masks: np.ndarray) -> np.ndarray:
  """[nb, lb] local masks -> [P, nb, lb] of all processes."""
  if jax.process_count() == 1:
    return local_masks[None]
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return np.asarray(multihost_utils.process_allgather(local_masks, tiled=False)).reshape(
      (jax.process_count(),) + local_masks.shape)


def score_pass(fn: Callable, params, it, sharding: NamedSharding, key: jax.Array, local_batch: int
               ) -> tuple[dict[str, np.ndarray], int]:
  """Scores every batch of `it` with `fn`; returns the real examples' raw arrays in file order and the batch count.

  Returns:
    ({"elbo": [N], "lk": [K, N], "llr": [K, N], "log_px": [N], "kl": [L, N]}, number of batches).
  """
  outs, masks = [], []
  pending = None
  for i, batch in enumerate(it):
    x = train_lib.to_global(np.asarray(batch["image"], np.float32), sharding)  # padding rows masked below
    result = fn(params, x, np.asarray(jax.random.fold_in(key, i)))
    masks.append(np.asarray(batch["mask"], bool))
    if pending is not None:  # fetch the previous batch while this one runs
      outs.append(jax.device_get(pending))
    pending = result
  if pending is not None:
    outs.append(jax.device_get(pending))
  if not outs:
    raise ValueError("The dataset yielded no batches.")
  owner = row_owners(sharding, local_batch * jax.process_count())
  all_masks = _gather_masks(np.stack(masks))
  cols = {field: to_file_order(np.stack([np.asarray(getattr(o, field)) for o in outs]), owner, all_masks)
          for field in ("elbo", "lk", "llr", "log_px", "kl")}
  return cols, len(outs)


def raw_scores(cols: dict[str, np.ndarray], ks: Sequence[int]) -> dict[str, np.ndarray]:
  """The named per-example arrays of one pass (the entries of scores.npz)."""
  out = {"ELBO": cols["elbo"]}
  for i, k in enumerate(ks):
    out[f"L>{k}"] = cols["lk"][i]
  for i, k in enumerate(ks):
    out[f"LLR>{k}"] = cols["llr"][i]
  out["log_px"] = cols["log_px"]
  out["kl"] = np.ascontiguousarray(cols["kl"].T)  # [N, L]
  return out


# ---------------------------------------------------------------------------------------------------------------
# Output files (all atomic: temp file in the directory, then os.replace)


def _atomic_write(path: str, write: Callable[[Any], None], mode: str = "w") -> None:
  def to_file(tmp: str) -> None:
    with open(tmp, mode) as f:
      write(f)
  plots.atomic_write(path, to_file)


def _prepare_output_dir(output_dir: str) -> str:
  """Creates `output_dir` if needed and proves it writable; a clear ValueError otherwise."""
  return cli.ensure_writable_dir(output_dir, "output_dir",
                                 "results.json, results.md, scores.npz and the plots")


def _markdown(results: dict, table: dict, order: list[str], settings: dict) -> str:
  lines = [f"# OOD detection: {results['in_distribution']} vs {', '.join(n for n in results['ood'])}", "",
           f"Checkpoint `{results['checkpoint']}` (step {results['step']}, {results['which']}; "
           f"{results['parameters']} parameters).", "",
           "Settings: " + ", ".join(f"{k} {v}" for k, v in settings.items()) + ".", "",
           "OOD is the positive class; scores oriented so that higher = more OOD (ELBO and L>k negated, LLR>k "
           "as is); in-distribution and OOD sets subsampled to equal size (seeded).", "",
           ood_metrics.format_markdown_table(table, score_order=order).rstrip(), "",
           "Bits/dim: " + ", ".join(f"{n} {v:.4f}" for n, v in results["bits_per_dim"].items()), "",
           "ELBO (nats): " + ", ".join(f"{n} {v:.2f}" for n, v in results["elbo"].items()), "",
           f"Throughput: {results['images_per_sec']:.1f} images/s over {results['images_scored']} images "
           f"({results['scoring_seconds']:.1f} s scoring after {results['compile_seconds']:.1f} s compiling); "
           f"wall time {results['wall_seconds']:.1f} s."]
  return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Validation that needs no TensorFlow (datasets_info is TF-free), so user errors come before the pipeline loads


def _resolve_dataset(name: str, model_shape: tuple[int, ...]) -> str:
  """Canonical name of a dataset that fits the model; ValueError naming both shapes and the fix otherwise."""
  canonical = datasets_info.canonical(name)
  datasets_info.check_image_shape(canonical, model_shape)
  return canonical


def _check_args(which, iw_samples, iw_samples_k, batch_size, max_examples, max_rows, split, precision):
  if which is not None and which not in ckpt.WHICH:
    raise ValueError(f"--which must be 'best' or 'latest' (or unset: best where the workdir has one), got "
                     f"{which!r}.")
  for flag, v in (("--iw_samples", iw_samples), ("--iw_samples_k", iw_samples_k), ("--batch_size", batch_size)):
    if not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f"{flag} must be a positive integer, got {v!r}.")
  if max_examples is not None and max_examples < 1:
    raise ValueError(f"--max_examples must be >= 1 (or unset for the whole split), got {max_examples}.")
  if max_rows is not None and max_rows < 1:
    raise ValueError(f"--max_rows must be >= 1 (or unset for {bounds.DEFAULT_MAX_ROWS}), got {max_rows}.")
  if not split:
    raise ValueError("--split must name a split, e.g. test.")
  train_lib.check_precision(precision, "--precision")


def _ood_names(config, ood: Optional[Sequence[str]], model_shape) -> list[str]:
  in_name = datasets_info.canonical(config.data.name)
  names = []
  for name in (config.eval.ood_datasets if ood is None else ood):
    name = _resolve_dataset(str(name).strip(), model_shape)
    if name == in_name:
      log.warning("Skipping OOD set %s: it is the in-distribution set (the sanity row covers it).", name)
    elif name not in names:
      names.append(name)
  if not names:
    raise ValueError("No OOD dataset to evaluate: pass --ood, e.g. --ood mnist.")
  return names


# ---------------------------------------------------------------------------------------------------------------
# The evaluation


def evaluate(checkpoint: str, output_dir: str, *, which: Optional[str] = None, ood: Optional[Sequence[str]] = None,
             iw_samples: int = 1, iw_samples_k: int = 1, ks: Optional[Sequence[int]] = None,
             split: str = "test", max_examples: Optional[int] = None, batch_size: int = 500, seed: int = 0,
             data_dir: Optional[str] = None, max_rows: Optional[int] = None, use_ema: bool = True,
             prior_sample: bool = False, train_reference: bool = False, precision: str = "highest") -> dict:
  """Scores the in-distribution split and each OOD set and writes the outputs (see the module docstring).

  Args:
    checkpoint: a training workdir or one checkpoint step directory.
    output_dir: where the outputs go (created if needed).
    which: 'best' or 'latest' checkpoint of a workdir; None: 'best' where the workdir has one (the checkpoint of
      the best in-distribution test ELBO seen during training, as the reference selects), else 'latest'.
    ood: OOD dataset names (default: the checkpoint config's eval.ood_datasets).
    iw_samples: S, importance samples of the ELBO.
    iw_samples_k: S_k, importance samples of each L^{>k}.
    ks: the k of L^{>k} and LLR^{>k} (default: every k in 0..L-1).
    split: the split of every dataset ('test', 'train', 'validation' or a TFDS split name).
    max_examples: cap on the examples of each dataset (the first ones, file order; default: all).
    batch_size: global batch; padded to a multiple of the devices (the padding is masked), so any value works
      on any device count.
    seed: seed of the data noise, the latent samples and the equal-size subsampling.
    data_dir: TFDS data_dir (default: the checkpoint config's data.data_dir).
    max_rows: bound on replicas x batch evaluated at once (memory); default bounds.DEFAULT_MAX_ROWS.
    use_ema: evaluate the EMA parameters when the checkpoint has them.
    prior_sample: L^{>k} with z_{<=k} sampled from the conditional prior (the paper's definition) instead of its
      mean (the reference's code).
    train_reference: also score the in-distribution *train* split against the evaluated split (the reference's
      sanity row), capped at the in-distribution split's size.
    precision: matmul/convolution precision ('highest' by default, so that likelihoods do not depend on a
      backend's default, e.g. bfloat16 passes on TPU or TF32 on recent GPUs).

  Returns:
    The results dict written to results.json.

  Raises:
    ValueError, CheckpointError, FileNotFoundError: user errors (bad flags, paths, datasets, shapes).
  """
  t_start = time.perf_counter()
  if isinstance(ood, str):
    ood = [s for s in ood.split(",") if s.strip()]
  if isinstance(ks, str):
    ks = [s for s in ks.split(",") if s.strip()]
  _check_args(which, iw_samples, iw_samples_k, batch_size, max_examples, max_rows, split, precision)
  if train_reference and split == "train":
    raise ValueError("--train_reference scores the train split against the evaluated one: use it with --split test "
                     "(or validation).")
  if not checkpoint:
    raise ValueError("--checkpoint is required: a training workdir or one of its checkpoint step directories.")
  if not output_dir:
    raise ValueError("--output_dir is required: the directory for results.json, results.md, scores.npz and "
                     "the plots.")
  is_main = jax.process_index() == 0
  mesh = train_lib.make_mesh()
  global_batch = train_lib.padded_batch_size(batch_size, mesh)
  if global_batch != batch_size:
    log.info("Batch %d padded to %d for %d devices (the padding is masked).", batch_size, global_batch,
             mesh.devices.size)

  loaded = ckpt.load_for_eval(checkpoint, which=which, use_ema=use_ema)
  if use_ema and loaded.parameters != "EMA":
    log.info("The checkpoint has no EMA parameters (config.optim.ema_decay = 0); evaluating the raw parameters.")
  if is_main:
    print(f"Evaluating {loaded.path} (step {loaded.step}, {loaded.which}, {loaded.parameters} parameters).",
          flush=True)
  config = loaded.config
  model = train_lib.model_for_config(config)
  model_shape = tuple(model.spec.image_shape)
  ks = parse_ks(ks, model.spec.num_layers)
  in_name = datasets_info.canonical(config.data.name)
  ood_names = _ood_names(config, ood, model_shape)
  if data_dir is None:
    data_dir = config.data.get("data_dir")
  out_dir = _prepare_output_dir(output_dir) if is_main else os.path.abspath(output_dir)

  # The input pipeline (TensorFlow) is imported only now, after every check that needs no data.
  from hvaeood import input_pipeline  # pylint: disable=import-outside-toplevel
  n_proc = jax.process_count()
  local_batch = global_batch // n_proc
  sanity_name, train_name = in_name + SANITY_SUFFIX, in_name + TRAIN_SUFFIX
  plan = [(in_name, in_name, split, seed, max_examples), (sanity_name, in_name, split, seed + 1, max_examples)]
  plan += [(n, n, split, seed, max_examples) for n in ood_names]
  if train_reference:
    n_in = input_pipeline.num_examples(in_name, split, data_dir)
    plan.append((train_name, in_name, "train", seed, min(n_in, max_examples or n_in)))
  passes = []
  for pass_name, dataset, pass_split, data_seed, cap in plan:
    it, num_local = input_pipeline.create_eval_dataset(
        dataset, pass_split, preprocessing=datasets_info.eval_preprocessing(config, dataset),
        batch_size=local_batch, seed=data_seed, max_examples=cap, data_dir=data_dir,
        process_index=jax.process_index(), process_count=n_proc, target_shape=model_shape)
    passes.append(_Pass(pass_name, dataset, data_seed, it, num_local))

  if is_main:
    stale = os.path.join(out_dir, RESULTS_JSON)
    if os.path.exists(stale):
      log.warning("Removing %s of an earlier run: the outputs are being rewritten.", stale)
      os.remove(stale)

  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))
  params = train_lib.replicate(loaded.params, replicated)
  fn = make_bounds_fn(model, mesh, iw_samples=iw_samples, iw_samples_k=iw_samples_k, ks=ks, max_rows=max_rows,
                      prior_sample=prior_sample, precision=precision)
  t0 = time.perf_counter()
  x_spec = jax.ShapeDtypeStruct((global_batch,) + model_shape, np.float32, sharding=batch_sharding)
  compiled = fn.lower(params, x_spec, jax.random.PRNGKey(0)).compile()
  compile_seconds = time.perf_counter() - t0
  log.info("Compiled the bounds of a batch of %d (S=%d, S_k=%d, k=%s, precision %s) in %.1f s.", global_batch,
           iw_samples, iw_samples_k, ks, precision, compile_seconds)

  scores: dict[str, dict[str, np.ndarray]] = {}
  scoring_seconds, images = 0.0, 0
  for p in passes:
    t0 = time.perf_counter()
    cols, nb = score_pass(compiled, params, p.it, batch_sharding, pass_key(seed, p.name), local_batch)
    dt = time.perf_counter() - t0
    scoring_seconds += dt
    images += len(cols["elbo"])
    scores[p.name] = raw_scores(cols, ks)
    log.info("Scored %s: %d examples in %d batches, %.1f s (%.1f images/s); mean ELBO %.2f nats.",
             p.name, len(cols["elbo"]), nb, dt, len(cols["elbo"]) / max(dt, 1e-9), float(np.mean(cols["elbo"])))

  num_dims = math.prod(model_shape)
  order = score_names(ks)
  bad = {n: int(np.count_nonzero(~np.isfinite(s[k]))) for n, s in scores.items() for k in order}
  if is_main:
    _atomic_write(os.path.join(out_dir, SCORES_NPZ),
                  lambda f: np.savez(f, **{f"{n}/{k}": v for n, s in scores.items() for k, v in s.items()}),
                  mode="wb")
  if any(bad.values()):
    worst = max(bad, key=bad.get)
    raise ValueError(f"{bad[worst]} examples of {worst} have non-finite bounds (see {SCORES_NPZ}); the "
                     "checkpoint may have diverged. Evaluate an earlier step directory.")

  references = [sanity_name] + ([train_name] if train_reference else [])
  in_scores = oriented_scores(scores[in_name], ks)
  ood_scores = {n: oriented_scores(scores[n], ks) for n in ood_names + references}
  full_table = ood_metrics.ood_table(in_scores, ood_scores, seed=seed)
  table = {o: {s: {m: float(v[m]) for m in ood_metrics.METRIC_KEYS} for s, v in per.items()}
           for o, per in full_table.items()}
  images_per_sec = images / max(scoring_seconds, 1e-9)
  results = {
      "checkpoint": loaded.path,
      "step": int(loaded.step),
      "which": loaded.which,
      "parameters": loaded.parameters,
      "in_distribution": in_name,
      "iw_samples": int(iw_samples),
      "iw_samples_k": int(iw_samples_k),
      "prior_sample": bool(prior_sample),
      "lk_mode": LK_MODES[bool(prior_sample)],
      "precision": precision,
      "n_examples": int(len(scores[in_name]["ELBO"])),
      "ood": table,
      "bits_per_dim": {n: float(bounds.bits_per_dim(np.mean(scores[n]["ELBO"]), num_dims))
                       for n in [in_name] + ood_names},
      "elbo": {n: float(np.mean(scores[n]["ELBO"])) for n in [in_name] + ood_names},
      "wall_seconds": 0.0,
      "images_per_sec": float(images_per_sec),
      "n_examples_by_dataset": {n: int(len(s["ELBO"])) for n, s in scores.items()},
      "n_compared": {o: int(next(iter(per.values()))["n"]) for o, per in full_table.items()},
      "ks": list(ks),
      "split": split,
      "seed": int(seed),
      "batch_size": int(batch_size),
      "padded_batch_size": int(global_batch),
      "max_rows": int(bounds.DEFAULT_MAX_ROWS if max_rows is None else max_rows),
      "devices": int(mesh.devices.size),
      "processes": int(n_proc),
      "images_scored": int(images),
      "scoring_seconds": float(scoring_seconds),
      "compile_seconds": float(compile_seconds),
  }
  if is_main:
    plots.plot_roc(ood_metrics.ood_roc_curves(in_scores, ood_scores, seed=seed), os.path.join(out_dir, ROC_PNG),
                   title=f"{in_name}: OOD = positive (S={iw_samples}, S_k={iw_samples_k})")
    plots.plot_histograms({k: scores[in_name][k] for k in order},
                          {n: {k: scores[n][k] for k in order} for n in ood_names + references},
                          os.path.join(out_dir, HIST_PNG), in_label=in_name, score_order=order)
    settings = {"split": split, "S": iw_samples, "S_k": iw_samples_k, "k": ",".join(map(str, ks)),
                "L>k": results["lk_mode"],
                "examples": ", ".join(f"{n} {v}" for n, v in results["n_examples_by_dataset"].items()),
                "batch": batch_size, "seed": seed, "devices": mesh.devices.size,
                "parameters": loaded.parameters, "precision": precision}
    results["wall_seconds"] = float(time.perf_counter() - t_start)
    md = _markdown(results, table, order, settings)
    _atomic_write(os.path.join(out_dir, RESULTS_MD), lambda f: f.write(md))
    results["wall_seconds"] = float(time.perf_counter() - t_start)
    _atomic_write(os.path.join(out_dir, RESULTS_JSON), lambda f: json.dump(results, f, indent=1))
    print(ood_metrics.format_markdown_table(table, score_order=order), end="")
    print("bits/dim: " + ", ".join(f"{n} {v:.4f}" for n, v in results["bits_per_dim"].items()))
    print(f"throughput: {images_per_sec:.1f} images/s ({images} images in {scoring_seconds:.1f} s after "
          f"{compile_seconds:.1f} s compile); wall {results['wall_seconds']:.1f} s; outputs in {out_dir}",
          flush=True)
  else:
    results["wall_seconds"] = float(time.perf_counter() - t_start)
  return results
