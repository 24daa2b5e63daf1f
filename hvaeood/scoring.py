"""Scoring: the bounds of every example of a dataset, computed sharded and reassembled in file order.

* `make_bounds_fn`: one jitted call that gives a batch's ELBO and every L^{>k} (`bounds.compute_bounds`), with
  the batch sharded over the mesh and the outputs replicated;
* `score_pass`: every batch of an evaluation iterator through it, the padding dropped and the examples put back
  in file order (each process feeds a contiguous slice of the split), with progress lines;
* the score names and orientation of the OOD tables (higher = more OOD), the suite's scores beyond the paper
  (`ood_scores`) added to a pass's raw scores, and the PRNG key of each pass.

Used by the in-training evaluation (`train`) and `evaluate`.
"""

from __future__ import annotations

import logging
import time
import zlib
from typing import Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hvaeood import bounds
from hvaeood import devices
from hvaeood import ood_scores

log = logging.getLogger(__name__)


def pass_key(seed: int, name: str) -> jax.Array:
  """The PRNG key of one scoring pass; batch i of the pass uses `fold_in(pass_key, i)`."""
  return jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)


def score_names(ks: Sequence[int], suite: Sequence[str] = ()) -> list[str]:
  """The scores of the metric table, in table order: ELBO, every L>k, every LLR>k with k >= 1, then the suite's
  scores present (`ood_scores.SUITE_SCORES` order)."""
  return (["ELBO"] + [f"L>{k}" for k in ks] + [f"LLR>{k}" for k in ks if k >= 1] +
          [n for n in ood_scores.SUITE_SCORES if n in suite])


def oriented_scores(raw: dict[str, np.ndarray], ks: Sequence[int]) -> dict[str, np.ndarray]:
  """Scores with higher = more OOD: -ELBO, -L>k, LLR>k (OOD is the positive class, as the paper's metrics) and
  the suite's scores present in `raw` (already oriented so)."""
  out = {}
  for name in score_names(ks, suite=raw):
    out[name] = raw[name] if name.startswith("LLR") or name in ood_scores.SUITE_SCORES else -raw[name]
  return out


def add_suite_scores(raw: dict[str, np.ndarray], fit_state: Optional[ood_scores.FitState], ks: Sequence[int],
                     num_dims: int) -> dict[str, float]:
  """Adds the suite's scores (`ood_scores.score_all`) to a pass's raw scores, in place: input_complexity from the
  pass's PNG lengths, the fitted ones when `fit_state` is given (fitted with `ood_scores.statistics_ks(ks)`).
  Returns the seconds each score took."""
  seconds = {}
  bits = raw.get("png_bits")
  makers = ood_scores.suite_makers(fit_state, raw, ood_scores.statistics_ks(ks), bits,
                                   None if bits is None else num_dims)
  for name, make in makers.items():
    t0 = time.perf_counter()
    raw[name] = make()
    seconds[name] = time.perf_counter() - t0
  return seconds


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


def _gather_rows(local_masks: np.ndarray) -> np.ndarray:
  """[nb, lb] per-row values of this process (masks, PNG lengths) -> [P, nb, lb] of all processes."""
  return devices.all_real_rows(local_masks[None]).reshape((jax.process_count(),) + local_masks.shape)


class Progress:
  """Progress lines of a scoring pass on process 0: examples done of the total, images/s and ETA, at most every
  `every_s` seconds, and one line when the pass ends."""

  def __init__(self, name: str, total: Optional[int], every_s: float = 30.0, clock=time.monotonic):
    self.name, self.total, self.every_s, self._clock = name, total, every_s, clock
    self._t0 = self._last = clock()
    self.lines: list[str] = []

  def update(self, done: int, final: bool = False) -> None:
    now = self._clock()
    if jax.process_index() != 0 or not (final or now - self._last >= self.every_s):
      return
    self._last = now
    rate = done / max(now - self._t0, 1e-9)
    if final:
      line = f"{self.name}: {done} examples in {now - self._t0:.1f} s ({rate:.1f} images/s)"
    elif self.total:
      eta = max(self.total - done, 0) / max(rate, 1e-9)
      shown = min(done, self.total)
      line = (f"{self.name}: {shown}/{self.total} examples ({100 * shown / self.total:.0f}%), "
              f"{rate:.1f} images/s, ETA {eta:.0f} s")
    else:
      line = f"{self.name}: {done} examples, {rate:.1f} images/s"
    self.lines.append(line)
    log.info("%s", line)


def score_pass(fn: Callable, params, it, sharding: NamedSharding, key: jax.Array, local_batch: int,
               progress: Optional[Progress] = None) -> tuple[dict[str, np.ndarray], int]:
  """Scores every batch of `it` with `fn`; returns the real examples' raw arrays in file order and the batch count.

  Returns:
    ({"elbo": [N], "lk": [K, N], "llr": [K, N], "log_px": [N], "kl": [L, N]} and "png_bits": [N] when the
    batches carry it (the compressed length of each image, `input_pipeline`), number of batches).
  """
  outs, masks, png = [], [], []
  pending = None
  real = 0  # real examples of the batches fetched so far, all processes (each feeds equal slices)
  for i, batch in enumerate(it):
    x = devices.to_global(np.asarray(batch["image"], np.float32), sharding)  # padding rows masked below
    result = fn(params, x, np.asarray(jax.random.fold_in(key, i)))
    masks.append(np.asarray(batch["mask"], bool))
    if "png_bits" in batch:
      png.append(np.asarray(batch["png_bits"], np.float32))
    if pending is not None:  # fetch the previous batch while this one runs
      outs.append(jax.device_get(pending))
      real += int(masks[-2].sum()) * jax.process_count()
      if progress is not None:
        progress.update(real)
    pending = result
  if pending is not None:
    outs.append(jax.device_get(pending))
  if not outs:
    raise ValueError("The dataset yielded no batches.")
  owner = row_owners(sharding, local_batch * jax.process_count())
  all_masks = _gather_rows(np.stack(masks))
  cols = {field: to_file_order(np.stack([np.asarray(getattr(o, field)) for o in outs]), owner, all_masks)
          for field in ("elbo", "lk", "llr", "log_px", "kl")}
  if png:  # host-side per-example values of each process's rows: gathered like the masks, in file order
    cols["png_bits"] = _gather_rows(np.stack(png))[all_masks].astype(np.float64)
  if progress is not None:
    progress.update(len(cols["elbo"]), final=True)
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
  if "png_bits" in cols:
    out["png_bits"] = cols["png_bits"]
  return out
