"""An OOD detector to embed: a trained checkpoint that scores, fits and flags images in memory.

    from hvaeood import OODDetector
    det = OODDetector.from_checkpoint("runs/fmnist")      # workdir or step directory; best checkpoint by default
    s = det.score(images)              # uint8 [N, H, W, C] or [N, H, W] -> {score name: float64 [N]}
    det.fit(in_distribution_images)    # held-in statistics: the fitted scores and the thresholds
    flags = det.is_ood(images, score="LLR>1", keep=0.95)   # bool [N]; keeps 95% of in-distribution inputs
    det.save("runs/fmnist/detector.npz"); det = OODDetector.load("runs/fmnist/detector.npz")

It runs the same pieces as `evaluate`: the images are converted by `image_sources`' rules, preprocessed as the
model's data (`input_pipeline.create_eval_dataset_from_array`, the last batch padded and masked), and scored by
one jitted `scoring.make_bounds_fn` call per batch, sharded over every local device (compiled once per detector:
every batch has the same shape). Scores are oriented as the tables: higher = more OOD (-ELBO, -L>k, LLR>k,
input_complexity and, once fitted, typicality, DoSE and fisher; `ood_scores`).

Randomness: every call re-draws nothing. The binarisation/dequantisation noise of example i and the latent samples
of batch j depend only on the seed, i and j (a call with the same images gives the same scores), as in evaluate's
pass named `NOISE_NAME`.

`fit` stores the fit data's oriented scores (DoSE and fisher leave-one-out: each fit example is scored against
the other ones, as a new input would be); `is_ood(score, keep)` flags the inputs whose score exceeds the
`keep` quantile of them (the smallest fitted score with at least `keep` of the fit data at or below it), so that
a fraction `keep` of in-distribution inputs like the fit data are kept. Fit on held-in data that the model did not
train on where you can (a validation split); training data gives thresholds that keep slightly fewer.
One process: with several JAX processes, score with `evaluate` instead.
"""

from __future__ import annotations

import json
import math
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from hvaeood import datasets_info
from hvaeood import devices
from hvaeood import image_sources
from hvaeood import io_utils
from hvaeood import loading
from hvaeood import ood_scores
from hvaeood import scoring
from hvaeood import state as state_lib

NOISE_NAME = "detector"
FORMAT = "hvaeood.OODDetector/1"


