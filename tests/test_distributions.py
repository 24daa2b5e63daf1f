"""Tests for hvaeood.distributions against independent float64 numpy/scipy computations (SPEC 1.4, 1.5, 2)."""

import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from hvaeood import distributions as D  # noqa: E402
import helpers_dlm  # noqa: E402

LN2 = math.log(2.0)


@pytest.fixture(autouse=True)
def _fast_threefry():
  """Non-partitionable threefry compiles several times faster on CPU; these tests only need fresh draws."""
  with jax.threefry_partitionable(False):
    yield


def _f64(x):
  return np.asarray(x, np.float64)


# --------------------------------------------------------------------------------------------------------------
# Bernoulli


def test_bernoulli_log_prob_matches_scipy():
  rs = np.random.RandomState(0)
  logits = (3.0 * rs.randn(4, 5, 5, 1)).astype(np.float32)
  x = (rs.rand(4, 5, 5, 1) < 0.5).astype(np.float32)
  got = _f64(D.bernoulli_log_prob(jnp.asarray(x), jnp.asarray(logits)))
  p = special.expit(_f64(logits))
  want = stats.bernoulli.logpmf(_f64(x), p).reshape(4, -1).sum(axis=1)
  assert got.shape == (4,)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_bernoulli_log_prob_large_logits_finite_and_accurate():
  """|logits| = 50: sigma(50) rounds to 1 even in float64, so compare with the exact log-sigmoid forms
  log s(l) = -log(1 + e^{-l}) and log(1 - s(l)) = -log(1 + e^{l}) in float64."""
  rs = np.random.RandomState(1)
  logits = rs.choice([-50.0, 50.0, -20.0, 20.0, 0.5], size=(3, 4, 4, 1)).astype(np.float32)
  logits += (0.1 * rs.randn(*logits.shape)).astype(np.float32)
  x = (rs.rand(3, 4, 4, 1) < 0.5).astype(np.float32)
  got = _f64(D.bernoulli_log_prob(jnp.asarray(x), jnp.asarray(logits)))
  l = _f64(logits)
  elem = np.where(x == 1, -np.logaddexp(0.0, -l), -np.logaddexp(0.0, l))
  want = elem.reshape(3, -1).sum(axis=1)
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # x=0 at l=+50 costs ~50 nats; x=1 there costs ~0.
  one = D.bernoulli_log_prob(jnp.zeros((1, 1)), jnp.full((1, 1), 50.0))
  np.testing.assert_allclose(float(one[0]), -50.0, rtol=1e-6)
  one = D.bernoulli_log_prob(jnp.ones((1, 1)), jnp.full((1, 1), 50.0))
  assert abs(float(one[0])) < 1e-6


# --------------------------------------------------------------------------------------------------------------
# Gaussian


def test_gaussian_log_prob_matches_scipy():
  rs = np.random.RandomState(2)
  mu = rs.randn(50).astype(np.float32)
  sigma = np.exp(rs.uniform(-3, 2, 50)).astype(np.float32)
  z = (mu + sigma * 2.5 * rs.randn(50)).astype(np.float32)
  got = _f64(D.Gaussian(jnp.asarray(mu), jnp.asarray(sigma)).log_prob(jnp.asarray(z)))
  want = stats.norm.logpdf(_f64(z), _f64(mu), _f64(sigma))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_softplus_std():
  assert abs(float(D.softplus_std(jnp.float32(0.0))) - 1.0) < 1e-6
  assert float(D.softplus_std(jnp.float32(-1e3))) == pytest.approx(1e-6, rel=1e-6)
  r = np.concatenate([np.linspace(-20, 20, 81), [50.0, 100.0]]).astype(np.float32)
  got = _f64(D.softplus_std(jnp.asarray(r)))
  rr = _f64(r)
  want = np.maximum(np.logaddexp(0.0, LN2 * rr) / LN2, 1e-6)  # = log(1 + exp(ln2 r)) / ln2, stably
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # the closed form log(1 + 2^r) / ln2 where it does not overflow
  small = np.abs(rr) < 20
  np.testing.assert_allclose(got[small], np.log1p(np.exp(LN2 * rr[small])) / LN2, rtol=1e-5)


