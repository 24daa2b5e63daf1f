"""OOD scores beyond the paper's LLR, from the per-example statistics a trained model already gives (numpy/scipy).

Every score is oriented so that higher = more OOD (docs/design.md §6). Nothing here imports JAX or TensorFlow:
the input is what `evaluate` writes to scores.npz for one dataset (nats, not sign-flipped),

  raw = {"ELBO": [N], "L>k": [N] and "LLR>k": [N] for each k in ks, "log_px": [N] (log p(x|z)),
         "kl": [N, L] (the per-layer KL)}.

Statistics (DoSE and fisher). s(x) = (log p(x|z), KL_1 .. KL_L, L^{>k} for every k in ks), named "log_px", "kl[0]"
.. "kl[L-1]", "L>k". The evaluation and the detector use the k >= 1 of their ks (`statistics_ks`): L^{>0} is the
ELBO, log p(x|z) - Σ KL of the same samples, so it adds nothing to the other columns. `fit` keeps, on the fit data,
the first of each group of exactly equal columns and drops the columns that are constant there (spread <= 1e-12 of
their magnitude): a duplicate adds nothing and would count twice in fisher, a constant has no density, and both make
the covariance singular. d is the number of columns kept, n the number of fit examples; s_j(x_i), i = 1..n, are the
fit values of kept column j.

Scores (x a test example, x_i the fit examples, which should be held-out in-distribution data):

* typicality: Nalisnick, Matsukawa, Teh & Lakshminarayanan (2019), "Detecting out-of-distribution inputs to
  deep generative models using typicality" (arXiv:1906.02994), the test for a batch of one example with the
  ELBO standing in for log p(x):  T(x) = |ELBO(x) - (1/n) Σ_i ELBO(x_i)|.
* input_complexity: Serrà, Álvarez, Gómez, Slizovskaia, Núñez & Luque (ICLR 2020), "Input complexity and
  out-of-distribution detection with likelihood-based generative models": S(x) = (-ELBO(x) / ln 2 - B(x)) / D,
  the negative ELBO in bits per dimension minus the compressed length B(x) of the image (bits, e.g. PNG; the
  caller's) per dimension; D the number of dimensions. No fit.
* DoSE: Morningstar, Ham, Gallagher, Lakshminarayanan, Alemi & Dillon (AISTATS 2021), "Density of States
  Estimation for Out-of-Distribution Detection": the negative log density of s(x) under a Gaussian kernel
  density estimate of the fit statistics. With m_j, σ_j the fit mean and standard deviation (ddof 1) of kept
  column j, z = (s - m) / σ, the ridged correlation matrix R = corr(z) + ρI = CCᵀ (Cholesky, ρ = `RIDGE`),
  w = C⁻¹z / h and Scott's bandwidth h = n^(-1/(d+4)):
    DoSE(x) = -logsumexp_i(-|w(x) - w(x_i)|² / 2) + log n + (d/2) log 2π + d log h + Σ_j log σ_j + Σ_j log C_jj,
  i.e. -log (1/n) Σ_i N(s(x); s(x_i), h² Σ̂) with Σ̂ = diag(σ) R diag(σ): scipy.stats.gaussian_kde's density
  with its default (Scott) factor, up to the ridge. Why a KDE and not one Gaussian: the statistics of
  in-distribution data are often skewed (KL terms are positive with long right tails) or multimodal (classes,
  collapsed layers), and a Gaussian would call a point in a gap between modes or far along the short tail
  typical; the paper's main estimator is a KDE too. The ridge keeps the Cholesky factor defined when the
  statistics are (near-)collinear, e.g. L>0 = log_px - Σ KL exactly with one sample, so every value is finite;
  for well-conditioned data it moves the density by a relative ~ρ/λ_min(R). The n x m kernel sums are done in
  blocks of query rows (`CHUNK_BYTES` each), so 10,000 fit x 10,000 query points of dimension 20 take ~35 MB (one
  unchunked [10,000, 10,000] block would be 800 MB).
* fisher: the combination of Bergamin, Mattei, Havtorn, Sénétaire, Schmutz, Maaløe, Hauberg & Frellsen
  (AISTATS 2022), "Model-agnostic out-of-distribution detection using combined statistical tests", applied to
  our statistics (the paper combines the typicality test with Rao's score test on the gradient; we have no
  gradient statistic and combine the columns of s instead). Per kept column j, with
  c_≤ = #{i: s_j(x_i) ≤ s_j(x)} and c_≥ = #{i: s_j(x_i) ≥ s_j(x)}, the empirical two-sided p-value
    p_j(x) = min(1, 2 min((1 + c_≤) / (n + 1), (1 + c_≥) / (n + 1)))      (>= 2/(n+1), so log p_j is finite)
  and Fisher's statistic F(x) = -2 Σ_j log p_j(x), the score. `fisher_pvalue` is P(χ²_{2d} ≥ F(x)), exact only
  for independent uniform p_j, which correlated statistics are not; the ranking, and so the metrics, are F's.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from scipy import linalg, stats

__all__ = ["FITTED_SCORES", "SUITE_SCORES", "FitState", "statistics_ks", "statistics", "fit", "typicality",
           "input_complexity", "dose", "empirical_pvalues", "fisher", "fisher_pvalue", "suite_makers", "score_all"]

FITTED_SCORES = ("typicality", "DoSE", "fisher")
SUITE_SCORES = ("typicality", "input_complexity", "DoSE", "fisher")  # table order
RIDGE = 1e-9  # added to the fit statistics' correlation matrix before its Cholesky factorisation
CONSTANT_RTOL = 1e-12  # a fit column whose spread is at most this fraction of its magnitude is constant
CHUNK_BYTES = 32 * 2**20  # one [query rows, n_fit] float64 block of the DoSE kernel sums

Raw = Mapping[str, np.ndarray]


# --------------------------------------------------------------------------------------------------------------
# Inputs

def _ks(ks: Sequence[int]) -> Tuple[int, ...]:
  return tuple(int(k) for k in ks)


def _vector(raw: Raw, key: str, n: Optional[int] = None) -> np.ndarray:
  """raw[key] as float64 [N], checked against the length n of the other entries."""
  if key not in raw:
    raise ValueError(f"raw scores have no {key!r} (keys: {sorted(raw)}); pass one dataset's entries of "
                     "scores.npz, with every L>k of the ks used")
  arr = np.asarray(raw[key], dtype=np.float64)
  if arr.ndim != 1 or (n is not None and arr.shape[0] != n):
    raise ValueError(f"raw scores {key!r} has shape {arr.shape}, expected [{n if n is not None else 'N'}]; "
                     "pass one value per example")
  return arr


def _kl(raw: Raw, n: int) -> np.ndarray:
  if "kl" not in raw:
    raise ValueError(f"raw scores have no 'kl' (keys: {sorted(raw)}); pass one dataset's entries of scores.npz")
  kl = np.asarray(raw["kl"], dtype=np.float64)
  if kl.ndim != 2 or kl.shape[0] != n:
    raise ValueError(f"raw scores 'kl' has shape {kl.shape}, expected [{n}, L]: one row of per-layer KL per "
                     "example")
  return kl


def _check_finite(names: Sequence[str], x: np.ndarray, what: str) -> None:
  bad = ~np.isfinite(x).all(axis=0)
  if bad.any():
    cols = [f"{names[j]} ({int(np.sum(~np.isfinite(x[:, j])))})" for j in np.flatnonzero(bad)]
    raise ValueError(f"{what} has non-finite values in {', '.join(cols)}; drop or fix those examples first")


def statistics_ks(ks: Sequence[int]) -> Tuple[int, ...]:
  """The k of an evaluation's ks whose L>k enter the statistics: every k >= 1 (L>0 is the ELBO, a function of
  log_px and the KLs: a column that would add nothing and make their covariance singular)."""
  return tuple(k for k in _ks(ks) if k >= 1)


def statistics(raw: Raw, ks: Sequence[int]) -> Tuple[List[str], np.ndarray]:
  """The per-example statistics vector of DoSE and fisher: log p(x|z), every layer's KL, every L>k.

  Args:
    raw: one dataset's raw scores (module docstring).
    ks: the k of the L>k columns, in order.

  Returns:
    (names, X): the column names ("log_px", "kl[l]", "L>k") and X, float64 [N, 1 + L + len(ks)]. All columns;
    `fit` decides which it keeps.
  """
  log_px = _vector(raw, "log_px")
  n = log_px.shape[0]
  kl = _kl(raw, n)
  lk = [_vector(raw, f"L>{k}", n) for k in _ks(ks)]
  names = ["log_px"] + [f"kl[{l}]" for l in range(kl.shape[1])] + [f"L>{k}" for k in _ks(ks)]
  return names, np.column_stack([log_px, kl] + lk)


# --------------------------------------------------------------------------------------------------------------
# The fitted state

_ARRAY_KEYS = ("names", "ks", "kept", "elbo_mean", "fit_stats", "mean", "scale", "chol", "bandwidth",
               "sorted_fit")


@dataclasses.dataclass(frozen=True, eq=False)
class FitState:
  """What the fitted scores need from the fit (in-distribution) data; arrays are read-only.

  Attributes:
    names: every statistic's name (`statistics`), D of them.
    ks: the k of the L>k statistics.
    kept: indices into names of the columns DoSE and fisher use (d of them).
    elbo_mean: the fit data's mean ELBO (typicality).
    fit_stats: the fit statistics, float64 [n, D].
    mean, scale: the kept columns' fit mean and standard deviation (ddof 1), [d].
    chol: the lower Cholesky factor of the kept columns' ridged correlation matrix, [d, d].
    bandwidth: Scott's factor n^(-1/(d+4)).
    sorted_fit: the kept fit columns, each sorted ascending, [n, d] (fisher).
  """
  names: Tuple[str, ...]
  ks: Tuple[int, ...]
  kept: np.ndarray
  elbo_mean: float
  fit_stats: np.ndarray
  mean: np.ndarray
  scale: np.ndarray
  chol: np.ndarray
  bandwidth: float
  sorted_fit: np.ndarray

  def __post_init__(self):
    cast = {"names": tuple(str(s) for s in self.names), "ks": _ks(self.ks),
            "elbo_mean": float(self.elbo_mean), "bandwidth": float(self.bandwidth),
            "kept": np.array(self.kept, dtype=np.int64)}
    for key in ("fit_stats", "mean", "scale", "chol", "sorted_fit"):
      cast[key] = np.array(getattr(self, key), dtype=np.float64)
    for key, value in cast.items():
      if isinstance(value, np.ndarray):
        value.setflags(write=False)
      object.__setattr__(self, key, value)
    self._check_shapes()

  def _check_shapes(self) -> None:
    n, d = self.sorted_fit.shape[0], self.kept.shape[0]
    ok = (self.fit_stats.shape == (n, len(self.names)) and self.sorted_fit.shape == (n, d)
          and self.mean.shape == self.scale.shape == (d,) and self.chol.shape == (d, d)
          and np.all((self.kept >= 0) & (self.kept < len(self.names))))
    if not ok:
      raise ValueError("fit state arrays are inconsistent (names, kept, fit_stats, sorted_fit, mean, scale, chol "
                       "disagree in shape); refit with ood_scores.fit rather than editing them")

  @property
  def n_fit(self) -> int:
    """The number of fit examples."""
    return int(self.fit_stats.shape[0])

  @property
  def kept_names(self) -> Tuple[str, ...]:
    """The names of the statistics DoSE and fisher use."""
    return tuple(self.names[j] for j in self.kept)

  def to_arrays(self) -> Dict[str, np.ndarray]:
    """A flat dict of numpy arrays (names as a unicode array), e.g. for np.savez(path, **state.to_arrays())."""
    out = {key: np.asarray(getattr(self, key)) for key in _ARRAY_KEYS}
    out["names"] = np.array(self.names, dtype=np.str_)
    out["ks"] = np.array(self.ks, dtype=np.int64)
    return out

  @classmethod
  def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> "FitState":
    """The state `to_arrays` gave (e.g. the np.load of its np.savez)."""
    missing = [key for key in _ARRAY_KEYS if key not in arrays]
    if missing:
      raise ValueError(f"fit state arrays lack {missing}; pass what FitState.to_arrays wrote")
    a = {key: np.asarray(arrays[key]) for key in _ARRAY_KEYS}
    return cls(names=tuple(a["names"].tolist()), ks=tuple(a["ks"].tolist()), kept=a["kept"],
               elbo_mean=float(a["elbo_mean"]), fit_stats=a["fit_stats"], mean=a["mean"], scale=a["scale"],
               chol=a["chol"], bandwidth=float(a["bandwidth"]), sorted_fit=a["sorted_fit"])


def _is_constant(col: np.ndarray) -> bool:
  return float(np.ptp(col)) <= CONSTANT_RTOL * float(np.max(np.abs(col)))


def _kept_columns(x: np.ndarray) -> np.ndarray:
  """The first of each group of exactly equal columns, constant columns left out."""
  kept: List[int] = []
  for j in range(x.shape[1]):
    if not _is_constant(x[:, j]) and not any(np.array_equal(x[:, j], x[:, i]) for i in kept):
      kept.append(j)
  return np.array(kept, dtype=np.int64)


def _whitening(xk: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(mean, scale, chol): z = (x - mean) / scale has correlation chol cholᵀ - RIDGE I on the fit data."""
  mean = xk.mean(axis=0)
  scale = xk.std(axis=0, ddof=1)
  z = (xk - mean) / scale
  corr = z.T @ z / (xk.shape[0] - 1) + RIDGE * np.eye(xk.shape[1])
  return mean, scale, linalg.cholesky(corr, lower=True)


