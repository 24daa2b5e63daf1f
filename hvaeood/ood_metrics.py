"""Threshold-free OOD detection metrics (numpy only).

Conventions (docs/design.md §6):

* labels are binary; **OOD is the positive class (label 1)** and the
 in-distribution reference set has label 0;
* scores are oriented so that **higher means more OOD**.  The caller is
 responsible for orientation (e.g. passing ``-L^{>k}`` rather than ``L^{>k}``);
 nothing here flips signs or assumes the metrics are invariant to negation.

The definitions reproduce scikit-learn's ``roc_curve`` /
``roc_auc_score`` / ``average_precision_score`` exactly (tied scores form a
single operating point), without depending on scikit-learn.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

__all__ = [
  "roc_curve",
  "auroc",
  "auprc",
  "fpr_at_tpr",
  "subsample_to_equal",
  "ood_table",
  "ood_roc_curves",
  "format_markdown_table",
]

METRIC_KEYS = ("auroc", "auprc", "fpr80")


# --------------------------------------------------------------------------- #
# Input validation
# --------------------------------------------------------------------------- #
def _check_scores(scores, name: str = "scores") -> np.ndarray:
  arr = np.asarray(scores)
  if arr.ndim != 1:
    raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
  if arr.size == 0:
    raise ValueError(f"{name} is empty")
  if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
    raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
  arr = arr.astype(np.float64, copy=False)
  bad = int(np.count_nonzero(~np.isfinite(arr)))
  if bad:
    raise ValueError(
      f"{name} contains {bad} non-finite value(s) (NaN/inf) out of {arr.size}"
    )
  return arr


def _check_labels_scores(labels, scores) -> Tuple[np.ndarray, np.ndarray]:
  y = np.asarray(labels)
  if y.ndim != 1:
    raise ValueError(f"labels must be 1-D, got shape {y.shape}")
  s = _check_scores(scores, "scores")
  if y.shape[0] != s.shape[0]:
    raise ValueError(
      f"labels and scores differ in length: {y.shape[0]} vs {s.shape[0]}"
    )
  uniq = np.unique(y)
  if not np.all(np.isin(uniq, (0, 1))):
    raise ValueError(f"labels must be binary 0/1 (or bool), got values {uniq!r}")
  y = y.astype(bool)
  n_pos = int(y.sum())
  if n_pos == 0 or n_pos == y.size:
    raise ValueError(
      "labels must contain both classes (0 = in-distribution, 1 = OOD); "
      f"got {n_pos} positives out of {y.size}"
    )
  return y, s


def _binary_counts(y: np.ndarray, s: np.ndarray):
  """Cumulative (fps, tps, thresholds) at each distinct score, descending.

  Entry i counts all examples with score >= thresholds[i].
  """
  order = np.argsort(-s, kind="mergesort")
  s_sorted = s[order]
  y_sorted = y[order]
  # last index of each run of equal scores
  distinct = np.flatnonzero(np.diff(s_sorted))
  ends = np.r_[distinct, y_sorted.size - 1]
  tps = np.cumsum(y_sorted, dtype=np.int64)[ends]
  fps = (ends + 1) - tps
  return fps, tps, s_sorted[ends]


# --------------------------------------------------------------------------- #
# Metrics
# --------------------------------------------------------------------------- #
def roc_curve(
  labels, scores, drop_intermediate: bool = False
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """ROC curve with one point per distinct score.

  Returns ``(fpr, tpr, thresholds)``.  ``thresholds`` is strictly
  decreasing, starting with ``+inf`` (nothing flagged, the point (0, 0));
  point ``i`` flags every example with ``score >= thresholds[i]``.  The same
  as ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``.

  ``drop_intermediate=True`` additionally removes every interior point that
  is collinear with its two neighbours *and* equally spaced from them (zero
  second difference of both the FP and TP counts), which is what sklearn's
  default ``roc_curve`` does.  The area is unchanged.
  """
  y, s = _check_labels_scores(labels, scores)
  fps, tps, thr = _binary_counts(y, s)
  if drop_intermediate and fps.size > 2:
    interior = (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0)
    keep = np.r_[True, interior, True]
    fps, tps, thr = fps[keep], tps[keep], thr[keep]
  fpr = np.r_[0, fps] / fps[-1]
  tpr = np.r_[0, tps] / tps[-1]
  thresholds = np.r_[np.inf, thr]
  return fpr.astype(np.float64), tpr.astype(np.float64), thresholds


def auroc(labels, scores) -> float:
  """Area under the ROC curve; ties between classes count 1/2.

  Equal to the Mann-Whitney statistic P(s_ood > s_in) + 0.5 P(s_ood = s_in)
  and to ``sklearn.metrics.roc_auc_score``.  Computed exactly from counts
  (no floating-point trapezoid accumulation until the final division).
  """
  y, s = _check_labels_scores(labels, scores)
  fps, tps, _ = _binary_counts(y, s)
  d_fp = np.diff(np.r_[0, fps]).astype(np.float64)
  d_tp = np.diff(np.r_[0, tps]).astype(np.float64)
  tp_before = np.r_[0, tps[:-1]].astype(np.float64)
  # For each group of tied scores: negatives in the group are beaten by all
  # positives with strictly higher scores and tie with the group's positives.
  area = np.sum(d_fp * (tp_before + 0.5 * d_tp))
  return float(area / (float(fps[-1]) * float(tps[-1])))


def auprc(labels, scores) -> float:
  """Average precision with OOD (label 1) as the positive class.

  ``AP = sum_n (R_n - R_{n-1}) * P_n`` over distinct thresholds in
  descending order (tied scores form one step, R_0 = 0), identical to
  ``sklearn.metrics.average_precision_score``.
  """
  y, s = _check_labels_scores(labels, scores)
  fps, tps, _ = _binary_counts(y, s)
  precision = tps / (tps + fps)
  # R_n - R_{n-1} = (new positives in group n) / P; divide once at the end
  d_tp = np.diff(np.r_[0, tps]).astype(np.float64)
  return float(np.sum(d_tp * precision) / float(tps[-1]))


def fpr_at_tpr(
  labels, scores, tpr_level: float = 0.8, drop_intermediate: bool = False
) -> float:
  """FPR at the first ROC point (thresholds descending) with TPR >= level.

  With ``tpr_level=0.8`` this is FPR80: the lowest false positive rate at
  which at least 80% of the OOD examples are caught (docs/design.md §6).

  The reference computes it on sklearn's *default* ROC curve, which drops
  equally spaced collinear points.  Without cross-class ties this makes no
  difference; with ties on a diagonal run the reference can land on a later
  point and report a higher FPR.  Pass ``drop_intermediate=True`` to
  reproduce the reference's number bit-for-bit.
  """
  if not (0.0 <= float(tpr_level) <= 1.0):
    raise ValueError(f"tpr_level must lie in [0, 1], got {tpr_level}")
  fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=drop_intermediate)
  idx = int(np.argmax(tpr >= tpr_level))  # tpr[-1] == 1 so always found
  return float(fpr[idx])


# --------------------------------------------------------------------------- #
# Balancing and tables
# --------------------------------------------------------------------------- #
def subsample_to_equal(n_in: int, n_ood: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
  """Indices giving equal numbers of in-distribution and OOD examples.

  The smaller set is kept whole (``arange``); the larger set is subsampled
  without replacement by a generator seeded with ``seed``.  Returned indices
  are sorted ascending (int64).  With equal sizes no randomness is used.
  """
  n_in, n_ood = int(n_in), int(n_ood)
  if n_in <= 0 or n_ood <= 0:
    raise ValueError(f"both sets must be non-empty, got n_in={n_in}, n_ood={n_ood}")
  m = min(n_in, n_ood)
  rng = np.random.default_rng(seed)

  def pick(n: int) -> np.ndarray:
    if n == m:
      return np.arange(n, dtype=np.int64)
    return np.sort(rng.choice(n, size=m, replace=False)).astype(np.int64)

  return pick(n_in), pick(n_ood)


def _check_score_dict(scores: Mapping[str, np.ndarray], what: str) -> Dict[str, np.ndarray]:
  if not isinstance(scores, Mapping) or len(scores) == 0:
    raise ValueError(f"{what}: expected a non-empty dict of score name -> array")
  out: Dict[str, np.ndarray] = {}
  lengths = {}
  for name, arr in scores.items():
    out[name] = _check_scores(arr, f"{what} score {name!r}")
    lengths[name] = out[name].shape[0]
  if len(set(lengths.values())) > 1:
    raise ValueError(f"{what}: score arrays differ in length: {lengths}")
  return out


def _prepared_pairs(in_scores, ood_scores, seed):
  """Yield (ood_name, score_name, labels, scores, n) with shared subsampling."""
  ins = _check_score_dict(in_scores, "in-distribution")
  if not isinstance(ood_scores, Mapping) or len(ood_scores) == 0:
    raise ValueError("ood_scores: expected a non-empty dict of dataset -> score dict")
  n_in = next(iter(ins.values())).shape[0]
  for ood_name, per_score in ood_scores.items():
    oods = _check_score_dict(per_score, f"OOD set {ood_name!r}")
    missing = [k for k in oods if k not in ins]
    if missing:
      raise ValueError(
        f"OOD set {ood_name!r} has scores {missing} with no in-distribution "
        f"counterpart (available: {list(ins)})"
      )
    n_ood = next(iter(oods.values())).shape[0]
    idx_in, idx_ood = subsample_to_equal(n_in, n_ood, seed)
    n = idx_in.shape[0]
    labels = np.r_[np.zeros(n, dtype=np.int64), np.ones(n, dtype=np.int64)]
    for score_name in [k for k in ins if k in oods]:  # in-dist order
      s = np.r_[ins[score_name][idx_in], oods[score_name][idx_ood]]
      yield ood_name, score_name, labels, s, n


def ood_table(
  in_scores: Mapping[str, np.ndarray],
  ood_scores: Mapping[str, Mapping[str, np.ndarray]],
  seed: int = 0,
  tpr_level: float = 0.8,
  drop_intermediate: bool = False,
) -> Dict[str, Dict[str, Dict[str, float]]]:
  """AUROC / AUPRC / FPR80 for every (OOD set, score).

  ``in_scores[score]`` holds the in-distribution (label 0) test scores,
  ``ood_scores[ood][score]`` the OOD (label 1) scores; all oriented so that
  higher = more OOD.  For each OOD set both sides are subsampled to equal
  size with :func:`subsample_to_equal` (``seed``), using the same indices for
  every score of that pair.  The result does not depend on which other OOD
  sets are in the dict.

  Returns ``table[ood][score] = {"auroc", "auprc", "fpr80", "n"}`` where
  ``n`` is the number of examples *per class* after balancing.
  ``drop_intermediate`` is passed to :func:`fpr_at_tpr` (True reproduces the
  reference's FPR80 exactly when scores are tied).
  """
  table: Dict[str, Dict[str, Dict[str, float]]] = {}
  for ood_name, score_name, y, s, n in _prepared_pairs(in_scores, ood_scores, seed):
    table.setdefault(ood_name, {})[score_name] = {
      "auroc": auroc(y, s),
      "auprc": auprc(y, s),
      "fpr80": fpr_at_tpr(y, s, tpr_level, drop_intermediate),
      "n": int(n),
    }
  return table


def ood_roc_curves(
  in_scores: Mapping[str, np.ndarray],
  ood_scores: Mapping[str, Mapping[str, np.ndarray]],
  seed: int = 0,
) -> Dict[str, Dict[str, Tuple[np.ndarray, np.ndarray]]]:
  """``curves[ood][score] = (fpr, tpr)`` on the same balanced subsets as
  :func:`ood_table`; the input format expected by ``plots.plot_roc``."""
  curves: Dict[str, Dict[str, Tuple[np.ndarray, np.ndarray]]] = {}
  for ood_name, score_name, y, s, _ in _prepared_pairs(in_scores, ood_scores, seed):
    fpr, tpr, _thr = roc_curve(y, s)
    curves.setdefault(ood_name, {})[score_name] = (fpr, tpr)
  return curves


def format_markdown_table(
  table: Mapping[str, Mapping[str, Mapping[str, float]]],
  score_order: Optional[Sequence[str]] = None,
  decimals: int = 3,
) -> str:
  """Paper-style markdown table: one row per score, and AUROC / AUPRC /
  FPR80 columns for each OOD set (in the table's order).  Missing entries
  are shown as ``-``."""
  ood_names: List[str] = list(table)
  if score_order is None:
    seen: Dict[str, None] = {}
    for ood in ood_names:
      for score in table[ood]:
        seen.setdefault(score, None)
    score_order = list(seen)
  header = ["Score"] + [
    f"{ood} {m}" for ood in ood_names for m in ("AUROC", "AUPRC", "FPR80")
  ]
  lines = [
    "| " + " | ".join(header) + " |",
    "|" + "|".join([" --- "] + [" ---: "] * (len(header) - 1)) + "|",
  ]
  for score in score_order:
    cells = [str(score)]
    for ood in ood_names:
      entry = table[ood].get(score)
      for key in METRIC_KEYS:
        if entry is None or key not in entry:
          cells.append("-")
        else:
          cells.append(f"{float(entry[key]):.{decimals}f}")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"