def test_gaussian_sample_moments():
  mu = jnp.asarray(np.array([0.5, -2.0, 3.0], np.float32))
  sigma = jnp.asarray(np.array([0.1, 1.0, 2.5], np.float32))
  n = 20000
  g = D.Gaussian(jnp.broadcast_to(mu, (n, 3)), jnp.broadcast_to(sigma, (n, 3)))
  z = _f64(g.sample(jax.random.key(0)))
  se = _f64(sigma) / math.sqrt(n)
  assert np.all(np.abs(z.mean(0) - _f64(mu)) < 5 * se)
  np.testing.assert_allclose(z.std(0, ddof=1), _f64(sigma), rtol=0.03)


# --------------------------------------------------------------------------------------------------------------
# Gaussian KL


def _np_kl(mq, sq, mp, sp):
  return 0.5 * (sq ** 2 / sp ** 2 + (mq - mp) ** 2 / sp ** 2 - 1.0) + np.log(sp) - np.log(sq)


def test_gaussian_kl_matches_closed_form():
  rs = np.random.RandomState(3)
  mq, mp = rs.randn(2, 40).astype(np.float32)
  sq, sp = np.exp(rs.uniform(-2, 1.5, (2, 40))).astype(np.float32)
  got = _f64(D.gaussian_kl(D.Gaussian(jnp.asarray(mq), jnp.asarray(sq)), D.Gaussian(jnp.asarray(mp), jnp.asarray(sp))))
  want = _np_kl(_f64(mq), _f64(sq), _f64(mp), _f64(sp))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert np.all(got >= -1e-6)
  same = D.gaussian_kl(D.Gaussian(jnp.asarray(mq), jnp.asarray(sq)), D.Gaussian(jnp.asarray(mq), jnp.asarray(sq)))
  np.testing.assert_allclose(_f64(same), 0.0, atol=1e-6)


def test_mc_kl_matches_analytic_kl():
  """E_q[log q(z) - log p(z)] over 20k reparameterised samples is within a few standard errors of the KL."""
  mq = np.array([0.0, 1.0, -0.5, 2.0], np.float32)
  sq = np.array([1.0, 0.5, 2.0, 0.3], np.float32)
  mp = np.array([0.5, -1.0, 0.0, 2.2], np.float32)
  sp = np.array([1.0, 1.5, 1.0, 0.25], np.float32)
  n = 20000
  q = D.Gaussian(jnp.broadcast_to(jnp.asarray(mq), (n, 4)), jnp.broadcast_to(jnp.asarray(sq), (n, 4)))
  p = D.Gaussian(jnp.asarray(mp), jnp.asarray(sp))
  z = q.sample(jax.random.key(1))
  elem = _f64(q.log_prob(z) - p.log_prob(z))
  mc, se = elem.mean(0), elem.std(0, ddof=1) / math.sqrt(n)
  kl = _np_kl(_f64(mq), _f64(sq), _f64(mp), _f64(sp))
  assert np.all(np.abs(mc - kl) < 4.5 * se + 1e-6), (mc, kl, se)
  np.testing.assert_allclose(_f64(D.gaussian_kl(D.Gaussian(jnp.asarray(mq), jnp.asarray(sq)), p)), kl, rtol=1e-4)


# --------------------------------------------------------------------------------------------------------------
# Discretised logistic mixture: an independent float64 implementation of SPEC 1.5


def _np_softplus(a):
  return np.logaddexp(0.0, a)


