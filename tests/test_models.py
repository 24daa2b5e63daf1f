"""Tests for hvaeood.models: the paper configs' latent shapes and parameter counts (SPEC 1.6), forward shapes,
and the L^{>k} mechanics (SPEC 2) on the `tiny` FashionMNIST variant.

The CIFAR model is only traced (`jax.eval_shape`), never run: compiling it on CPU is slow.
"""

import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from configs import cifar10_hvae, fashion_mnist_hvae  # noqa: E402
from hvaeood.models import build_model, count_params  # noqa: E402

FMNIST_SHAPE = (28, 28, 1)
CIFAR_SHAPE = (32, 32, 3)
B = 6


@pytest.fixture(autouse=True)
def _fast_threefry():
  """Non-partitionable threefry compiles several times faster on CPU. Everything asserted here is about how the
  model uses its draws (same key -> same draws), not about the bit generator."""
  with jax.threefry_partitionable(False):
    yield


def _paper_model(mod, shape):
  return build_model(mod.get_config().model, shape)


def _param_shapes(model, shape):
  """Parameter tree of the data-dependent init, built from shapes only (no compile, no real batch)."""
  def init(x):
    return model.init({"params": jax.random.key(0), "sample": jax.random.key(1)}, x, 0)["params"]
  return jax.eval_shape(init, jax.ShapeDtypeStruct((2,) + tuple(shape), jnp.float32))


def _tiny(inference="bottom_up"):
  cfg = fashion_mnist_hvae.get_config("tiny")
  cfg.model.inference = inference
  model = build_model(cfg.model, FMNIST_SHAPE)
  x = (np.random.RandomState(0).rand(B, *FMNIST_SHAPE) < 0.4).astype(np.float32)
  # Eager init: the per-primitive compile cache makes a second (ladder) init almost free.
  params = model.init({"params": jax.random.key(0), "sample": jax.random.key(1)}, jnp.asarray(x), 0)["params"]
  return model, params, x


@pytest.fixture(scope="module")
def tiny():
  with jax.threefry_partitionable(False):
    return _tiny()


@pytest.fixture(scope="module")
def tiny_ladder():
  with jax.threefry_partitionable(False):
    return _tiny("ladder")


def _fwd(model, params, x, n_skip, seed, prior_sample=False):
  return _fwd_jit(model, params, jnp.asarray(x), jnp.asarray(n_skip, jnp.int32), jax.random.key(seed),
                  prior_sample)


def _fwd_impl(model, params, x, n_skip, key, prior_sample):
  return model.apply({"params": params}, x, n_skip, prior_sample, rngs={"sample": key})


_fwd_jit = jax.jit(_fwd_impl, static_argnums=(0, 5))


def _np(a):
  return np.asarray(a, np.float64)


# --------------------------------------------------------------------------------------------------------------
# paper configurations (SPEC 1.6)


def test_latent_shapes_paper_configs():
  assert _paper_model(fashion_mnist_hvae, FMNIST_SHAPE).spec.latent_shapes() == ((14, 14, 8), (16,), (8,))
  assert _paper_model(cifar10_hvae, CIFAR_SHAPE).spec.latent_shapes() == ((16, 16, 128), (8, 8, 64), (32,))
  # latent dims of the table: 1568 + 16 + 8 and 32768 + 4096 + 32
  dims = [math.prod(s) for s in _paper_model(cifar10_hvae, CIFAR_SHAPE).spec.latent_shapes()]
  assert dims == [32768, 4096, 32]
  dims = [math.prod(s) for s in _paper_model(fashion_mnist_hvae, FMNIST_SHAPE).spec.latent_shapes()]
  assert dims == [1568, 16, 8]


def _conv(k, cin, cout):
  return k * k * cin * cout + 2 * cout  # v, g, b of a weight-normed conv


def _dense(nin, nout):
  return nin * nout + 2 * nout