def fit(raw_fit: Raw, ks: Sequence[int]) -> FitState:
  """Fits typicality, DoSE and fisher on in-distribution raw scores (held-out data, e.g. the validation split).

  Args:
    raw_fit: the fit dataset's raw scores (module docstring); needs "ELBO" too.
    ks: the k of the L>k statistics (those of the model's evaluation).

  Returns:
    The FitState.

  Raises:
    ValueError: fewer than 2 examples, a non-finite value, or every statistic constant on the fit data.
  """
  ks = _ks(ks)
  names, x = statistics(raw_fit, ks)
  elbo = _vector(raw_fit, "ELBO", x.shape[0])
  if x.shape[0] < 2:
    raise ValueError(f"the fit data has {x.shape[0]} example(s); typicality, DoSE and fisher need at least 2: "
                     "fit on more in-distribution examples")
  _check_finite(names + ["ELBO"], np.column_stack([x, elbo]), "the fit data")
  kept = _kept_columns(x)
  if kept.size == 0:
    raise ValueError(f"every statistic ({', '.join(names)}) is constant on the fit data; fit on more, distinct "
                     "in-distribution examples")
  mean, scale, chol = _whitening(x[:, kept])
  return FitState(names=tuple(names), ks=ks, kept=kept, elbo_mean=float(np.mean(elbo)), fit_stats=x, mean=mean,
                  scale=scale, chol=chol, bandwidth=x.shape[0] ** (-1.0 / (kept.size + 4)),
                  sorted_fit=np.sort(x[:, kept], axis=0))