def np_dlm_log_prob_per_pixel(x01, params, nr_mix):
  """SPEC 1.5, written from the text: returns [..., ] per-pixel log-probabilities in float64."""
  x01 = _f64(x01)
  params = _f64(params)
  M = nr_mix
  x = 2.0 * x01 - 1.0
  logits = params[..., :M]
  rest = params[..., M:].reshape(params.shape[:-1] + (3, 3 * M))  # channels-last as (3 colours, 3M)
  means = rest[..., :M]
  log_s = np.maximum(rest[..., M:2 * M], -7.0)
  coef = np.tanh(rest[..., 2 * M:3 * M])
  xr, xg, xb = x[..., 0:1], x[..., 1:2], x[..., 2:3]
  mus = [means[..., 0, :],
         means[..., 1, :] + coef[..., 0, :] * xr,
         means[..., 2, :] + coef[..., 1, :] * xr + coef[..., 2, :] * xg]
  total = special.log_softmax(logits, axis=-1)
  for c, (xc, mu) in enumerate(zip((xr, xg, xb), mus)):
    ls = log_s[..., c, :]
    s = np.exp(ls)
    a = (xc - mu + 1.0 / 255.0) / s
    b = (xc - mu - 1.0 / 255.0) / s
    m = (xc - mu) / s
    edge_lo = a - _np_softplus(a)
    edge_hi = -_np_softplus(b)
    delta = special.expit(a) - special.expit(b)
    with np.errstate(divide="ignore"):
      mid = np.where(delta > 1e-5, np.log(np.maximum(delta, 1e-12)),
                     m - ls - 2.0 * _np_softplus(m) - np.log(127.5))
    lp = np.where(xc < -0.999, edge_lo, np.where(xc > 0.999, edge_hi, mid))
    total = total + lp
  return special.logsumexp(total, axis=-1)


def _random_dlm(seed, shape, nr_mix):
  """Random parameters [*shape, 10 M] with some log-scales below the -7 clamp and a range of widths."""
  rs = np.random.RandomState(seed)
  M = nr_mix
  logits = 2.0 * rs.randn(*shape, M)
  means = rs.uniform(-1.1, 1.1, (*shape, 3, M))
  log_s = rs.uniform(-8.0, -0.5, (*shape, 3, M))
  coef = rs.randn(*shape, 3, M)
  rest = np.concatenate([means, log_s, coef], axis=-1).reshape(*shape, 9 * M)
  return np.concatenate([logits, rest], axis=-1).astype(np.float32)


