"""hvaeood.ood_scores against hand computations, brute-force counts and scipy (float64), higher = more OOD."""

import ast
import math
import os
import tracemalloc

import numpy as np
import pytest
from scipy import stats

from hvaeood import ood_scores as oos

MODULE_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "hvaeood", "ood_scores.py")


def _raw(x: np.ndarray, n_kl: int, ks, elbo=None) -> dict:
  """Raw scores whose statistics columns are x: log_px, n_kl KL layers, then L>k for each k."""
  x = np.asarray(x, dtype=np.float64)
  raw = {"log_px": x[:, 0], "kl": x[:, 1:1 + n_kl]}
  for i, k in enumerate(ks):
    raw[f"L>{k}"] = x[:, 1 + n_kl + i]
    raw[f"LLR>{k}"] = np.zeros(x.shape[0])
  raw["ELBO"] = x[:, 0] - x[:, 1:1 + n_kl].sum(axis=1) if elbo is None else np.asarray(elbo, dtype=np.float64)
  return raw


def _correlated(rng: np.random.Generator, n: int, d: int, shift: float = 0.0) -> np.ndarray:
  """n draws of a fixed, well-conditioned correlated Gaussian in d dimensions (plus `shift` in every column)."""
  mix = np.random.default_rng(1234).normal(size=(d, d)) + 2.0 * np.eye(d)
  return rng.normal(size=(n, d)) @ mix.T + np.arange(d) + shift


def _auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
  """The Mann-Whitney rank form of the AUROC (OOD positive), ties counted 1/2 through mid-ranks."""
  ranks = stats.rankdata(np.r_[in_scores, out_scores])
  n0, n1 = in_scores.size, out_scores.size
  return float((ranks[n0:].sum() - n1 * (n1 + 1) / 2) / (n0 * n1))


# --------------------------------------------------------------------------------------------------------------
# statistics, typicality, input complexity

def test_statistics_are_log_px_every_kl_and_every_l_k_in_order():
  x = np.arange(12.0).reshape(2, 6)
  names, stat = oos.statistics(_raw(x, 3, (0, 2)), (0, 2))
  assert names == ["log_px", "kl[0]", "kl[1]", "kl[2]", "L>0", "L>2"]
  assert stat.dtype == np.float64
  np.testing.assert_array_equal(stat, x)


def test_typicality_is_the_distance_to_the_fit_mean_elbo_by_hand():
  x_fit = np.array([[1.0, 0.5], [2.0, 1.0], [4.0, 3.0]])
  state = oos.fit(_raw(x_fit, 1, (), elbo=[-10.0, -12.0, -14.0]), ())  # mean ELBO -12
  raw = _raw(np.zeros((3, 2)), 1, (), elbo=[-12.0, -9.0, -20.0])
  np.testing.assert_allclose(oos.typicality(state, raw), [0.0, 3.0, 8.0], rtol=0, atol=1e-12)


def test_input_complexity_by_hand():
  # 1000 nats = 1442.69504088896 bits; (1442.69504088896 - 800) / 784 = 0.819764082766...
  # 500 nats = 721.34752044448 bits; (721.34752044448 - 100) / 784 = 0.792535102607...
  raw = {"ELBO": np.array([-1000.0, -500.0])}
  got = oos.input_complexity(raw, np.array([800.0, 100.0]), 784)
  np.testing.assert_allclose(got, [0.819764082766, 0.792535102607], rtol=1e-11)
  assert got.dtype == np.float64


# --------------------------------------------------------------------------------------------------------------
# DoSE

def test_dose_equals_scipy_gaussian_kde_with_scott_bandwidth():
  rng = np.random.default_rng(0)
  x_fit = _correlated(rng, 400, 5)
  x_query = np.r_[_correlated(rng, 60, 5), _correlated(rng, 40, 5, shift=4.0)]
  state = oos.fit(_raw(x_fit, 2, (0, 1)), (0, 1))
  assert state.kept.tolist() == [0, 1, 2, 3, 4]
  want = -stats.gaussian_kde(x_fit.T).logpdf(x_query.T)
  got = oos.dose(state, _raw(x_query, 2, (0, 1)))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert got.dtype == np.float64