def _kept_statistics(state: FitState, raw: Raw) -> np.ndarray:
  """The query's kept statistics [N, d], checked against the fit's columns."""
  names, x = statistics(raw, state.ks)
  if tuple(names) != state.names:
    raise ValueError(f"the raw scores give statistics {names} but the fit state has {list(state.names)}; score "
                     "raw scores of the same model and ks, or refit")
  _check_finite(names, x, "the raw scores")
  return x[:, state.kept]


# --------------------------------------------------------------------------------------------------------------
# Scores

def typicality(fit_state: FitState, raw: Raw) -> np.ndarray:
  """|ELBO(x) - mean fit ELBO| (Nalisnick et al. 2019, one example), float64 [N]."""
  elbo = _vector(raw, "ELBO")
  _check_finite(["ELBO"], elbo[:, None], "the raw scores")
  return np.abs(elbo - fit_state.elbo_mean)


def input_complexity(raw: Raw, compressed_bits: np.ndarray, num_dims: int) -> np.ndarray:
  """(-ELBO / ln 2 - compressed_bits) / num_dims (Serrà et al. 2020), float64 [N].

  Args:
    raw: the raw scores (only "ELBO" is read).
    compressed_bits: [N] the compressed length of each image in bits (e.g. its PNG's).
    num_dims: the number of dimensions of an image (H W C).
  """
  elbo = _vector(raw, "ELBO")
  bits = np.asarray(compressed_bits, dtype=np.float64)
  if bits.shape != elbo.shape:
    raise ValueError(f"compressed_bits has shape {bits.shape} but the ELBO {elbo.shape}; pass one length per "
                     "example, in the order of the raw scores")
  if int(num_dims) != num_dims or num_dims <= 0:
    raise ValueError(f"num_dims must be a positive integer (H*W*C of an image), got {num_dims!r}")
  _check_finite(["ELBO", "compressed_bits"], np.column_stack([elbo, bits]), "the input complexity inputs")
  return (-elbo / math.log(2.0) - bits) / float(num_dims)