def _fmnist_by_hand():
  """SPEC 1.6, FashionMNIST column, per top-level module (64 channels; conv latent 8 @ 14x14; dense 16, 8).

  Encoders: 3 blocks x 2 convs; inference skips are dropped (identical shapes), so no aux convs.
  Decoders: Dec_3 gets no skips; in Dec_2 and Dec_1, block 0's skip has conv1's shape (dropped), blocks 1 and 2
  get a stride-2 transposed aux conv (kernel k). Conv latents project by identity (no params)."""
  c = 64
  return {
      "enc1": _conv(5, 1, c) + 5 * _conv(5, c, c),
      "q1": _conv(3, c, 2 * 8),
      "enc2": _conv(3, 8, c) + 5 * _conv(3, c, c),
      "q2": _dense(c * 7 * 7, 2 * 16),
      "q_proj2": _dense(16, c * 7 * 7),
      "enc3": 6 * _conv(3, c, c),
      "q3": _dense(c * 7 * 7, 2 * 8),
      "p_proj3": _dense(8, c * 7 * 7),
      "dec3": 6 * _conv(3, c, c),
      "p2": _dense(c * 7 * 7, 2 * 16),
      "p_proj2": _dense(16, c * 7 * 7),
      "dec2": 6 * _conv(3, c, c) + 2 * _conv(3, c, c),
      "p1": _conv(3, c, 2 * 8),
      "dec1": _conv(5, 8, c) + 5 * _conv(5, c, c) + 2 * _conv(5, c, c),
      "likelihood": _conv(3, c, 1),
  }


def _cifar_by_hand():
  """SPEC 1.6, CIFAR10 column (256 channels; conv latents 128 @ 16x16, 64 @ 8x8; dense 32; 1x1 conv to 100)."""
  c = 256
  return {
      "enc1": _conv(5, 3, c) + 5 * _conv(5, c, c),
      "q1": _conv(3, c, 2 * 128),
      "enc2": _conv(3, 128, c) + 5 * _conv(3, c, c),
      "q2": _conv(3, c, 2 * 64),
      "enc3": _conv(3, 64, c) + 5 * _conv(3, c, c),
      "q3": _dense(c * 4 * 4, 2 * 32),
      "p_proj3": _dense(32, c * 4 * 4),
      "dec3": 6 * _conv(3, c, c),
      "p2": _conv(3, c, 2 * 64),
      "dec2": _conv(3, 64, c) + 5 * _conv(3, c, c) + 2 * _conv(3, c, c),
      "p1": _conv(3, c, 2 * 128),
      "dec1": _conv(5, 128, c) + 5 * _conv(5, c, c) + 2 * _conv(5, c, c),
      "likelihood": _conv(1, c, 100),
  }


@pytest.mark.parametrize("mod,shape,by_hand,total,top_q_proj,spec_total", [
    (fashion_mnist_hvae, FMNIST_SHAPE, _fmnist_by_hand, 2_588_898, 31_360, 2_620_258),
    (cifar10_hvae, CIFAR_SHAPE, _cifar_by_hand, 36_873_800, 139_264, 37_013_064),
])
def test_param_counts_paper_configs(mod, shape, by_hand, total, top_q_proj, spec_total):
  params = _param_shapes(_paper_model(mod, shape), shape)
  assert count_params(params) == total
  expected = by_hand()
  got = {name: count_params(sub) for name, sub in params.items()}
  assert got == expected
  assert sum(expected.values()) == total
  # SPEC counts the reference's unused top q-projection (dense latent_dim -> C*H*W, with g and b) too; this
  # implementation does not build it.
  spec = _paper_model(mod, shape).spec
  h, w, c = spec.encoder_output_shapes()[-1]
  assert _dense(spec.stages[-1].latent_dim, h * w * c) == top_q_proj
  assert "q_proj3" not in params
  assert total + top_q_proj == spec_total
  assert round(spec_total / 1e6, 2) in (2.62, 37.01)


# --------------------------------------------------------------------------------------------------------------
# forward pass on the tiny variant


def test_forward_output_shapes(tiny):
  model, params, x = tiny
  out = _fwd(model, params, x, np.arange(3), 1)
  assert out.log_px.shape == (3, B)
  assert len(out.kl) == 3 and all(k.shape == (3, B) for k in out.kl)
  latents = model.spec.latent_shapes()
  assert latents == ((14, 14, 4), (4,), (4,))
  assert [k.shape for k in out.kl_elem] == [(3, B) + s for s in latents]
  assert out.lik_params.shape == (3, B) + FMNIST_SHAPE
  assert out.elbo.shape == (3, B)
  for a in [out.log_px, *out.kl]:
    assert np.all(np.isfinite(_np(a)))