def test_leave_one_out_dose_and_fisher_against_brute_force_on_the_other_points():
  """Each fit example scored against the other n - 1: DoSE with scipy's KDE kernel (the full fit's bandwidth and
  covariance, the example's own kernel dropped) and fisher's p-values counted without the example itself."""
  rng = np.random.default_rng(3)
  x_fit = _correlated(rng, 120, 4)
  raw = _raw(x_fit, 1, (0, 1))
  state = oos.fit(raw, (0, 1))
  kde = stats.gaussian_kde(x_fit.T)
  want = np.empty(len(x_fit))
  for i in range(len(x_fit)):
    others = np.delete(x_fit, i, axis=0)
    dens = stats.multivariate_normal(mean=np.zeros(4), cov=kde.covariance).pdf(x_fit[i] - others)
    want[i] = -np.log(dens.mean())
  np.testing.assert_allclose(oos.dose(state, raw, leave_one_out=True), want, rtol=1e-6)
  assert np.all(oos.dose(state, raw, leave_one_out=True) > oos.dose(state, raw))  # the own kernel dropped
  n = len(x_fit)
  p = np.empty_like(x_fit)
  for i in range(n):
    others = np.delete(x_fit, i, axis=0)
    below, above = np.sum(others <= x_fit[i], axis=0), np.sum(others >= x_fit[i], axis=0)
    p[i] = np.minimum(1.0, 2.0 * (1.0 + np.minimum(below, above)) / n)  # n - 1 others: (1 + c) / ((n - 1) + 1)
  np.testing.assert_allclose(oos.empirical_pvalues(state, raw, leave_one_out=True), p, rtol=1e-12)
  np.testing.assert_allclose(oos.fisher(state, raw, leave_one_out=True), -2 * np.log(p).sum(axis=1), rtol=1e-12)
  with pytest.raises(ValueError, match="leave_one_out scores the fit data itself"):
    oos.dose(state, _raw(x_fit[:10], 1, (0, 1)), leave_one_out=True)


def test_dose_approaches_the_kernel_smoothed_gaussian_for_many_samples():
  # E[KDE] = N(mu, Sigma) convolved with N(0, h^2 Sigma_hat) -> N(mu, (1 + h^2) Sigma), h = n^(-1/6) in d = 2. With
  # n = 100000 the estimate's noise at points within 2 Mahalanobis units is ~0.02 nats on average (this seed:
  # mean 0.019, max 0.064; seeds 0..4: at most 0.020 and 0.097).
  rng = np.random.default_rng(0)
  mu, sigma = np.array([1.0, -2.0]), np.array([[2.0, 0.8], [0.8, 1.0]])
  chol = np.linalg.cholesky(sigma)
  x_fit = mu + rng.normal(size=(100000, 2)) @ chol.T
  x_query = mu + rng.normal(size=(300, 2)) @ chol.T
  x_query = x_query[np.einsum("ij,jk,ik->i", x_query - mu, np.linalg.inv(sigma), x_query - mu) < 4.0]
  h = 100000 ** (-1.0 / 6.0)
  want = -stats.multivariate_normal(mu, (1.0 + h * h) * sigma).logpdf(x_query)
  got = oos.dose(oos.fit(_raw(x_fit, 1, ()), ()), _raw(x_query, 1, ()))
  assert x_query.shape[0] > 200
  assert np.max(np.abs(got - want)) < 0.2
  assert np.mean(np.abs(got - want)) < 0.03


def test_dose_is_the_same_in_any_chunking():
  rng = np.random.default_rng(2)
  state = oos.fit(_raw(_correlated(rng, 300, 4), 2, (0,)), (0,))
  raw = _raw(_correlated(rng, 50, 4, shift=1.0), 2, (0,))
  whole = oos.dose(state, raw, chunk_rows=10**6)
  for rows in (1, 7, None):
    np.testing.assert_allclose(oos.dose(state, raw, chunk_rows=rows), whole, rtol=1e-12)


def _peak_bytes(fn) -> int:
  tracemalloc.start()
  try:
    fn()
    return tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()


def test_dose_memory_for_10000_fit_points_in_20_dimensions_stays_under_200_mb():
  rng = np.random.default_rng(3)
  state = oos.fit(_raw(rng.normal(size=(10000, 20)), 17, (0, 1)), (0, 1))
  raw = _raw(rng.normal(size=(3000, 20)), 17, (0, 1))
  assert _peak_bytes(lambda: oos.dose(state, raw)) < 200 * 2**20
  # the measurement sees the block: one block of all 3000 rows is 240 MB
  assert _peak_bytes(lambda: oos.dose(state, raw, chunk_rows=3000)) > 200 * 2**20