def _whiten(state: FitState, xk: np.ndarray) -> np.ndarray:
  """w = C⁻¹ ((x - mean) / scale) / h, row per example."""
  z = (xk - state.mean) / state.scale
  return linalg.solve_triangular(state.chol, z.T, lower=True).T / state.bandwidth


def _block_logsumexp(q: np.ndarray, wf: np.ndarray, half_f: np.ndarray, own: Optional[np.ndarray] = None
                     ) -> np.ndarray:
  """logsumexp_i(q·wf_i - |wf_i|²/2) per row of q, with one [rows, n] array (freed on return); row r leaves out
  fit point own[r] when `own` is given."""
  block = q @ wf.T
  block -= half_f
  if own is not None:
    block[np.arange(len(own)), own] = -np.inf
  top = block.max(axis=1)
  block -= top[:, None]
  np.exp(block, out=block)
  return top + np.log(block.sum(axis=1))


def _logsumexp_kernels(wq: np.ndarray, wf: np.ndarray, rows: int, leave_one_out: bool = False) -> np.ndarray:
  """logsumexp_i(-|wq - wf_i|² / 2) per query row, in blocks of `rows` query rows.

  -|q - f|²/2 = q·f - |f|²/2 - |q|²/2: the largest term of each row is subtracted before exp, so the sum is
  at least 1 and its log finite however far the query lies.
  """
  half_f = 0.5 * np.einsum("ij,ij->i", wf, wf)
  half_q = 0.5 * np.einsum("ij,ij->i", wq, wq)
  out = np.empty(wq.shape[0])
  for start in range(0, wq.shape[0], rows):
    stop = min(start + rows, wq.shape[0])
    own = np.arange(start, stop) if leave_one_out else None  # query row i is fit point i
    out[start:stop] = _block_logsumexp(wq[start:stop], wf, half_f, own)
  return out - half_q