def test_wrong_input_shape_raises(tiny):
  model, params, _ = tiny
  bad = jnp.zeros((2, 32, 32, 1))
  with pytest.raises(ValueError, match=r"\(28, 28, 1\)"):
    model.apply({"params": params}, bad, jnp.arange(2), rngs={"sample": jax.random.key(0)})
  with pytest.raises(ValueError, match=r"\(28, 28, 1\)"):
    model.apply({"params": params}, jnp.zeros((2, 28, 28, 3)), 0, rngs={"sample": jax.random.key(0)})


def test_log_px_is_bernoulli_of_lik_params_and_kl_sums(tiny):
  """log p(x|z) of every replica equals sum x*l - log(1 + e^l) of its own logits (float64 numpy), and each
  layer's KL is the sum of its elementwise KL."""
  model, params, x = tiny
  out = _fwd(model, params, x, [0, 1, 2], 2)
  l = _np(out.lik_params)
  want = (x[None] * l - np.logaddexp(0.0, l)).reshape(3, B, -1).sum(-1)
  np.testing.assert_allclose(_np(out.log_px), want, rtol=1e-5, atol=1e-3)
  assert np.all(_np(out.log_px) <= 0.0)
  for kl, elem in zip(out.kl, out.kl_elem):
    e = _np(elem).reshape(3, B, -1)
    np.testing.assert_allclose(_np(kl), e.sum(-1), rtol=1e-4, atol=1e-3 * np.abs(e).sum(-1).max())
  np.testing.assert_allclose(_np(out.elbo), _np(out.log_px) - sum(_np(k) for k in out.kl), rtol=1e-6)


def _assert_no_kl_below_k(out, ks):
  for r, k in enumerate(ks):
    for i in range(len(out.kl)):
      kl = _np(out.kl[i][r])
      elem = _np(out.kl_elem[i][r])
      if i < k:
        np.testing.assert_array_equal(kl, 0.0)
        np.testing.assert_array_equal(elem, 0.0)
      else:
        assert np.all(kl != 0.0), (r, k, i, kl)
        assert np.all(np.isfinite(kl))


def test_no_kl_terms_for_skipped_layers(tiny):
  model, params, x = tiny
  ks = [0, 1, 2]
  out = _fwd(model, params, x, ks, 3)
  _assert_no_kl_below_k(out, ks)
  ks = [2, 0, 1]
  _assert_no_kl_below_k(_fwd(model, params, x, ks, 4), ks)


def test_ladder_no_kl_terms_for_skipped_layers(tiny_ladder):
  model, params, x = tiny_ladder
  assert "merge1" in params and "merge2" in params and "q_proj2" not in params
  ks = [0, 1, 2]
  out = _fwd(model, params, x, ks, 3)
  _assert_no_kl_below_k(out, ks)
  assert np.all(np.isfinite(_np(out.elbo)))
  assert np.all(np.isfinite(_np(out.log_px)))


def test_l_greater_than_zero_is_the_elbo_under_the_same_key(tiny):
  """A replica with n_skip = 0 is the ELBO: it is bit-identical to the same replica of an all-ELBO call with the
  same key, whatever the other replicas compute (replicas share nothing random)."""
  model, params, x = tiny
  assert_l0_is_the_elbo(lambda ks, seed: _fwd(model, params, x, ks, seed))


def assert_l0_is_the_elbo(fwd):
  """`fwd(n_skip list, seed) -> Output`. The n_skip = 0 replica equals, bit for bit, the same replica of an all-ELBO
  call with the same key whatever the other replicas compute; k > 0 replicas are different bounds; ELBO replicas
  draw independent samples, and another key gives other values. Shared with the BIVA tests."""
  ref = fwd([0, 0, 0], 5)
  for ks in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
    out = fwd(ks, 5)
    r = ks.index(0)
    np.testing.assert_array_equal(_np(out.log_px[r]), _np(ref.log_px[r]))
    for a, b in zip(out.kl_elem, ref.kl_elem):
      np.testing.assert_array_equal(_np(a[r]), _np(b[r]))
    np.testing.assert_array_equal(_np(out.lik_params[r]), _np(ref.lik_params[r]))
    for rr, k in enumerate(ks):
      if k > 0:
        assert np.all(_np(out.log_px[rr]) != _np(ref.log_px[rr]))
  e = _np(ref.elbo)
  assert np.all(e[0] != e[1]) and np.all(e[1] != e[2])
  assert np.all(_np(fwd([0, 0, 0], 6).elbo) != e)


