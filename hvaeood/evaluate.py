"""OOD evaluation of a trained checkpoint: per-example bounds, the paper's metrics, tables and plots.

`evaluate(checkpoint, output_dir, ...)` is what `python evaluate.py` runs. It loads the checkpoint (the model
config and the in-distribution dataset come from it), scores every example of the in-distribution split, a
second, independently re-drawn pass of it (the sanity row) and each OOD set, and writes to `output_dir`:

* `scores.npz`   per-example raw scores, keys `<dataset>/<score>`: `ELBO` (importance-weighted with S samples),
                 `L>k`, `LLR>k` (every requested k, including k = 0), `log_px` (averaged over the ELBO's S
                 samples) and `kl` ([N, L] per-layer KL, same averaging), in nats, not sign-flipped; `png_bits`
                 (the PNG length of each scored image, bits) and the suite's scores below (oriented).
* `roc.png`, `hist.png`  ROC curves per OOD set; histograms of the raw scores in vs OOD.
* `results.md`   the paper-style table (AUROC / AUPRC / FPR80 per OOD set, one row per score) and the settings.
* `results.json` written last, so a directory without it holds no finished run.

OOD sets (`ood`): registry names as before, or any source `image_sources.parse` accepts (a folder of PNG/JPEG
images, an .npy/.npz file of uint8 images, `tfds:NAME[/CONFIG][:SPLIT]`), read in full before anything is
written, converted by its stated rules (`resize` only when asked) and preprocessed as the in-distribution data;
a folder or file is named by its base name in the tables, and its noise is keyed by that name and `split`.

The score suite (`ood_scores`): besides ELBO, L>k and LLR>k, every table has `input_complexity` (Serra et al.
2020: the ELBO's bits/dim minus the PNG length in bits/dim) and, with `fit_examples` > 0, the scores fitted on the
first `fit_examples` (at most `max_examples`) examples of the in-distribution *train* split (never the evaluated
split): `typicality`,
`DoSE` and `fisher`. The fit pass, `"<in> (fit)"`, is scored like the others (its raw scores are in scores.npz)
but is no row of the table.

Metrics (the paper's protocol): OOD is the positive class; every score is oriented so that higher means more
OOD: `LLR>k` as is, `ELBO` and `L>k` negated. Both sides are subsampled to equal size with a seeded generator.
The sanity row, `"<in> (sanity)"`, compares the in-distribution scores with a second pass over the same examples with fresh
binarisation/dequantisation noise and fresh latent samples; its AUROC should be close to 0.5. With
`train_reference`, the in-distribution *train* split, `"<in> (train split)"`, is scored against it too (the
reference's sanity row), capped at the evaluated split's size.

Randomness. Pass `name` (a dataset name, or `"<in> (sanity)"`) uses the key `pass_key(seed, name)`; batch i
of it uses `fold_in(pass_key, i)`, which `bounds.compute_bounds` folds once more with the chunk index. Data noise
uses `seed` (the sanity pass: `seed + 1`) with the dataset and split folded in (`input_pipeline.eval_noise_key`),
so example i of different sets never shares its binarisation or dequantisation noise. The per-example values
therefore do not depend on which other OOD sets are evaluated.

Parallelism (`scoring`): each batch, padded to a multiple of the devices with the padding masked, is sharded
over all devices and all bounds of a batch come out of one compiled `bounds.compute_bounds` call; with several
processes each feeds its contiguous slice of the split, the scores are gathered in file order on every process
and process 0 writes the files. Process 0 logs each pass's progress (examples done, images/s, ETA) at most every
`progress_every_s` seconds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Any, Optional, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from hvaeood import bounds
from hvaeood import datasets_info
from hvaeood import devices
from hvaeood import image_sources
from hvaeood import io_utils
from hvaeood import loading
from hvaeood import ood_metrics
from hvaeood import ood_scores
from hvaeood import plots
from hvaeood import scoring
from hvaeood import state as state_lib
from hvaeood.errors import DataSourceError

log = logging.getLogger(__name__)

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
SCORES_NPZ = "scores.npz"
ROC_PNG = "roc.png"
HIST_PNG = "hist.png"
SANITY_SUFFIX = " (sanity)"
FIT_SUFFIX = " (fit)"
TRAIN_SUFFIX = " (train split)"
LK_MODES = {False: "conditional-prior mean (reference)", True: "conditional-prior sample (paper)"}


# ---------------------------------------------------------------------------------------------------------------
# Validation that needs no TensorFlow (datasets_info is TF-free), so user errors come before the pipeline loads


def _resolve_dataset(name: str, model_shape: tuple[int, ...]) -> str:
  """Canonical name of a dataset that fits the model; ValueError naming both shapes and the fix otherwise."""
  canonical = datasets_info.canonical(name)
  datasets_info.check_image_shape(canonical, model_shape)
  return canonical


def _check_args(which, iw_samples, iw_samples_k, batch_size, max_examples, max_rows, split, precision,
                fit_examples):
  if which is not None and which not in loading.WHICH:
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
  if not isinstance(fit_examples, (int, np.integer)) or fit_examples < 0:
    raise ValueError(f"--fit_examples must be an integer >= 0 (0: no fitted scores), got {fit_examples!r}.")
  devices.check_precision(precision, "--precision")


def _ood_sources(config, ood: Optional[Sequence[str]], model_shape) -> dict[str, image_sources.Source]:
  """The OOD sets by table name (registry names checked against the model's shape; other sources parsed)."""
  in_name = datasets_info.canonical(config.data.name)
  sources = {}
  for spec in (config.eval.ood_datasets if ood is None else ood):
    source = image_sources.parse(str(spec).strip())
    if source.kind == "registry":
      _resolve_dataset(source.name, model_shape)
    if source.kind == "registry" and source.name == in_name:
      log.warning("Skipping OOD set %s: it is the in-distribution set (the sanity row covers it).", source.name)
    elif source.name in sources and sources[source.name].spec != source.spec:
      raise ValueError(f"--ood: {sources[source.name].spec} and {source.spec} would both be named "
                       f"{source.name!r} in the tables; rename one of them.")
    elif source.name == in_name or source.name.endswith((SANITY_SUFFIX, TRAIN_SUFFIX, FIT_SUFFIX)):
      raise ValueError(f"--ood: {source.spec} would be named {source.name!r}, like the in-distribution rows; "
                       "rename it.")
    else:
      sources[source.name] = source
  if not sources:
    raise ValueError("No OOD dataset to evaluate: pass --ood, e.g. --ood mnist.")
  return sources


def _check_paths(checkpoint: str, output_dir: str, train_reference: bool, split: str, fit_examples: int) -> None:
  if train_reference and split == "train":
    raise ValueError("--train_reference scores the train split against the evaluated one: use it with --split test "
                     "(or validation).")
  if fit_examples and split == "train":
    raise ValueError("--fit_examples fits the suite's scores on the train split, which --split train evaluates: "
                     "pass --fit_examples 0, or evaluate --split test.")
  if not checkpoint:
    raise ValueError("--checkpoint is required: a training workdir or one of its checkpoint step directories.")
  if not output_dir:
    raise ValueError("--output_dir is required: the directory for results.json, results.md, scores.npz and "
                     "the plots.")


def _as_list(value) -> Optional[list]:
  return [s for s in value.split(",") if s.strip()] if isinstance(value, str) else value


# ---------------------------------------------------------------------------------------------------------------
# The evaluation, step by step


@dataclasses.dataclass
class _Plan:
  """Everything fixed before any data is read: the checkpoint, the model, the sets, the output directory."""
  loaded: loading.LoadedCheckpoint
  config: ml_collections.ConfigDict
  model: Any
  ks: tuple[int, ...]
  in_name: str
  ood_names: list[str]
  sources: dict  # OOD table name -> image_sources.Source
  arrays: dict  # OOD table name -> uint8 images of a non-registry source, loaded in `_load_sources`
  references: list[str]
  data_dir: Optional[str]
  out_dir: str
  mesh: Any
  global_batch: int
  opts: dict  # the remaining arguments of `evaluate`


@dataclasses.dataclass
class _Pass:
  """One scoring pass: its name in the tables, its data, and its size."""
  name: str
  dataset: str
  it: Any
  total: int


def _plan(checkpoint: str, output_dir: str, opts: dict) -> _Plan:
  mesh = devices.make_mesh()
  global_batch = devices.padded_batch_size(opts["batch_size"], mesh)
  if global_batch != opts["batch_size"]:
    log.info("Batch %d padded to %d for %d devices (the padding is masked).", opts["batch_size"], global_batch,
             mesh.devices.size)
  loaded = loading.load_for_eval(checkpoint, which=opts["which"], use_ema=opts["use_ema"])
  if opts["use_ema"] and loaded.parameters != "EMA":
    log.info("The checkpoint has no EMA parameters (config.optim.ema_decay = 0); evaluating the raw parameters.")
  if jax.process_index() == 0:
    print(f"Evaluating {loaded.path} (step {loaded.step}, {loaded.which}, {loaded.parameters} parameters).",
          flush=True)
  config = loaded.config
  model = state_lib.model_for_config(config)
  in_name = datasets_info.canonical(config.data.name)
  references = [in_name + SANITY_SUFFIX] + ([in_name + TRAIN_SUFFIX] if opts["train_reference"] else [])
  out_dir = (io_utils.ensure_writable_dir(output_dir, "output_dir", "results.json, results.md, scores.npz and "
                                          "the plots") if jax.process_index() == 0 else os.path.abspath(output_dir))
  data_dir = opts["data_dir"] if opts["data_dir"] is not None else config.data.get("data_dir")
  sources = _ood_sources(config, opts["ood"], tuple(model.spec.image_shape))
  return _Plan(loaded, config, model, scoring.parse_ks(opts["ks"], model.spec.num_layers), in_name,
               list(sources), sources, {}, references, data_dir, out_dir, mesh, global_batch, opts)


def _load_sources(plan: _Plan) -> None:
  """Reads every non-registry OOD source into memory (every process), raising its one-line error before any
  output is written. The processes then agree (one all-gather of each set's size, -1 for a failed read) before
  any collective: a file that one host cannot read, or reads with another number of images, stops every process
  with an error instead of leaving the others waiting."""
  names = [n for n, source in plan.sources.items() if source.kind != "registry"]
  error = None
  for name in names:
    try:
      plan.arrays[name] = image_sources.load(plan.sources[name], tuple(plan.model.spec.image_shape),
                                             resize=plan.opts["resize"], max_examples=plan.opts["max_examples"],
                                             data_dir=plan.data_dir)
    except DataSourceError as e:
      error = e
      break
    log.info("Read %d images of %s (%s).", len(plan.arrays[name]), name, plan.sources[name].spec)
  if jax.process_count() > 1 and names:
    sizes = np.array([[len(plan.arrays[n]) if n in plan.arrays else -1 for n in names]], np.int32)
    every = devices.all_real_rows(sizes)
    if error is None and not (every == every[0]).all():
      bad = [n for n, col in zip(names, every.T) if not (col == col[0]).all()]
      raise DataSourceError(f"The processes read different images for {', '.join(bad)} (sizes by process: "
                            f"{every.T.tolist()}); give every host the same files.")
  if error is not None:
    raise error


def _open_passes(plan: _Plan) -> list[_Pass]:
  """The evaluation iterators of every pass (TensorFlow is imported only now, after every check that needs none)."""
  from hvaeood import input_pipeline  # pylint: disable=import-outside-toplevel  (TensorFlow, imported late)
  o, split, seed = plan.opts, plan.opts["split"], plan.opts["seed"]
  cap = o["max_examples"]
  rows = [(plan.in_name, plan.in_name, split, seed, cap), (plan.references[0], plan.in_name, split, seed + 1, cap)]
  rows += [(n, n, split, seed, cap) for n in plan.ood_names]
  n_in = input_pipeline.num_examples(plan.in_name, split, plan.data_dir)
  if o["train_reference"]:
    rows.append((plan.references[1], plan.in_name, "train", seed, min(n_in, cap or n_in)))
  if o["fit_examples"]:
    fit = min(o["fit_examples"], cap or o["fit_examples"])
    rows.append((plan.in_name + FIT_SUFFIX, plan.in_name, "train", seed + 2, fit))
  common = dict(batch_size=plan.global_batch // jax.process_count(), process_index=jax.process_index(),
                process_count=jax.process_count())
  passes = []
  for name, dataset, pass_split, data_seed, limit in rows:
    preprocessing = datasets_info.eval_preprocessing(plan.config, dataset)
    if dataset in plan.arrays:
      images = plan.arrays[dataset]
      n = min(len(images), limit or len(images))
      it, _ = input_pipeline.create_eval_dataset_from_array(
          images, dataset, pass_split, preprocessing=preprocessing, seed=data_seed, max_examples=n, **common)
    else:
      n = input_pipeline.num_examples(dataset, pass_split, plan.data_dir)
      n = min(n, limit or n)
      it, _ = input_pipeline.create_eval_dataset(
          dataset, pass_split, preprocessing=preprocessing, seed=data_seed, max_examples=n, data_dir=plan.data_dir,
          target_shape=tuple(plan.model.spec.image_shape), **common)
    passes.append(_Pass(name, dataset, it, n))
  return passes


def _remove_stale_results(plan: _Plan) -> None:
  """Every input is checked and readable: the results.json of an earlier run goes before anything is rewritten."""
  stale = os.path.join(plan.out_dir, RESULTS_JSON)
  if jax.process_index() == 0 and os.path.exists(stale):
    log.warning("Removing %s of an earlier run: the outputs are being rewritten.", stale)
    os.remove(stale)


def _compile(plan: _Plan):
  """(compiled bounds function, replicated parameters, compile seconds)."""
  o = plan.opts
  params = devices.replicate(plan.loaded.params, NamedSharding(plan.mesh, P()))
  fn = scoring.make_bounds_fn(plan.model, plan.mesh, iw_samples=o["iw_samples"], iw_samples_k=o["iw_samples_k"],
                              ks=plan.ks, max_rows=o["max_rows"], prior_sample=o["prior_sample"],
                              precision=o["precision"])
  t0 = time.perf_counter()
  x_spec = jax.ShapeDtypeStruct((plan.global_batch,) + tuple(plan.model.spec.image_shape), np.float32,
                                sharding=NamedSharding(plan.mesh, P("data")))
  compiled = fn.lower(params, x_spec, jax.random.PRNGKey(0)).compile()
  seconds = time.perf_counter() - t0
  log.info("Compiled the bounds of a batch of %d (S=%d, S_k=%d, k=%s, precision %s) in %.1f s.", plan.global_batch,
           o["iw_samples"], o["iw_samples_k"], plan.ks, o["precision"], seconds)
  return compiled, params, seconds


def _score(plan: _Plan, passes: list[_Pass], compiled, params) -> tuple[dict, dict]:
  """Per-pass raw scores (the scores.npz entries) and per-pass scoring seconds."""
  scores, seconds = {}, {}
  sharding = NamedSharding(plan.mesh, P("data"))
  for p in passes:
    t0 = time.perf_counter()
    progress = scoring.Progress(p.name, p.total, plan.opts["progress_every_s"])
    cols, _ = scoring.score_pass(compiled, params, p.it, sharding, scoring.pass_key(plan.opts["seed"], p.name),
                                 plan.global_batch // jax.process_count(), progress)
    seconds[p.name] = time.perf_counter() - t0
    scores[p.name] = scoring.raw_scores(cols, plan.ks)
    log.info("Scored %s: mean ELBO %.2f nats.", p.name, float(np.mean(cols["elbo"])))
  return scores, seconds


def _add_suite(plan: _Plan, scores: dict) -> dict[str, float]:
  """The suite's scores (`ood_scores`) of every table pass, fitted on the fit pass when there is one; seconds
  each score took, over all passes (the fit itself counted in `fit`)."""
  fit_name = plan.in_name + FIT_SUFFIX
  seconds = {}
  fit_state = None
  if fit_name in scores:
    t0 = time.perf_counter()
    fit_state = ood_scores.fit(scores[fit_name], ood_scores.statistics_ks(plan.ks))
    seconds["fit"] = time.perf_counter() - t0
  num_dims = math.prod(plan.model.spec.image_shape)
  for name, raw in scores.items():
    if name != fit_name:
      for score, t in scoring.add_suite_scores(raw, fit_state, plan.ks, num_dims).items():
        seconds[score] = seconds.get(score, 0.0) + t
  return seconds


def _save_scores(plan: _Plan, scores: dict) -> None:
  """Writes scores.npz (process 0), then refuses non-finite bounds with a clear error."""
  if jax.process_index() == 0:
    def write(tmp: str) -> None:
      with open(tmp, "wb") as f:
        np.savez(f, **{f"{n}/{k}": v for n, s in scores.items() for k, v in s.items()})
    io_utils.atomic_write(os.path.join(plan.out_dir, SCORES_NPZ), write)
  bad = {n: int(np.count_nonzero(~np.isfinite(s[k]))) for n, s in scores.items()
         for k in scoring.score_names(plan.ks, suite=s)}
  if any(bad.values()):
    worst = max(bad, key=bad.get)
    raise ValueError(f"{bad[worst]} examples of {worst} have non-finite bounds (see {SCORES_NPZ}); the "
                     "checkpoint may have diverged. Evaluate an earlier step directory.")


def _results(plan: _Plan, scores: dict, pass_seconds: dict, suite_seconds: dict, compile_seconds: float):
  """The results dict (results.json) and the oriented scores behind its table."""
  o, loaded, in_name = plan.opts, plan.loaded, plan.in_name
  seconds, images = sum(pass_seconds.values()), sum(len(s["ELBO"]) for s in scores.values())
  in_scores = scoring.oriented_scores(scores[in_name], plan.ks)
  oriented = {n: scoring.oriented_scores(scores[n], plan.ks) for n in plan.ood_names + plan.references}
  full_table = ood_metrics.ood_table(in_scores, oriented, seed=o["seed"])
  table = {s: {m: {k: float(v[k]) for k in ood_metrics.METRIC_KEYS} for m, v in per.items()}
           for s, per in full_table.items()}
  num_dims = math.prod(plan.model.spec.image_shape)
  named = [in_name] + plan.ood_names
  results = {
      "checkpoint": loaded.path, "step": int(loaded.step), "which": loaded.which, "parameters": loaded.parameters,
      "in_distribution": in_name, "iw_samples": int(o["iw_samples"]), "iw_samples_k": int(o["iw_samples_k"]),
      "prior_sample": bool(o["prior_sample"]), "lk_mode": LK_MODES[bool(o["prior_sample"])],
      "precision": o["precision"], "n_examples": int(len(scores[in_name]["ELBO"])), "ood": table,
      "bits_per_dim": {n: float(bounds.bits_per_dim(np.mean(scores[n]["ELBO"]), num_dims)) for n in named},
      "elbo": {n: float(np.mean(scores[n]["ELBO"])) for n in named},
      "wall_seconds": 0.0, "images_per_sec": float(images / max(seconds, 1e-9)),
      "n_examples_by_dataset": {n: int(len(s["ELBO"])) for n, s in scores.items()},
      "n_compared": {n: int(next(iter(per.values()))["n"]) for n, per in full_table.items()},
      "ks": list(plan.ks), "split": o["split"], "seed": int(o["seed"]), "batch_size": int(o["batch_size"]),
      "padded_batch_size": int(plan.global_batch),
      "max_rows": int(bounds.DEFAULT_MAX_ROWS if o["max_rows"] is None else o["max_rows"]),
      "devices": int(plan.mesh.devices.size), "processes": int(jax.process_count()), "images_scored": int(images),
      "scoring_seconds": float(seconds), "compile_seconds": float(compile_seconds),
      "pass_seconds": {n: float(t) for n, t in pass_seconds.items()},
      "suite_seconds": {n: float(t) for n, t in suite_seconds.items()},
      "fit_examples": int(len(scores.get(in_name + FIT_SUFFIX, {}).get("ELBO", ()))),
      "scores": scoring.score_names(plan.ks, suite=scores[in_name]),
  }
  return results, in_scores, oriented


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


def _write_outputs(plan: _Plan, results: dict, scores: dict, in_scores: dict, oriented: dict,
                   t_start: float) -> None:
  """Plots, results.md and, last, results.json (process 0), and the table on stdout."""
  o, out_dir, order = plan.opts, plan.out_dir, results["scores"]
  others = plan.ood_names + plan.references
  plots.plot_roc(ood_metrics.ood_roc_curves(in_scores, oriented, seed=o["seed"]), os.path.join(out_dir, ROC_PNG),
                 title=f"{plan.in_name}: OOD = positive (S={o['iw_samples']}, S_k={o['iw_samples_k']})")
  plots.plot_histograms({k: scores[plan.in_name][k] for k in order}, {n: {k: scores[n][k] for k in order}
                                                                     for n in others},
                        os.path.join(out_dir, HIST_PNG), in_label=plan.in_name, score_order=order)
  settings = {"split": o["split"], "S": o["iw_samples"], "S_k": o["iw_samples_k"], "k": ",".join(map(str, plan.ks)),
              "L>k": results["lk_mode"],
              "examples": ", ".join(f"{n} {v}" for n, v in results["n_examples_by_dataset"].items()),
              "batch": o["batch_size"], "seed": o["seed"], "devices": plan.mesh.devices.size,
              "parameters": plan.loaded.parameters, "precision": o["precision"],
              "fit": (f"first {results['fit_examples']} of {plan.in_name} train" if results["fit_examples"]
                      else "none")}
  results["wall_seconds"] = float(time.perf_counter() - t_start)
  io_utils.write_text(os.path.join(out_dir, RESULTS_MD), _markdown(results, results["ood"], order, settings))
  results["wall_seconds"] = float(time.perf_counter() - t_start)
  io_utils.write_text(os.path.join(out_dir, RESULTS_JSON), json.dumps(results, indent=1))
  print(ood_metrics.format_markdown_table(results["ood"], score_order=order), end="")
  print("bits/dim: " + ", ".join(f"{n} {v:.4f}" for n, v in results["bits_per_dim"].items()))
  print(f"throughput: {results['images_per_sec']:.1f} images/s ({results['images_scored']} images in "
        f"{results['scoring_seconds']:.1f} s after {results['compile_seconds']:.1f} s compile); wall "
        f"{results['wall_seconds']:.1f} s; outputs in {out_dir}", flush=True)


def evaluate(checkpoint: str, output_dir: str, *, which: Optional[str] = None, ood: Optional[Sequence[str]] = None,
             iw_samples: int = 1, iw_samples_k: int = 1, ks: Optional[Sequence[int]] = None,
             split: str = "test", max_examples: Optional[int] = None, batch_size: int = 500, seed: int = 0,
             data_dir: Optional[str] = None, max_rows: Optional[int] = None, use_ema: bool = True,
             prior_sample: bool = False, train_reference: bool = False, precision: str = "highest",
             progress_every_s: float = 30.0, fit_examples: int = 10_000, resize: bool = False) -> dict:
  """Scores the in-distribution split and each OOD set and writes the outputs (see the module docstring).

  Args:
    checkpoint: a training workdir or one checkpoint step directory.
    output_dir: where the outputs go (created if needed).
    which: 'best' or 'latest' checkpoint of a workdir; None: 'best' where the workdir has one (the checkpoint of
      the best in-distribution test ELBO seen during training, as the reference selects), else 'latest'.
    ood: OOD sets (default: the checkpoint config's eval.ood_datasets): registry names, folders of PNG/JPEG
      images, .npy/.npz files of uint8 images (FILE.npz:KEY) or tfds:NAME[/CONFIG][:SPLIT] (`image_sources`).
    iw_samples, iw_samples_k: S, importance samples of the ELBO, and S_k, of each L^{>k}.
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
    progress_every_s: seconds between progress lines of a pass (process 0).
    fit_examples: examples of the in-distribution train split the fitted scores (typicality, DoSE, fisher) are
      fitted on (the first ones, at most `max_examples`; 0: no fitted scores).
    resize: resize the images of folder/array/tfds OOD sets of another size to the model's (PIL bilinear).

  Returns the results dict written to results.json. Raises ValueError (DataSourceError), CheckpointError or
  FileNotFoundError for user errors (bad flags, paths, datasets, shapes, images).
  """
  t_start = time.perf_counter()
  ood, ks = _as_list(ood), _as_list(ks)
  _check_args(which, iw_samples, iw_samples_k, batch_size, max_examples, max_rows, split, precision, fit_examples)
  _check_paths(checkpoint, output_dir, train_reference, split, fit_examples)
  opts = dict(which=which, ood=ood, iw_samples=iw_samples, iw_samples_k=iw_samples_k, ks=ks, split=split,
              max_examples=max_examples, batch_size=batch_size, seed=seed, data_dir=data_dir, max_rows=max_rows,
              use_ema=use_ema, prior_sample=prior_sample, train_reference=train_reference, precision=precision,
              progress_every_s=progress_every_s, fit_examples=int(fit_examples), resize=bool(resize))
  plan = _plan(checkpoint, output_dir, opts)
  _load_sources(plan)
  passes = _open_passes(plan)
  _remove_stale_results(plan)
  compiled, params, compile_seconds = _compile(plan)
  scores, pass_seconds = _score(plan, passes, compiled, params)
  suite_seconds = _add_suite(plan, scores)
  _save_scores(plan, scores)
  results, in_scores, oriented = _results(plan, scores, pass_seconds, suite_seconds, compile_seconds)
  if jax.process_index() == 0:
    _write_outputs(plan, results, scores, in_scores, oriented, t_start)
  else:
    results["wall_seconds"] = float(time.perf_counter() - t_start)
  return results