def _check_is_fit_data(fit_state: FitState, xk: np.ndarray) -> None:
  if xk.shape != (fit_state.n_fit, fit_state.kept.size) or not np.array_equal(
      xk, fit_state.fit_stats[:, fit_state.kept]):
    raise ValueError("leave_one_out scores the fit data itself: pass the raw scores `fit` was given.")


def dose(fit_state: FitState, raw: Raw, chunk_rows: Optional[int] = None, leave_one_out: bool = False
         ) -> np.ndarray:
  """The negative log KDE density of the statistics (Morningstar et al. 2021), float64 [N].

  Args:
    fit_state: from `fit`.
    raw: the raw scores to score.
    chunk_rows: query rows per block of kernel sums (default: blocks of `CHUNK_BYTES`); the value only changes
      memory and speed.
    leave_one_out: `raw` is the fit data itself; example i's density leaves out its own kernel (the mean over the
      other n - 1), as a new example from the same distribution would see it. Without it a fit point's own
      kernel, at distance 0, inflates its density, so thresholds taken on the fit data would flag far more than
      the intended fraction of new in-distribution inputs.
  """
  n, d = fit_state.n_fit, fit_state.kept.size
  rows = chunk_rows if chunk_rows is not None else max(1, CHUNK_BYTES // (8 * n))
  xk = _kept_statistics(fit_state, raw)
  if leave_one_out:
    _check_is_fit_data(fit_state, xk)
  wf = _whiten(fit_state, fit_state.fit_stats[:, fit_state.kept])
  wq = _whiten(fit_state, xk)
  log_norm = (math.log(n - 1 if leave_one_out else n) + 0.5 * d * math.log(2.0 * math.pi)
              + d * math.log(fit_state.bandwidth) + float(np.sum(np.log(fit_state.scale)))
              + float(np.sum(np.log(np.diag(fit_state.chol)))))
  return log_norm - _logsumexp_kernels(wq, wf, int(rows), leave_one_out)


def empirical_pvalues(fit_state: FitState, raw: Raw, leave_one_out: bool = False) -> np.ndarray:
  """The two-sided empirical p-value of each kept statistic against the fit data (module docstring), [N, d];
  with `leave_one_out`, `raw` is the fit data and example i is compared with the other n - 1."""
  xk = _kept_statistics(fit_state, raw)
  if leave_one_out:
    _check_is_fit_data(fit_state, xk)
  n = fit_state.n_fit - int(leave_one_out)
  cols = []
  for j in range(xk.shape[1]):
    sorted_j = fit_state.sorted_fit[:, j]
    at_most = np.searchsorted(sorted_j, xk[:, j], side="right") - int(leave_one_out)  # itself not counted
    at_least = fit_state.n_fit - np.searchsorted(sorted_j, xk[:, j], side="left") - int(leave_one_out)
    cols.append(np.minimum(1.0, 2.0 * (1.0 + np.minimum(at_most, at_least)) / (n + 1.0)))
  return np.column_stack(cols)


def fisher(fit_state: FitState, raw: Raw, leave_one_out: bool = False) -> np.ndarray:
  """Fisher's statistic -2 Σ_j log p_j over the kept statistics (Bergamin et al. 2022's combination), [N]
  (`leave_one_out` as `empirical_pvalues`)."""
  return -2.0 * np.sum(np.log(empirical_pvalues(fit_state, raw, leave_one_out)), axis=1)


def fisher_pvalue(fit_state: FitState, raw: Raw) -> np.ndarray:
  """The combined p-value P(χ²_{2d} ≥ F(x)) of `fisher` (lower = more OOD), [N]."""
  return stats.chi2.sf(fisher(fit_state, raw), 2 * fit_state.kept.size)


def suite_makers(fit_state: Optional[FitState], raw: Raw, ks: Sequence[int],
                 compressed_bits: Optional[np.ndarray] = None, num_dims: Optional[int] = None
                 ) -> Dict[str, Callable[[], np.ndarray]]:
  """The suite's scores that these arguments allow, as name -> a function computing it, in SUITE_SCORES order
  (what `score_all` evaluates; a caller that times each score calls them one by one).

  Args:
    fit_state: from `fit`, or None for no fitted score (FITTED_SCORES).
    raw: the raw scores to score.
    ks: the k of the L>k statistics; must be the fit's.
    compressed_bits, num_dims: both or neither; with them, "input_complexity".
  """
  if (compressed_bits is None) != (num_dims is None):
    raise ValueError("pass both compressed_bits and num_dims (for input_complexity) or neither")
  if fit_state is not None and _ks(ks) != fit_state.ks:
    raise ValueError(f"ks={_ks(ks)} but the fit state was fit with ks={fit_state.ks}; score with the fit's ks "
                     "or refit")
  makers = {}
  if fit_state is not None:
    makers.update(typicality=lambda: typicality(fit_state, raw), DoSE=lambda: dose(fit_state, raw),
                  fisher=lambda: fisher(fit_state, raw))
  if compressed_bits is not None:
    makers["input_complexity"] = lambda: input_complexity(raw, compressed_bits, num_dims)
  return {name: makers[name] for name in SUITE_SCORES if name in makers}


def score_all(fit_state: Optional[FitState], raw: Raw, ks: Sequence[int],
              compressed_bits: Optional[np.ndarray] = None, num_dims: Optional[int] = None
              ) -> Dict[str, np.ndarray]:
  """The suite's scores by name, in SUITE_SCORES order, each float64 [N] with higher = more OOD (arguments as
  `suite_makers`)."""
  return {name: make() for name, make in suite_makers(fit_state, raw, ks, compressed_bits, num_dims).items()}