def test_prior_sample_only_changes_skipped_layers(tiny):
  """prior_sample=True (paper) vs False (reference prior mode), same key: k = 0 rows identical; k >= 1 rows
  change log p(x|z) but not the KL terms of the layers above k (their z are the same posterior samples)."""
  model, params, x = tiny
  ks = [0, 1, 2]
  assert_prior_sample_changes_only_skipped(_fwd(model, params, x, ks, 7, prior_sample=False),
                                           _fwd(model, params, x, ks, 7, prior_sample=True), ks)


def assert_prior_sample_changes_only_skipped(mode, samp, ks):
  """Outputs of the same replicas `ks` and key with prior_sample False (`mode`) and True (`samp`): k = 0 rows are
  identical; k >= 1 rows change log p(x|z) but not the KL terms of the layers (stages) above k; skipped ones carry
  no KL. Shared with the BIVA tests."""
  num_layers = len(mode.kl)
  np.testing.assert_array_equal(_np(mode.log_px[0]), _np(samp.log_px[0]))
  for a, b in zip(mode.kl, samp.kl):
    np.testing.assert_array_equal(_np(a[0]), _np(b[0]))
  for r, k in enumerate(ks):
    if k == 0:
      continue
    assert np.all(_np(mode.log_px[r]) != _np(samp.log_px[r]))
    for i in range(k, num_layers):
      np.testing.assert_array_equal(_np(mode.kl[i][r]), _np(samp.kl[i][r]))
    for i in range(k):
      np.testing.assert_array_equal(_np(samp.kl[i][r]), 0.0)


def test_inference_uses_posterior_means_below_k(tiny):
  """Bottom-up inference with n_skip = k feeds the posterior *mean* of z_1..z_k to the encoders above, so
  q(z_{k+1} | .) is the same for every replica with that k (no sample noise below it), while ELBO replicas
  (k = 0) each see their own z_1 sample."""
  model, params, x = tiny
  ks = [0, 0, 1, 1, 2, 2]

  @jax.jit
  def run(params, key):
    _, state = model.apply({"params": params}, jnp.asarray(x), jnp.asarray(ks, jnp.int32), rngs={"sample": key},
                           capture_intermediates=lambda mdl, _: mdl.name in ("q2", "q3"),
                           mutable=["intermediates"])
    inter = state["intermediates"]
    return inter["q2"]["__call__"][0], inter["q3"]["__call__"][0]

  q2, q3 = run(params, jax.random.key(9))
  q2_mu = _np(q2.mu).reshape(len(ks), B, -1)
  q3_mu = _np(q3.mu).reshape(len(ks), B, -1)
  q3_sigma = _np(q3.sigma).reshape(len(ks), B, -1)
  # q(z_2 | mean of z_1): identical for k = 1 and k = 2 rows
  for r in (3, 4, 5):
    np.testing.assert_array_equal(q2_mu[r], q2_mu[2])
  assert np.all(q2_mu[0] != q2_mu[1]) and np.all(q2_mu[0] != q2_mu[2])
  # q(z_3 | mean of z_2): identical for the two k = 2 rows; k = 1 rows sample z_2, so theirs differ
  np.testing.assert_array_equal(q3_mu[5], q3_mu[4])
  np.testing.assert_array_equal(q3_sigma[5], q3_sigma[4])
  assert np.all(q3_mu[2] != q3_mu[3]) and np.all(q3_mu[0] != q3_mu[1])


# --------------------------------------------------------------------------------------------------------------
# what each KL term pairs, and where skipped layers come from


def captured(model, params, x, ks, seed, names, prior_sample=False):
  """Forward pass that also returns the sown latents (the HVAE's z{i}, BIVA's z_td{i}/z_bu{i}) and the outputs of
  the modules in `names` (shared with the BIVA tests)."""
  @jax.jit
  def run(params, key):
    out, state = model.apply({"params": params}, jnp.asarray(x), jnp.asarray(ks, jnp.int32), prior_sample,
                             rngs={"sample": key}, capture_intermediates=lambda mdl, _: mdl.name in names,
                             mutable=["intermediates"])
    return out, state["intermediates"]
  return run(params, jax.random.key(seed))


def _rows(a, R):
  """[R*B, ...] (or [B, ...], shared by the replicas) -> float64 [R, B, n]."""
  a = _np(a)
  if a.shape[0] == B:
    a = np.broadcast_to(a[None], (R,) + a.shape)
  return a.reshape(R, B, -1)


