"""Tests for hvaeood.bounds: log-mean-exp, the chunked importance-weighted bounds (reproduced exactly from single
forward passes with the documented key schedule), LLR, free nats and bits/dim (SPEC 2, 3)."""

import math
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from configs import fashion_mnist_hvae  # noqa: E402
from hvaeood import bounds  # noqa: E402
from hvaeood.models import build_model  # noqa: E402
from hvaeood.models.blocks import Output  # noqa: E402

LN2 = math.log(2.0)


@pytest.fixture(autouse=True)
def _fast_threefry():
  """Non-partitionable threefry compiles several times faster on CPU. The tests reproduce the library's key
  schedule with the same bit generator, so they do not depend on which one is used."""
  with jax.threefry_partitionable(False):
    yield


@pytest.fixture(scope="module")
def tiny():
  with jax.threefry_partitionable(False):
    cfg = fashion_mnist_hvae.get_config("tiny")
    model = build_model(cfg.model, (28, 28, 1))
    x = (np.random.RandomState(0).rand(32, 28, 28, 1) < 0.4).astype(np.float32)
    # eager init on 6 examples (shares the primitive compile cache with test_models.py in one session)
    params = model.init({"params": jax.random.key(0), "sample": jax.random.key(1)}, jnp.asarray(x[:6]),
                        0)["params"]
  return model, params, x


_apply = jax.jit(bounds.apply_model, static_argnums=(0, 5))


def _np(a):
  return np.asarray(a, np.float64)


def _np_log_mean_exp(v, axis=0):
  v = _np(v)
  m = np.max(v, axis=axis, keepdims=True)
  return np.squeeze(m, axis) + np.log(np.mean(np.exp(v - m), axis=axis))


# --------------------------------------------------------------------------------------------------------------
# log-mean-exp and bits/dim


def test_log_mean_exp_matches_naive_float64():
  v = (3.0 * np.random.RandomState(0).randn(7, 5)).astype(np.float32)
  naive = np.log(np.mean(np.exp(_np(v)), axis=0))
  np.testing.assert_allclose(_np(bounds.log_mean_exp(jnp.asarray(v))), naive, rtol=1e-5, atol=1e-6)
  naive1 = np.log(np.mean(np.exp(_np(v)), axis=1))
  np.testing.assert_allclose(_np(bounds.log_mean_exp(jnp.asarray(v), axis=1)), naive1, rtol=1e-5, atol=1e-6)
  # a mean, not a sum: S identical values give that value
  np.testing.assert_allclose(_np(bounds.log_mean_exp(jnp.full((1000,), -3.5))), -3.5, atol=1e-5)


def test_log_mean_exp_stable_for_large_negative_values():
  v = (-1e4 + 5.0 * np.random.RandomState(1).randn(64, 3)).astype(np.float32)
  with np.errstate(divide="ignore"):
    assert np.all(np.isinf(np.log(np.mean(np.exp(_np(v)), axis=0))))  # naive underflows
  got = _np(bounds.log_mean_exp(jnp.asarray(v)))
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, _np_log_mean_exp(v), rtol=0, atol=5e-3)  # float32 spacing at 1e4 is ~1e-3


def test_bits_per_dim():
  assert float(bounds.bits_per_dim(jnp.float32(-784 * LN2), 784)) == pytest.approx(1.0, rel=1e-6)
  assert float(bounds.bits_per_dim(jnp.float32(-3072 * 3.74 * LN2), 3072)) == pytest.approx(3.74, rel=1e-6)


# --------------------------------------------------------------------------------------------------------------
# importance-weighted bounds