class OODDetector:
  """Scores, fits and flags images with a trained checkpoint (see the module docstring)."""

  def __init__(self, loaded: loading.LoadedCheckpoint, *, batch_size: int = 500, iw_samples: int = 1,
               iw_samples_k: int = 1, ks: Optional[Sequence[int]] = None, seed: int = 0, precision: str = "highest",
               prior_sample: bool = False, max_rows: Optional[int] = None, resize: bool = False):
    if jax.process_count() > 1:
      raise ValueError("OODDetector runs in one process; with several JAX processes use evaluate.evaluate.")
    for flag, v in (("batch_size", batch_size), ("iw_samples", iw_samples), ("iw_samples_k", iw_samples_k)):
      if not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{flag} must be a positive integer, got {v!r}.")
    devices.check_precision(precision, "precision")
    self.loaded, self.config = loaded, loaded.config
    self.model = state_lib.model_for_config(self.config)
    self.ks = scoring.parse_ks(ks, self.model.spec.num_layers)
    self.image_shape = tuple(int(d) for d in self.model.spec.image_shape)
    self.settings = dict(batch_size=int(batch_size), iw_samples=int(iw_samples), iw_samples_k=int(iw_samples_k),
                         ks=list(self.ks), seed=int(seed), precision=precision, prior_sample=bool(prior_sample),
                         max_rows=max_rows, resize=bool(resize))
    self._mesh = devices.make_mesh()
    self._batch = devices.padded_batch_size(batch_size, self._mesh)
    self._params = devices.replicate(loaded.params, NamedSharding(self._mesh, P()))
    self._fn = scoring.make_bounds_fn(self.model, self._mesh, iw_samples=iw_samples, iw_samples_k=iw_samples_k,
                                      ks=self.ks, max_rows=max_rows, prior_sample=prior_sample, precision=precision)
    self.fit_state: Optional[ood_scores.FitState] = None
    self.fitted_scores: dict[str, np.ndarray] = {}

  @classmethod
  def from_checkpoint(cls, path: str, *, which: Optional[str] = None, use_ema: bool = True,
                      **kwargs) -> "OODDetector":
    """A detector of a training workdir (its best checkpoint by default, else the latest; `which` chooses) or of
    one checkpoint step directory; EMA parameters where the checkpoint has them (`use_ema`). `kwargs` are the
    constructor's (batch_size, iw_samples, iw_samples_k, ks, seed, precision, prior_sample, max_rows, resize)."""
    if which is not None and which not in loading.WHICH:
      raise ValueError(f"which must be 'best' or 'latest' (or None: best where the workdir has one), got {which!r}.")
    return cls(loading.load_for_eval(path, which=which, use_ema=use_ema), **kwargs)

  @property
  def score_names(self) -> list[str]:
    """The names `score` returns, in table order."""
    suite = ("input_complexity",) + (ood_scores.FITTED_SCORES if self.fit_state is not None else ())
    return scoring.score_names(self.ks, suite=suite)

  def statistics(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """The raw per-example statistics of `images` (evaluate's scores.npz entries: ELBO, L>k, LLR>k, log_px, kl
    [N, L], png_bits), in nats, not sign-flipped."""
    from hvaeood import input_pipeline  # pylint: disable=import-outside-toplevel  (TensorFlow, imported late)
    x = image_sources.conform_array(images, self.image_shape, resize=self.settings["resize"])
    s = self.settings
    it, _ = input_pipeline.create_eval_dataset_from_array(
        x, NOISE_NAME, "any", preprocessing=datasets_info.eval_preprocessing(self.config, NOISE_NAME),
        batch_size=self._batch, seed=s["seed"])
    cols, _ = scoring.score_pass(self._fn, self._params, it, NamedSharding(self._mesh, P("data")),
                                 scoring.pass_key(s["seed"], NOISE_NAME), self._batch)
    return scoring.raw_scores(cols, self.ks)

  def _oriented(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    scoring.add_suite_scores(raw, self.fit_state, self.ks, math.prod(self.image_shape))
    return {k: np.asarray(v, np.float64) for k, v in scoring.oriented_scores(raw, self.ks).items()}

  def score(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """{score name: float64 [N]} of uint8 images [N, H, W, C] (or [N, H, W]); higher = more OOD."""
    return self._oriented(self.statistics(images))

  def fit(self, images: np.ndarray) -> "OODDetector":
    """Fits the fitted scores (typicality, DoSE, fisher) on held-in images and keeps every score of them for the
    thresholds of `is_ood`. Returns the detector."""
    raw = self.statistics(images)
    self.fit_state = ood_scores.fit(raw, ood_scores.statistics_ks(self.ks))
    fitted = self._oriented(raw)
    # The fit data scored as new data: DoSE and fisher leave each example's own kernel / count out.
    fitted["DoSE"] = ood_scores.dose(self.fit_state, raw, leave_one_out=True)
    fitted["fisher"] = ood_scores.fisher(self.fit_state, raw, leave_one_out=True)
    self.fitted_scores = {k: np.sort(v) for k, v in fitted.items()}
    return self

  def threshold(self, score: str = "LLR>1", keep: float = 0.95) -> float:
    """The score above which an input is flagged: the `keep` quantile of the fit data's scores."""
    if not self.fitted_scores:
      raise ValueError("The detector is not fitted: call fit(in_distribution_images) (or OODDetector.load) first.")
    if score not in self.fitted_scores:
      raise ValueError(f"Unknown score {score!r}; choose one of {', '.join(self.fitted_scores)}.")
    if not 0.0 < keep <= 1.0:
      raise ValueError(f"keep must be in (0, 1], the fraction of in-distribution inputs kept; got {keep!r}.")
    fitted = self.fitted_scores[score]
    return float(fitted[max(0, math.ceil(keep * len(fitted)) - 1)])

  def is_ood(self, images: np.ndarray, score: str = "LLR>1", keep: float = 0.95) -> np.ndarray:
    """bool [N]: True where the score exceeds `threshold(score, keep)`."""
    limit = self.threshold(score, keep)
    return self.score(images)[score] > limit

  def save(self, path: str) -> str:
    """Writes the fitted state (and the checkpoint's path and the settings) to `path` (.npz), atomically."""
    if self.fit_state is None:
      raise ValueError("Nothing to save: the detector is not fitted (call fit first).")
    meta = dict(format=FORMAT, checkpoint=self.loaded.path, parameters=self.loaded.parameters, **self.settings)
    arrays = {f"fit/{k}": v for k, v in self.fit_state.to_arrays().items()}
    arrays.update({f"scores/{k}": v for k, v in self.fitted_scores.items()})
    arrays["meta"] = np.array(json.dumps(meta))
    path = path if path.endswith(".npz") else path + ".npz"

    def write(tmp: str) -> None:
      with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    io_utils.atomic_write(path, write)
    return path

  @classmethod
  def load(cls, path: str, checkpoint: Optional[str] = None) -> "OODDetector":
    """A fitted detector saved by `save`, on the checkpoint it was fitted with (or on `checkpoint`)."""
    try:
      with np.load(path, allow_pickle=False) as f:
        data = {k: f[k] for k in f.files}
      meta = json.loads(str(data.pop("meta")))
    except (OSError, ValueError, KeyError) as e:
      raise ValueError(f"{path}: not a detector file saved by OODDetector.save ({type(e).__name__}: {e}).") from None
    if meta.get("format") != FORMAT:
      raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}; fit and save it again.")
    settings = {k: meta[k] for k in ("batch_size", "iw_samples", "iw_samples_k", "ks", "seed", "precision",
                                     "prior_sample", "max_rows", "resize")}
    det = cls.from_checkpoint(checkpoint or meta["checkpoint"], use_ema=meta["parameters"] == "EMA", **settings)
    det.fit_state = ood_scores.FitState.from_arrays({k[4:]: v for k, v in data.items() if k.startswith("fit/")})
    det.fitted_scores = {k[7:]: v for k, v in data.items() if k.startswith("scores/")}
    return det