def _log_normal(z, mu, sigma):
  return -0.5 * ((z - mu) / sigma) ** 2 - np.log(sigma) - 0.5 * math.log(2 * math.pi)


@pytest.mark.parametrize("fixture", ["tiny", "tiny_ladder"])
def test_each_kl_pairs_posterior_and_conditional_prior_at_the_same_z(fixture, request):
  """KL_l = log q(z_l | .) - log p(z_l | z_{l+1}) at the z_l the decoder uses, elementwise, with p = N(0, I) for the
  top layer; 0 for skipped layers. Recomputed in float64 from the captured heads q{l}, p{l} and the sown z{l}."""
  model, params, x = request.getfixturevalue(fixture)
  ks = [0, 1, 2, 0]
  R, L = len(ks), model.spec.num_layers
  names = tuple(f"q{i}" for i in range(1, L + 1)) + tuple(f"p{i}" for i in range(1, L))
  out, inter = captured(model, params, x, ks, 4, names)
  for i in range(1, L + 1):
    z = _rows(inter[f"z{i}"][0], R)
    q = inter[f"q{i}"]["__call__"][0]
    q_mu, q_sigma = _rows(q.mu, R), _rows(q.sigma, R)
    if i < L:
      p = inter[f"p{i}"]["__call__"][0]
      p_mu, p_sigma = _rows(p.mu, R), _rows(p.sigma, R)
    else:
      p_mu, p_sigma = np.zeros_like(z), np.ones_like(z)
    want = _log_normal(z, q_mu, q_sigma) - _log_normal(z, p_mu, p_sigma)
    got = _np(out.kl_elem[i - 1]).reshape(R, B, -1)
    for r, k in enumerate(ks):
      if i <= k:
        np.testing.assert_array_equal(got[r], 0.0)
      else:
        np.testing.assert_allclose(got[r], want[r], rtol=2e-4, atol=2e-4, err_msg=f"layer {i}, replica {r}")
    np.testing.assert_allclose(_np(out.kl[i - 1]), got.sum(-1), rtol=1e-5, atol=1e-4)
  # The pairing is specific: the top layer's KL against the layer below's prior (or N(0, I) for a lower layer)
  # would differ, so the check above can fail.
  z1 = _rows(inter["z1"][0], R)
  q1 = inter["q1"]["__call__"][0]
  wrong = _log_normal(z1, _rows(q1.mu, R), _rows(q1.sigma, R)) - _log_normal(z1, 0.0, 1.0)
  assert np.max(np.abs(wrong[0] - _np(out.kl_elem[0]).reshape(R, B, -1)[0])) > 1e-2


@pytest.mark.parametrize("prior_sample", [False, True], ids=["mode", "sample"])
def test_skipped_layers_take_the_conditional_prior(tiny, prior_sample):
  """For layers l <= k the decoder's z_l is the mean of p(z_l | z_{l+1}) exactly (reference), or a draw from it
  (prior_sample: standardised residuals of unit scale); it is never q's mean. Above k, z_l is q's sample."""
  model, params, x = tiny
  ks = [0, 1, 2]
  R = len(ks)
  _, inter = captured(model, params, x, ks, 8, ("p1", "p2", "q1", "q2"), prior_sample)
  for i in (1, 2):
    p, q = inter[f"p{i}"]["__call__"][0], inter[f"q{i}"]["__call__"][0]
    p_mu, p_sigma, q_mu = _rows(p.mu, R), _rows(p.sigma, R), _rows(q.mu, R)
    z = _rows(inter[f"z{i}"][0], R)
    for r, k in enumerate(ks):
      if i <= k:
        assert np.max(np.abs(z[r] - q_mu[r])) > 1e-3, (i, r)  # not the posterior mean
        if prior_sample:
          eps = (z[r] - p_mu[r]) / p_sigma[r]
          # (float32 rounding makes z == mu where sigma * eps is below mu's last bit: rare, not systematic)
          assert np.mean(eps == 0.0) < 0.01 and 0.6 < np.mean(eps ** 2) < 1.4, (i, r, np.mean(eps ** 2))
        else:
          np.testing.assert_array_equal(z[r], p_mu[r])
      else:
        assert np.all(z[r] != p_mu[r]) and np.all(z[r] != q_mu[r]), (i, r)