def _layout(S, S_k, ks, chunk):
  """Expected row layout: ELBO rows first, then S_k rows per k in order; padded with (skip 0, group -1)."""
  skips = [0] * S + [k for k in ks for _ in range(S_k)]
  groups = [0] * S + [g for g in range(1, len(ks) + 1) for _ in range(S_k)]
  n = -(-len(skips) // chunk)
  pad = n * chunk - len(skips)
  return (np.array(skips + [0] * pad).reshape(n, chunk), np.array(groups + [-1] * pad).reshape(n, chunk))


@pytest.mark.parametrize("max_rows,chunk", [(8, 2), (12, 3), (2048, 7)])
def test_iw_bounds_reproduce_single_passes(tiny, max_rows, chunk):
  """With B = 4, S = 3, S_k = 2, ks = (1, 2) there are 7 rows, evaluated in chunks of max_rows // B rows; chunk
  i uses fold_in(rng, i). Recomputing every chunk with `apply_model` and taking float64 log-mean-exps per group
  must give exactly the streamed result (this checks the running max/sum, padding and grouping)."""
  model, params, x = tiny
  xb = jnp.asarray(x[:4])
  S, S_k, ks = 3, 2, (1, 2)
  rng = jax.random.key(11)
  res = bounds.compute_bounds(model, params, xb, rng, iw_samples=S, iw_samples_k=S_k, ks=ks, max_rows=max_rows)
  skips, groups = _layout(S, S_k, ks, chunk)
  vals = {g: [] for g in range(len(ks) + 1)}
  log_px, kls = [], []
  for i, (sk, gr) in enumerate(zip(skips, groups)):
    out = _apply(model, params, xb, jnp.asarray(sk, jnp.int32), jax.random.fold_in(rng, i), False)
    for j, g in enumerate(gr):
      if g < 0:
        continue
      vals[g].append(_np(out.elbo[j]))
      if g == 0:
        log_px.append(_np(out.log_px[j]))
        kls.append([_np(k[j]) for k in out.kl])
  assert [len(vals[g]) for g in vals] == [S] + [S_k] * len(ks)
  elbo = _np_log_mean_exp(np.stack(vals[0]))
  lk = np.stack([_np_log_mean_exp(np.stack(vals[g])) for g in range(1, len(ks) + 1)])
  assert res.elbo.shape == (4,) and res.lk.shape == (2, 4) and res.llr.shape == (2, 4)
  assert res.kl.shape == (3, 4) and res.log_px.shape == (4,) and tuple(res.ks) == ks
  np.testing.assert_allclose(_np(res.elbo), elbo, rtol=1e-5)
  np.testing.assert_allclose(_np(res.lk), lk, rtol=1e-5)
  np.testing.assert_allclose(_np(res.llr), elbo[None] - lk, rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(_np(res.log_px), np.mean(log_px, axis=0), rtol=1e-5)
  np.testing.assert_allclose(_np(res.kl), np.mean(kls, axis=0), rtol=1e-5)
  # LLR is exactly the difference of the two reported bounds
  np.testing.assert_array_equal(_np(res.llr), _np(res.elbo[None] - res.lk))
  # the ELBO's own S samples are distinct (not one sample repeated)
  assert np.all(np.std(np.stack(vals[0]), axis=0) > 0)


@pytest.mark.parametrize("S,max_rows", [(1, 2048), (2, 8)])
def test_l0_is_the_elbo_rows_when_s_k_equals_s(tiny, S, max_rows):
  """With S_k = S and k = 0 in ks, L>0 is not recomputed: the rows are the ELBO's S, then S per k >= 1
  ([0 | 1 | 2] for S = 1; [0, 0 | 1, 1 | 2, 2] in chunks of 2 for S = 2), L>0 equals the reported ELBO
  bitwise (LLR>0 = 0), and every other bound is the log-mean-exp of its own rows of that layout."""
  model, params, x = tiny
  xb = jnp.asarray(x[:4])
  ks, rng = (0, 1, 2), jax.random.key(5)
  res = bounds.compute_bounds(model, params, xb, rng, iw_samples=S, iw_samples_k=S, ks=ks, max_rows=max_rows)
  chunk = min(3 * S, max_rows // 4)
  skips, groups = _layout(S, S, (1, 2), chunk)
  vals = {g: [] for g in range(3)}
  for i, (sk, gr) in enumerate(zip(skips, groups)):
    out = _apply(model, params, xb, jnp.asarray(sk, jnp.int32), jax.random.fold_in(rng, i), False)
    for j, g in enumerate(gr):
      if g >= 0:
        vals[g].append(_np(out.elbo[j]))
  elbo = _np_log_mean_exp(np.stack(vals[0]))
  np.testing.assert_allclose(_np(res.elbo), elbo, rtol=1e-5)
  np.testing.assert_array_equal(_np(res.lk[0]), _np(res.elbo))
  np.testing.assert_array_equal(_np(res.llr[0]), np.zeros(4))
  for g in (1, 2):
    np.testing.assert_allclose(_np(res.lk[g]), _np_log_mean_exp(np.stack(vals[g])), rtol=1e-5)
  # k = 0 elsewhere than first, and alone
  alone = bounds.compute_bounds(model, params, xb, rng, iw_samples=S, iw_samples_k=S, ks=(2, 0), max_rows=max_rows)
  np.testing.assert_array_equal(_np(alone.lk[1]), _np(alone.elbo))
  only = bounds.compute_bounds(model, params, xb, rng, iw_samples=S, iw_samples_k=S, ks=(0,), max_rows=max_rows)
  np.testing.assert_array_equal(_np(only.lk), _np(only.elbo)[None])


def test_iw_elbo_exceeds_single_sample_elbo(tiny):
  """Jensen: per example the IW bound >= the mean of the same samples' single-sample ELBOs (which compute_bounds
  reports as log_px - sum kl, both averaged over the S samples); and over 32 examples, IW with S = 8 beats the
  single-sample ELBO estimated with other draws."""
  model, params, x = tiny
  xb = jnp.asarray(x)
  a = bounds.compute_bounds(model, params, xb, jax.random.key(21), iw_samples=8, ks=(1,))
  b = bounds.compute_bounds(model, params, xb, jax.random.key(22), iw_samples=8, ks=(1,))
  for r in (a, b):
    mean_single = _np(r.log_px) - _np(r.kl).sum(0)
    assert np.all(_np(r.elbo) >= mean_single - 1e-3 * np.abs(mean_single))
  iw = _np(a.elbo).mean()
  single = (_np(b.log_px) - _np(b.kl).sum(0)).mean()
  assert iw > single
  assert np.all(np.isfinite(_np(a.lk))) and np.all(np.isfinite(_np(a.llr)))


def test_compute_bounds_argument_errors(tiny):
  model, params, x = tiny
  xb = jnp.asarray(x[:2])
  for ks in ((3,), (-1,), (0, 5)):
    with pytest.raises(ValueError, match="out of range"):
      bounds.compute_bounds(model, params, xb, jax.random.key(0), ks=ks)
  with pytest.raises(ValueError, match=">= 1"):
    bounds.compute_bounds(model, params, xb, jax.random.key(0), iw_samples=0)
  with pytest.raises(ValueError, match=">= 1"):
    bounds.compute_bounds(model, params, xb, jax.random.key(0), iw_samples_k=0)


# --------------------------------------------------------------------------------------------------------------
# free nats and the training loss


def _hand_kl_elem():
  rs = np.random.RandomState(3)
  conv = rs.uniform(-0.5, 1.0, (2, 3, 2, 2, 3)).astype(np.float32)  # [R, B, H, W, C], includes negatives
  dense = rs.uniform(-1.0, 1.5, (2, 3, 4)).astype(np.float32)       # [R, B, D]
  return conv, dense


@pytest.mark.parametrize("granularity,floors", [("per_layer_total", (2.0 / 12, 2.0 / 4)),
                                                ("per_channel", (2.0 / 3, 2.0 / 4))])
def test_free_nats_kl_floors(granularity, floors):
  conv, dense = _hand_kl_elem()
  lam = 2.0
  got = _np(bounds.free_nats_kl([jnp.asarray(conv), jnp.asarray(dense)], lam, granularity))
  want = (np.maximum(_np(conv), floors[0]).reshape(2, 3, -1).sum(-1)
          + np.maximum(_np(dense), floors[1]).reshape(2, 3, -1).sum(-1))
  assert got.shape == (2, 3)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # lambda may be a traced value (it is annealed)
  jitted = jax.jit(lambda lam_: bounds.free_nats_kl([jnp.asarray(conv), jnp.asarray(dense)], lam_, granularity))
  np.testing.assert_allclose(_np(jitted(jnp.float32(lam))), want, rtol=1e-6)


def test_free_nats_identities():
  zeros = [jnp.zeros((1, 2, 3, 3, 4)), jnp.zeros((1, 2, 5))]
  lam = 1.5
  # all-zero KL: lambda nats per layer (paper) ...
  np.testing.assert_allclose(_np(bounds.free_nats_kl(zeros, lam, "per_layer_total")), 2 * lam, rtol=1e-6)
  # ... or lambda per spatial position of a conv latent, lambda per dense latent (reference HEAD)
  np.testing.assert_allclose(_np(bounds.free_nats_kl(zeros, lam, "per_channel")), 9 * lam + lam, rtol=1e-6)
  # lambda = 0: the raw KL, negative single-sample elements included (the reference's FreeNats(0) is the identity)
  conv, dense = _hand_kl_elem()
  assert (conv < 0).any() and (dense < 0).any()
  want = _np(conv).reshape(2, 3, -1).sum(-1) + _np(dense).reshape(2, 3, -1).sum(-1)
  for g in ("per_layer_total", "per_channel"):
    np.testing.assert_allclose(_np(bounds.free_nats_kl([jnp.asarray(conv), jnp.asarray(dense)], 0.0, g)), want,
                               rtol=1e-6)
    # ... also when lambda is traced and reaches 0 at the end of the anneal
    jitted = jax.jit(lambda lam_: bounds.free_nats_kl([jnp.asarray(conv), jnp.asarray(dense)], lam_, g))
    np.testing.assert_allclose(_np(jitted(jnp.float32(0.0))), want, rtol=1e-6)
  with pytest.raises(ValueError, match="granularity"):
    bounds.free_nats_kl(zeros, lam, "per_pixel")


def test_batch_free_bits_floor_the_batch_mean_with_padding_weights_against_float64():
  """'per_layer_batch': per layer max(lambda, weighted batch mean of the KL), no gradient to a layer under lambda."""
  rs = np.random.RandomState(11)
  conv = rs.normal(0.05, 0.3, (2, 5, 2, 2, 3))   # [R, B, H, W, C]: layer mean about 0.6 per example
  dense = rs.normal(1.0, 0.8, (2, 5, 4))         # [R, B, D]: about 4 per example
  weights = np.array([1.0, 1.0, 0.0, 1.0, 0.0])  # two padding rows
  conv[:, 2] += 50.0                             # a padding row that would lift the conv layer over lambda
  lam = 2.0
  k_conv = conv.reshape(2, 5, -1).sum(-1)
  k_dense = dense.reshape(2, 5, -1).sum(-1)
  mean = lambda k: (k * weights).sum() / (2 * weights.sum())  # noqa: E731
  assert mean(k_conv) < lam < mean(k_dense) and k_conv.mean() > lam
  want = np.full_like(k_conv, lam) + k_dense      # conv under the floor: the constant lambda per example
  args = ([jnp.asarray(conv, jnp.float32), jnp.asarray(dense, jnp.float32)],)

  def f(kls, lam_):
    return bounds.free_nats_kl(kls, lam_, "per_layer_batch", jnp.asarray(weights, jnp.float32))

  np.testing.assert_allclose(_np(f(*args, lam)), want, rtol=1e-5)
  np.testing.assert_allclose(_np(jax.jit(f)(*args, jnp.float32(lam))), want, rtol=1e-5)
  # the weighted batch mean of the result is the sum over layers of max(lambda, the layer's weighted mean)
  got_mean = (_np(f(*args, lam)) * weights).sum() / (2 * weights.sum())
  np.testing.assert_allclose(got_mean, max(lam, mean(k_conv)) + max(lam, mean(k_dense)), rtol=1e-5)
  # gradient of that mean: zero for the floored conv layer, w_b / (R * sum w) per element of the dense layer
  g_conv, g_dense = jax.grad(
      lambda kls: jnp.sum(f(kls, lam) * jnp.asarray(weights, jnp.float32)) / (2 * weights.sum()))(args[0])
  np.testing.assert_array_equal(_np(g_conv), 0.0)
  np.testing.assert_allclose(_np(g_dense), np.broadcast_to((weights / (2 * weights.sum()))[None, :, None],
                                                            dense.shape), rtol=1e-6)
  # without weights every row counts: the padding row lifts the conv layer's mean over lambda, so it is raw
  np.testing.assert_allclose(_np(bounds.free_nats_kl(*args, lam, "per_layer_batch")), k_conv + k_dense,
                             rtol=1e-5)
  # lambda = 0: the raw KL
  np.testing.assert_allclose(_np(f(*args, 0.0)), k_conv + k_dense, rtol=1e-5)
  # training_loss hands the padding weights to the floor: loss = weighted mean of -log p + beta * floored KL
  log_px = rs.normal(-100.0, 10.0, (2, 5))
  out = types.SimpleNamespace(log_px=jnp.asarray(log_px, jnp.float32), kl_elem=tuple(args[0]), elbo=None)
  loss, _ = bounds.training_loss(out, jnp.float32(0.5), jnp.float32(lam), "per_layer_batch",
                                 jnp.asarray(weights, jnp.float32))
  want_loss = ((-log_px + 0.5 * want) * weights).sum() / (2 * weights.sum())
  assert float(loss) == pytest.approx(want_loss, rel=1e-6)


def test_training_loss():
  conv, dense = _hand_kl_elem()
  log_px = np.array([[-10.0, -20.0, -30.0], [-5.0, -6.0, -7.0]], np.float32)
  kl = (jnp.asarray(conv.reshape(2, 3, -1).sum(-1)), jnp.asarray(dense.sum(-1)))
  out = Output(jnp.asarray(log_px), kl, (jnp.asarray(conv), jnp.asarray(dense)), jnp.zeros((2, 3, 1, 1, 1)))
  beta, lam = 0.3, 2.0
  loss, elbo = bounds.training_loss(out, jnp.float32(beta), jnp.float32(lam))
  floored = (np.maximum(_np(conv), lam / 12).reshape(2, 3, -1).sum(-1)
             + np.maximum(_np(dense), lam / 4).reshape(2, 3, -1).sum(-1))
  assert float(loss) == pytest.approx(np.mean(-_np(log_px) + beta * floored), rel=1e-6)
  np.testing.assert_allclose(_np(elbo), _np(log_px) - conv.reshape(2, 3, -1).sum(-1) - dense.sum(-1), rtol=1e-6)