def test_constant_and_duplicate_columns_are_dropped_and_change_nothing():
  rng = np.random.default_rng(4)
  base_fit, base_query = _correlated(rng, 200, 3), _correlated(rng, 30, 3, shift=1.0)

  def padded(x, constant):  # log_px, kl[0], kl[1] = constant, L>0, L>1 = a copy of L>0
    return np.column_stack([x[:, :2], np.full(len(x), constant), x[:, 2], x[:, 2]])

  full = oos.fit(_raw(padded(base_fit, 0.25), 2, (0, 1)), (0, 1))
  small = oos.fit(_raw(base_fit, 1, (0,)), (0,))
  assert full.kept_names == ("log_px", "kl[0]", "L>0")
  query_full = _raw(padded(base_query, 3.0), 2, (0, 1))  # the query's constant column differs: it is ignored
  query_small = _raw(base_query, 1, (0,))
  got = oos.dose(full, query_full)
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, oos.dose(small, query_small), rtol=1e-12)
  np.testing.assert_allclose(got, -stats.gaussian_kde(base_fit.T).logpdf(base_query.T), rtol=1e-6)
  np.testing.assert_allclose(oos.fisher(full, query_full), oos.fisher(small, query_small), rtol=1e-12)


def test_dose_is_finite_for_collinear_statistics_and_few_examples():
  rng = np.random.default_rng(5)
  for n in (3, 200):
    x = rng.normal(size=(n, 3))
    x_fit = np.column_stack([x, x[:, 0] - x[:, 1] - x[:, 2]])  # L>0 = log_px - sum KL: a singular covariance
    state = oos.fit(_raw(x_fit, 2, (0,)), (0,))
    q = rng.normal(size=(20, 3))
    inside = np.column_stack([q, q[:, 0] - q[:, 1] - q[:, 2]])
    off = np.column_stack([q, q[:, 0] - q[:, 1] - q[:, 2] + 1.0])  # off the fit data's plane
    d_in, d_off = oos.dose(state, _raw(inside, 2, (0,))), oos.dose(state, _raw(off, 2, (0,)))
    assert np.all(np.isfinite(d_in)) and np.all(np.isfinite(d_off))
    if n > 4:  # with 3 examples the fit spans a plane of 2 dimensions, which neither query set lies in
      assert np.all(d_off > d_in + 100.0)


# --------------------------------------------------------------------------------------------------------------
# fisher

def test_empirical_pvalues_against_a_brute_force_count_with_ties_and_outside_values():
  rng = np.random.default_rng(6)
  x_fit = np.column_stack([[1.0, 2.0, 2.0, 3.0, 5.0, 8.0, 8.0], rng.normal(size=(7, 2))])
  x_query = np.column_stack([[0.0, 1.0, 2.0, 3.0, 8.0, 9.0, 7.0],
                             np.r_[x_fit[:3, 1:], rng.normal(size=(4, 2)) * 3.0]])
  state = oos.fit(_raw(x_fit, 1, (0,)), (0,))
  got = oos.empirical_pvalues(state, _raw(x_query, 1, (0,)))
  n = 7
  brute = np.empty_like(x_query)
  for i in range(x_query.shape[0]):
    for j in range(x_query.shape[1]):
      at_most = sum(1 for f in x_fit[:, j] if f <= x_query[i, j])
      at_least = sum(1 for f in x_fit[:, j] if f >= x_query[i, j])
      brute[i, j] = min(1.0, 2.0 * min(1 + at_most, 1 + at_least) / (n + 1))
  np.testing.assert_allclose(got, brute, rtol=0, atol=1e-15)
  # by hand, column 0: below and above the fit range 2/(n+1); ties counted on both sides
  np.testing.assert_allclose(got[:, 0], [0.25, 0.5, 1.0, 1.0, 0.75, 0.25, 0.75], rtol=0, atol=1e-15)


def test_fisher_and_its_pvalue_match_scipy_combine_pvalues():
  rng = np.random.default_rng(7)
  state = oos.fit(_raw(_correlated(rng, 300, 5), 2, (0, 1)), (0, 1))
  raw = _raw(_correlated(rng, 40, 5, shift=1.5), 2, (0, 1))
  p = oos.empirical_pvalues(state, raw)
  want = [stats.combine_pvalues(row, method="fisher") for row in p]
  np.testing.assert_allclose(oos.fisher(state, raw), [w.statistic for w in want], rtol=1e-12)
  np.testing.assert_allclose(oos.fisher_pvalue(state, raw), [w.pvalue for w in want], rtol=1e-10)


# --------------------------------------------------------------------------------------------------------------
# the fit state, errors, the suite

def test_fit_state_round_trips_through_npz(tmp_path):
  rng = np.random.default_rng(8)
  state = oos.fit(_raw(_correlated(rng, 100, 4), 2, (0,)), (0,))
  raw = _raw(_correlated(rng, 20, 4, shift=0.5), 2, (0,))
  path = tmp_path / "fit_state.npz"
  np.savez(path, **state.to_arrays())
  with np.load(path) as arrays:
    loaded = oos.FitState.from_arrays(arrays)
  assert loaded.names == state.names and loaded.ks == state.ks and loaded.n_fit == 100
  before, after = oos.score_all(state, raw, (0,)), oos.score_all(loaded, raw, (0,))
  assert list(after) == list(before) == list(oos.FITTED_SCORES)
  for name, values in before.items():
    np.testing.assert_array_equal(after[name], values)