def _random_images(seed, shape):
  rs = np.random.RandomState(seed)
  x = rs.rand(*shape)
  flat = x.reshape(-1)
  idx = rs.permutation(flat.size)
  flat[idx[:flat.size // 8]] = 0.0                       # exact edges
  flat[idx[flat.size // 8:flat.size // 4]] = 1.0
  flat[idx[flat.size // 4:flat.size // 2]] = rs.randint(0, 256, flat.size // 2 - flat.size // 4) / 255.0
  return flat.reshape(shape).astype(np.float32)


def test_dlm_log_prob_matches_numpy_reference():
  M = 10
  params = _random_dlm(4, (3, 6, 6), M)
  x = _random_images(5, (3, 6, 6, 3))
  got_px = _f64(D.dlm_log_prob(jnp.asarray(x), jnp.asarray(params), M, per_pixel=True))
  got = _f64(D.dlm_log_prob(jnp.asarray(x), jnp.asarray(params), M))
  want_px = np_dlm_log_prob_per_pixel(x, params, M)
  assert got_px.shape == (3, 6, 6) and got.shape == (3,)
  assert np.all(np.isfinite(got_px))
  # float32 sigma(a) - sigma(b) cancels when both sigmoids are near 1; allow for that absolute error.
  np.testing.assert_allclose(got_px, want_px, rtol=1e-4, atol=5e-3)
  np.testing.assert_allclose(got, want_px.sum(axis=(1, 2)), rtol=1e-4, atol=2e-2)
  np.testing.assert_allclose(got, got_px.sum(axis=(1, 2)), rtol=1e-5)


def test_dlm_log_prob_branches_single_component():
  """One component, one pixel, each branch of SPEC 1.5 hit deliberately (compared in float64)."""
  M = 1

  def params_for(mu, log_s, coef=(0.0, 0.0, 0.0)):
    rest = np.stack([np.asarray(mu, np.float64), np.asarray(log_s, np.float64), np.asarray(coef, np.float64)],
                    axis=-1)  # [3 colours, (mean, log_s, coef)]
    return np.concatenate([[0.0], rest.reshape(-1)]).astype(np.float32)[None, None, None]

  cases = [
      # (x in [0,1], means, log-scales): edge low, edge high, middle, fallback (tiny scale, far), clamp < -7
      ((0.0, 1.0, 0.5), (-0.9, 0.8, 0.1), (-2.0, -2.5, -3.0)),
      ((0.3, 0.7, 0.2), (0.9, -0.9, -0.6), (-7.0, -6.5, -9.0)),   # fallback branch + clamp at -7
      ((0.5, 0.5, 0.5), (0.0, 0.0, 0.0), (-12.0, -1.0, 0.5)),
  ]
  for xs, mus, lss in cases:
    p = params_for(mus, lss, (0.3, -0.7, 1.2))
    x = np.asarray(xs, np.float32)[None, None, None]
    got = float(D.dlm_log_prob(jnp.asarray(x), jnp.asarray(p), M, per_pixel=True)[0, 0, 0])
    want = float(np_dlm_log_prob_per_pixel(x, p, M)[0, 0, 0])
    assert math.isfinite(got)
    assert got == pytest.approx(want, rel=1e-4, abs=1e-3), (xs, mus, lss)


def test_dlm_normalises_over_all_bin_centres_with_colour_coupling():
  """Sum over all 256^3 (R, G, B) bin centres k/255 of p(x) is 1 with non-zero colour coefficients: each
  conditional telescopes over its 256 bins whatever its (autoregressive) mean. One component keeps this at 16.7M
  evaluations; the mixture's normalisation is checked per colour below."""
  total = helpers_dlm.grid_total(helpers_dlm.coupled_params(), 1, np.arange(256) / 255.0)
  assert abs(total - 1.0) < 1e-4, total
  # Off the bins (the old bin_centre map (2k+1)/512) the same sum is not 1: the check can fail.
  off = helpers_dlm.grid_total(helpers_dlm.coupled_params(), 1, (2 * np.arange(256) + 1) / 512.0)
  assert abs(off - 1.0) > 0.05, off


def _logistic_bin_mass(x01, mu, log_s):
  """Mass of the interior bin centred on x01 (mapped to [-1, 1]) under a logistic(mu, e^log_s), float64."""
  x = 2.0 * np.float64(x01) - 1.0
  s = math.exp(log_s)
  return special.expit((x - mu + 1 / 255) / s) - special.expit((x - mu - 1 / 255) / s)


@pytest.mark.parametrize("colour", [0, 1, 2])
def test_dlm_mixture_normalises_per_colour(colour):
  """10 components differ only in one colour; the other two colours share their parameters across components
  and the coefficients are 0, so p(r, g, b) = p_mix(x_c) * p(x_o1) * p(x_o2). Summing the library's
  probabilities over the 256 values of colour c and dividing by the other colours' float64 bin masses gives
  the mixture's total mass, which must be 1."""
  M = 10
  rs = np.random.RandomState(11 + colour)
  logits = 2.0 * rs.randn(M)
  means = np.zeros((3, M))
  log_s = np.zeros((3, M))
  means[colour] = rs.uniform(-1.1, 1.1, M)         # components near and beyond the edges
  log_s[colour] = rs.uniform(-6.0, -0.5, M)
  others = [c for c in range(3) if c != colour]
  fixed = {others[0]: (0.2, -0.3, -2.0), others[1]: (0.7, 0.5, -2.5)}  # value, mean, log-scale
  for c, (_, mu, ls) in fixed.items():
    means[c], log_s[c] = mu, ls
  coef = np.zeros((3, M))
  params = np.concatenate([logits, np.concatenate([means, log_s, coef], axis=-1).reshape(-1)]).astype(np.float32)
  x = np.zeros((1, 256, 1, 3), np.float32)
  x[0, :, 0, colour] = np.arange(256) / 255.0
  for c, (v, _, _) in fixed.items():
    x[..., c] = v
  lp = D.dlm_log_prob(jnp.asarray(x), jnp.broadcast_to(jnp.asarray(params), (1, 256, 1, 10 * M)), M,
                      per_pixel=True)
  total = np.exp(_f64(lp)).sum()
  other_mass = np.prod([_logistic_bin_mass(np.float32(v), mu, ls) for v, mu, ls in fixed.values()])
  assert total / other_mass == pytest.approx(1.0, abs=1e-4)


def test_dlm_sample_in_unit_interval():
  params = _random_dlm(9, (4, 5, 5), 10)
  params[..., :10] *= 3.0
  s = _f64(D.dlm_sample(jax.random.key(2), jnp.asarray(params), 10))
  assert s.shape == (4, 5, 5, 3)
  assert np.all((s >= 0.0) & (s <= 1.0))
  assert np.unique(s).size > 50  # not degenerate


def test_dlm_sample_dominant_component():
  """A component with logit 100 and log-scale -7 (sigma ~ 9e-4): the sample is that component's mean, with the
  colour coupling mu_G += c0 x_R, mu_B += c1 x_R + c2 x_G applied to the sampled values, mapped to [0, 1]."""
  M, j = 10, 3
  rs = np.random.RandomState(10)
  logits = np.zeros(M)
  logits[j] = 100.0
  means = rs.uniform(-0.6, 0.6, (3, M))
  log_s = np.full((3, M), -7.0)
  log_s[:, j] = -9.0  # clamped to -7
  coef_raw = rs.randn(3, M)
  params = np.concatenate([logits, np.concatenate([means, log_s, coef_raw], axis=-1).reshape(-1)])
  params = np.broadcast_to(params.astype(np.float32), (64, 10 * M))
  s = _f64(D.dlm_sample(jax.random.key(3), jnp.asarray(params), M))
  c = np.tanh(coef_raw[:, j])
  r = means[0, j]
  g = means[1, j] + c[0] * r
  b = means[2, j] + c[1] * r + c[2] * g
  want = (np.array([r, g, b]) + 1.0) / 2.0
  # max logistic noise with u in [1e-5, 1 - 1e-5]: e^-7 * 11.5 ~ 0.011 in [-1, 1], propagated through |c| < 1
  np.testing.assert_allclose(s, np.broadcast_to(want, s.shape), atol=0.02)


def test_dlm_sample_red_marginal_matches_log_prob():
  """Binned red-channel samples of a 3-component mixture match the mixture's bin probabilities."""
  M = 3
  logits = np.array([0.5, -0.3, 1.0])
  means = np.array([[-0.5, 0.2, 0.7], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
  log_s = np.array([[-2.0, -2.5, -1.5], [-1.0] * 3, [-1.0] * 3])
  coef = np.zeros((3, M))
  params = np.concatenate([logits, np.concatenate([means, log_s, coef], axis=-1).reshape(-1)]).astype(np.float32)
  n = 40000
  s = _f64(D.dlm_sample(jax.random.key(4), jnp.broadcast_to(jnp.asarray(params), (n, 10 * M)), M))
  bins = np.clip(np.round(s[:, 0] * 255.0), 0, 255).astype(int)
  # exact bin probabilities of R (float64): mixture of logistic bin masses, edges to +-infinity
  edges = (2.0 * np.arange(257) - 1.0) / 255.0 - 1.0  # bin k spans [x_k - 1/255, x_k + 1/255]
  edges[0], edges[-1] = -np.inf, np.inf
  w = special.softmax(logits)
  cdf = sum(w[m] * special.expit((edges - means[0, m]) / math.exp(log_s[0, m])) for m in range(M))
  prob = np.diff(cdf)
  groups = np.arange(256) // 16
  exp_g = np.bincount(groups, prob, 16)
  obs_g = np.bincount(groups[bins], minlength=16) / n
  se = np.sqrt(exp_g * (1 - exp_g) / n)
  assert np.all(np.abs(obs_g - exp_g) < 5 * se + 1e-4), (obs_g, exp_g)
  # The library's log-prob gives the same bin probabilities: G and B have identical parameters in every
  # component, so p(r, g, b) = p(r) p(g) p(b) and p(r_k) = p(r_k, g0, b0) / (p(g0) p(b0)).
  k = np.arange(256, dtype=np.float32) / 255.0
  x = np.stack([k, np.full(256, 0.5, np.float32), np.full(256, 0.5, np.float32)], axis=-1)[None, :, None, :]
  lp = _f64(D.dlm_log_prob(jnp.asarray(x), jnp.broadcast_to(jnp.asarray(params), (1, 256, 1, 10 * M)), M,
                           per_pixel=True))[0, :, 0]
  gb = special.expit((1.0 / 255.0) / math.exp(-1.0)) - special.expit((-1.0 / 255.0) / math.exp(-1.0))
  np.testing.assert_allclose(np.exp(lp) / gb ** 2, prob, rtol=2e-3, atol=1e-7)