def test_fit_refuses_too_few_examples_and_non_finite_values():
  with pytest.raises(ValueError, match=r"has 1 example\(s\).*at least 2"):
    oos.fit(_raw(np.ones((1, 3)), 1, (0,)), (0,))
  x = np.random.default_rng(9).normal(size=(10, 4))
  x[3, 2] = np.nan
  with pytest.raises(ValueError, match=r"non-finite values in kl\[1\] \(1\); drop or fix"):
    oos.fit(_raw(x, 2, (0,), elbo=np.zeros(10)), (0,))
  elbo = np.zeros(10)
  elbo[0] = np.inf
  with pytest.raises(ValueError, match=r"non-finite values in ELBO"):
    oos.fit(_raw(np.nan_to_num(x), 2, (0,), elbo=elbo), (0,))
  with pytest.raises(ValueError, match=r"constant on the fit data"):
    oos.fit(_raw(np.ones((5, 3)), 1, (0,)), (0,))
  with pytest.raises(ValueError, match=r"no 'L>2'"):
    oos.fit(_raw(np.nan_to_num(x), 2, (0,)), (0, 2))


def test_scores_refuse_raw_scores_of_another_model_and_mixed_arguments():
  rng = np.random.default_rng(10)
  state = oos.fit(_raw(rng.normal(size=(20, 4)), 2, (0,)), (0,))
  with pytest.raises(ValueError, match=r"fit state has"):
    oos.dose(state, _raw(rng.normal(size=(5, 5)), 3, (0,)))  # three KL layers
  with pytest.raises(ValueError, match=r"fit with ks=\(0,\)"):
    oos.score_all(state, _raw(rng.normal(size=(5, 4)), 2, (0,)), (1,))
  with pytest.raises(ValueError, match=r"both compressed_bits and num_dims"):
    oos.score_all(None, {"ELBO": np.zeros(3)}, (), compressed_bits=np.zeros(3))


def test_score_all_gives_the_suite_in_table_order():
  assert oos.SUITE_SCORES == ("typicality", "input_complexity", "DoSE", "fisher")
  assert set(oos.FITTED_SCORES) == set(oos.SUITE_SCORES) - {"input_complexity"}
  rng = np.random.default_rng(11)
  state = oos.fit(_raw(_correlated(rng, 50, 4), 2, (0,)), (0,))
  raw = _raw(_correlated(rng, 10, 4), 2, (0,))
  bits = rng.uniform(100, 200, size=10)
  every = oos.score_all(state, raw, (0,), compressed_bits=bits, num_dims=784)
  assert list(every) == list(oos.SUITE_SCORES)
  np.testing.assert_array_equal(every["DoSE"], oos.dose(state, raw))
  np.testing.assert_array_equal(every["fisher"], oos.fisher(state, raw))
  np.testing.assert_array_equal(every["typicality"], oos.typicality(state, raw))
  np.testing.assert_array_equal(every["input_complexity"], oos.input_complexity(raw, bits, 784))
  assert all(v.dtype == np.float64 and v.shape == (10,) and np.all(np.isfinite(v)) for v in every.values())
  assert list(oos.score_all(None, raw, (0,), compressed_bits=bits, num_dims=784)) == ["input_complexity"]
  assert oos.score_all(None, raw, (0,)) == {}


def test_a_gaussian_shifted_by_three_sd_is_detected_by_dose_and_fisher():
  rng = np.random.default_rng(12)
  x_fit, x_in = _correlated(rng, 1000, 5), _correlated(rng, 500, 5)
  sd = x_fit.std(axis=0)
  x_out = _correlated(rng, 500, 5) + 3.0 * sd
  state = oos.fit(_raw(x_fit, 2, (0, 1)), (0, 1))
  raw_in, raw_out = _raw(x_in, 2, (0, 1)), _raw(x_out, 2, (0, 1))
  assert _auroc(oos.dose(state, raw_in), oos.dose(state, raw_out)) > 0.95
  assert _auroc(oos.fisher(state, raw_in), oos.fisher(state, raw_out)) > 0.95
  assert math.isclose(_auroc(oos.dose(state, raw_in), oos.dose(state, raw_in)), 0.5)


def test_the_module_imports_only_numpy_scipy_and_the_standard_library():
  with open(MODULE_PATH, encoding="utf-8") as f:
    tree = ast.parse(f.read())
  roots = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      roots.update(a.name.split(".")[0] for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      roots.add((node.module or "").split(".")[0])
  assert roots <= {"__future__", "dataclasses", "math", "typing", "numpy", "scipy"}
