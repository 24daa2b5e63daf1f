"""Tests for BIVA (hvaeood.models.biva) and the CIFAR/SVHN/MNIST configs: the paper configuration's latent shapes
and parameter count (against a hand count from the architecture), the L^{>k} mechanics on the tiny BIVA, config
validation, and one training step plus one evaluation of the tiny BIVA and the tiny CIFAR HVAE on
`tfds.testing.mock_data`.

The 10-stage model is only traced (`jax.eval_shape`), never compiled. The DLM's normalisation over 3 channels is
tested in test_distributions.py (all 256^3 bin centres); here the model's log p(x|z) is checked against that file's
float64 reference of the DLM at the model's own output parameters.

mock_data and the input pipeline: the pipeline asks `builder.is_prepared()` and reads split sizes from
`builder.info.splits`, which mock_data's default (code) policy leaves unprepared and empty. The fixture writes
the builders' real metadata (dataset_info.json + features.json, with invented split sizes) into a temporary
data_dir and mocks with `MockPolicy.USE_FILES` on it. mock_data ignores split slicing (`test[0:16]` yields the
whole mocked split), so evaluation caps are set to the mocked split size.
"""

import contextlib
import math
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from configs import cifar10_biva, cifar10_hvae, mnist_hvae, svhn_biva, svhn_hvae  # noqa: E402
from hvaeood import bounds, devices, input_pipeline, schedules, train  # noqa: E402
from hvaeood import state as state_lib  # noqa: E402
from hvaeood.models import build_model, count_params  # noqa: E402
from hvaeood.models.biva import BIVA, biva_spec_from_config  # noqa: E402
import helpers as H  # noqa: E402
from test_distributions import np_dlm_log_prob_per_pixel  # noqa: E402
from test_models import assert_l0_is_the_elbo, assert_prior_sample_changes_only_skipped  # noqa: E402
from test_models import captured as _captured  # noqa: E402

CIFAR_SHAPE = (32, 32, 3)
B = 6
N_MOCK = 32  # examples per mocked split


@pytest.fixture(autouse=True)
def _fast_threefry():
  """Non-partitionable threefry compiles faster on CPU; the assertions are about how the model uses its draws."""
  with jax.threefry_partitionable(False):
    yield


def _np(a):
  return np.asarray(a, np.float64)


@pytest.fixture(scope="module")
def tiny():
  with jax.threefry_partitionable(False):
    model = build_model(cifar10_biva.get_config("tiny").model, CIFAR_SHAPE)
    rs = np.random.RandomState(0)
    x = ((rs.randint(0, 256, (B,) + CIFAR_SHAPE) + rs.rand(B, *CIFAR_SHAPE)) / 256.0).astype(np.float32)
    params = model.init({"params": jax.random.key(0), "sample": jax.random.key(1)}, jnp.asarray(x), 0)["params"]
  return model, params, x


def _fwd_impl(model, params, x, n_skip, key, prior_sample):
  return model.apply({"params": params}, x, n_skip, prior_sample, rngs={"sample": key})


_fwd_jit = jax.jit(_fwd_impl, static_argnums=(0, 5))


def _fwd(model, params, x, n_skip, seed, prior_sample=False):
  return _fwd_jit(model, params, jnp.asarray(x), jnp.asarray(n_skip, jnp.int32), jax.random.key(seed), prior_sample)


# --------------------------------------------------------------------------------------------------------------
# the paper configuration (10 stages)


def test_paper_config_latents_and_resolutions():
  spec = build_model(cifar10_biva.get_config().model, CIFAR_SHAPE).spec
  assert spec.num_layers == 10 and spec.num_latent_variables == 19
  assert spec.latent_shapes() == ((16, 16, 8), (16, 16, 16), (16, 16, 32), (42,), (40,), (38,), (36,), (34,),
                                  (32,), (30,))
  # per-stage strides 2-1-1-2-1-2-1-1-1-1, overall stride 8
  assert [s[0] for s in spec.encoder_output_shapes()] == [16, 16, 16, 8, 8, 4, 4, 4, 4, 4]
  assert [st.kernel for st in spec.stages] == [5] + [3] * 9
  assert spec.likelihood == "dlm" and spec.nr_mix == 10


def _conv(k, cin, cout):
  return k * k * cin * cout + 2 * cout  # v, g, b of a weight-normed conv


def _dense(nin, nout):
  return nin * nout + 2 * nout


def _biva_by_hand(c=256):
  """Parameters per top-level module of the paper BIVA, from the architecture (module docstring, SPEC 1.2-1.7):

  stage l: kernel k_l, three residual blocks of c channels, stride s_l in the third (decoder: reversed, so in the
  first); input resolution r_{l-1} (r_0 = 32), output r_l = r_{l-1} / s_l; latents d_l (conv at r_l x r_l for
  l <= 3, dense above).
  * Enc^BU_l: input 3 channels (l = 1), d_{l-1} (conv z_{l-1} is its own feature map), or c (dense z_{l-1}
    projected to c x r x r); 6 convs; no aux.
  * Enc^TD_l: input 3 channels (l = 1) or c; 6 convs; every block takes h^BU_l (r_l) as aux against its conv1
    output (r_{l-1}): a stride-2 transposed conv (k_l) if s_l = 2, an identity add (no parameters) if s_l = 1.
  * heads q_bu, q_td, p_bu, p_td (l <= 9): 3x3 conv c -> 2 d_l (conv), or dense c r_l^2 -> 2 d_l (dense).
  * Proj^BU (l <= 9, dense only): d_l -> c r_l^2. Proj (decoder input): 2 d_l (concat TD, BU; l <= 9) or d_10
    -> c r_l^2, dense latents only; conv latents enter the decoder as 2 d_l channels.
  * merge_l (l <= 9): a stride-1 block, 2 convs k_l; aux d_{l+1} has conv1's shape: identity add.
  * top merge: conv k on concat (2c) -> c, conv c -> c. q_10: dense c r^2 -> 60.
  * Dec_l: 6 convs (the first from the projected latent); skips from Dec_{l+1} (l <= 9): block 0's aux has
    conv1's shape (dropped, aux_identity_add False); blocks 1, 2 get a stride-2 transposed conv if s_l = 2, else
    their aux has conv1's shape (dropped). Dec_10 has no skips.
  * likelihood: 1x1 conv c -> 100.
  """
  kernels = (5,) + (3,) * 9
  strides = (2, 1, 1, 2, 1, 2, 1, 1, 1, 1)
  dims = (8, 16, 32, 42, 40, 38, 36, 34, 32, 30)
  conv_latent = [True] * 3 + [False] * 7
  r, res = 32, []
  for s in strides:
    r //= s
    res.append(r)
  out = {}
  for i in range(10):
    k, s, d, rr = kernels[i], strides[i], dims[i], res[i]
    l = i + 1
    bu_in = 3 if i == 0 else (dims[i - 1] if conv_latent[i - 1] else c)
    td_in = 3 if i == 0 else c
    out[f"bu_enc{l}"] = _conv(k, bu_in, c) + 5 * _conv(k, c, c)
    out[f"td_enc{l}"] = _conv(k, td_in, c) + 5 * _conv(k, c, c) + (3 * _conv(k, c, c) if s == 2 else 0)
    dec_in = (2 * d if conv_latent[i] else c)
    out[f"dec{l}"] = _conv(k, dec_in, c) + 5 * _conv(k, c, c) + (2 * _conv(k, c, c) if s == 2 and l < 10 else 0)
    if l < 10:
      head = _conv(3, c, 2 * d) if conv_latent[i] else _dense(c * rr * rr, 2 * d)
      for name in ("q_bu", "q_td", "p_bu", "p_td"):
        out[f"{name}{l}"] = head
      out[f"merge{l}"] = 2 * _conv(k, c, c)
      if not conv_latent[i]:
        out[f"bu_proj{l}"] = _dense(d, c * rr * rr)
        out[f"z_proj{l}"] = _dense(2 * d, c * rr * rr)
    else:
      out["top_merge"] = _conv(k, 2 * c, c) + _conv(k, c, c)
      out["q10"] = _dense(c * rr * rr, 2 * d)
      out["z_proj10"] = _dense(d, c * rr * rr)
  out["likelihood"] = _conv(1, c, 100)
  return out


def test_paper_param_count_matches_hand_count():
  model = build_model(cifar10_biva.get_config().model, CIFAR_SHAPE)

  def init(x):
    return model.init({"params": jax.random.key(0), "sample": jax.random.key(1)}, x, 0)["params"]

  params = jax.eval_shape(init, jax.ShapeDtypeStruct((2,) + CIFAR_SHAPE, jnp.float32))
  expected = _biva_by_hand()
  assert {name: count_params(sub) for name, sub in params.items()} == expected
  assert count_params(params) == sum(expected.values())
  # the size the config docstring quotes
  assert f"{sum(expected.values()):,}" in cifar10_biva.__doc__


# --------------------------------------------------------------------------------------------------------------
# forward pass and L^{>k} on the tiny BIVA (3 stages: conv 2 @ 16x16, conv 2 @ 16x16, dense 4)


def test_tiny_is_small_and_has_the_documented_latents(tiny):
  model, params, _ = tiny
  assert 3_000 < count_params(params) < 10_000
  assert model.spec.latent_shapes() == ((16, 16, 2), (16, 16, 2), (4,))
  assert model.spec.num_layers == 3


def test_forward_shapes_log_px_and_kl_sums(tiny):
  """Shapes of every Output field; log p(x|z) is the float64 DLM of the replica's own parameters; each stage's KL
  is the sum of its TD and BU elementwise KLs; ELBO = log p(x|z) - sum of stage KLs."""
  model, params, x = tiny
  out = _fwd(model, params, x, [0, 1, 2], 1)
  lat = model.spec.latent_shapes()
  assert out.log_px.shape == (3, B) and out.elbo.shape == (3, B)
  assert len(out.kl) == 3 and all(k.shape == (3, B) for k in out.kl)
  assert [k.shape for k in out.kl_elem] == [(3, B) + s for s in (lat[0], lat[0], lat[1], lat[1], lat[2])]
  assert out.lik_params.shape == (3, B, 32, 32, 10 * model.spec.nr_mix)
  want = np_dlm_log_prob_per_pixel(np.broadcast_to(x, (3,) + x.shape), _np(out.lik_params),
                                   model.spec.nr_mix).reshape(3, B, -1).sum(-1)
  np.testing.assert_allclose(_np(out.log_px), want, rtol=1e-5)
  elem = [_np(e).reshape(3, B, -1).sum(-1) for e in out.kl_elem]
  sums = [elem[0] + elem[1], elem[2] + elem[3], elem[4]]
  for kl, s in zip(out.kl, sums):
    np.testing.assert_allclose(_np(kl), s, rtol=1e-4, atol=1e-2)
  np.testing.assert_allclose(_np(out.elbo), _np(out.log_px) - sum(_np(k) for k in out.kl), rtol=1e-6)
  for a in [out.log_px, *out.kl]:
    assert np.all(np.isfinite(_np(a)))


def test_wrong_input_shape_raises(tiny):
  model, params, _ = tiny
  with pytest.raises(ValueError, match=r"\(32, 32, 3\)"):
    model.apply({"params": params}, jnp.zeros((2, 28, 28, 1)), 0, rngs={"sample": jax.random.key(0)})


def _assert_no_kl_below_k(out, ks):
  for r, k in enumerate(ks):
    for i in range(3):
      entries = [out.kl_elem[2 * i], out.kl_elem[2 * i + 1]] if i < 2 else [out.kl_elem[4]]
      if i < k:
        np.testing.assert_array_equal(_np(out.kl[i][r]), 0.0)
        for e in entries:
          np.testing.assert_array_equal(_np(e[r]), 0.0)
      else:
        assert np.all(_np(out.kl[i][r]) != 0.0), (r, k, i)
        for e in entries:
          assert np.all(_np(e[r]).reshape(B, -1).any(axis=-1)), (r, k, i)


def test_no_kl_terms_for_skipped_stages(tiny):
  model, params, x = tiny
  for ks, seed in (([0, 1, 2], 3), ([2, 0, 1], 4)):
    _assert_no_kl_below_k(_fwd(model, params, x, ks, seed), ks)


def test_l_greater_than_zero_is_the_elbo_under_the_same_key(tiny):
  """A replica with n_skip = 0 is bit-identical to the same replica of an all-ELBO call with the same key, whatever
  the other replicas compute; replicas with k > 0 are different bounds; ELBO replicas draw independent samples."""
  model, params, x = tiny
  assert_l0_is_the_elbo(lambda ks, seed: _fwd(model, params, x, ks, seed))


@pytest.mark.parametrize("prior_sample", [False, True], ids=["mode", "sample"])
def test_skipped_stages_take_the_conditional_prior(tiny, prior_sample):
  """For stages i <= k both latents are the means of p(z^TD_i | d), p(z^BU_i | d) exactly (reference), or draws
  from them (prior_sample: standardised residuals of unit scale); above k the BU latent is the inference sample and
  the TD latent a sample of q, neither the prior mean."""
  model, params, x = tiny
  ks = [0, 1, 2]
  names = ("p_td1", "p_td2", "p_bu1", "p_bu2")
  _, inter = _captured(model, params, x, ks, 8, names, prior_sample)
  for i in (1, 2):
    for kind in ("td", "bu"):
      p = inter[f"p_{kind}{i}"]["__call__"][0]
      mu, sigma = (_np(a).reshape((3, B, -1)) for a in (p.mu, p.sigma))
      z = _np(inter[f"z_{kind}{i}"][0]).reshape((3, B, -1))
      for r, k in enumerate(ks):
        if i <= k and not prior_sample:
          np.testing.assert_array_equal(z[r], mu[r])
        elif i <= k:
          eps = (z[r] - mu[r]) / sigma[r]
          assert np.all(eps != 0.0) and 0.7 < np.mean(eps ** 2) < 1.3, (i, r, kind)
        else:
          assert np.all(z[r] != mu[r]), (i, r, kind)


def test_prior_sample_only_changes_skipped_stages(tiny):
  """prior_sample=True vs False, same key: k = 0 rows identical; k >= 1 rows change log p(x|z) but not the KL terms
  of the stages above k; skipped stages still carry no KL."""
  model, params, x = tiny
  ks = [0, 1, 2]
  assert_prior_sample_changes_only_skipped(_fwd(model, params, x, ks, 7, prior_sample=False),
                                           _fwd(model, params, x, ks, 7, prior_sample=True), ks)


def test_inference_uses_posterior_means_below_k(tiny):
  """The BU inference path feeds the posterior *mean* of z^BU_1..z^BU_k upwards: q(z^BU_2 | .) is the same for every
  replica with k >= 1, q(z_3 | .) for every replica with k = 2; ELBO replicas each see their own samples."""
  model, params, x = tiny
  ks = [0, 0, 1, 1, 2, 2]
  _, inter = _captured(model, params, x, ks, 9, ("q_bu2", "q3"))
  q2 = _np(inter["q_bu2"]["__call__"][0].mu).reshape(len(ks), B, -1)
  q3 = _np(inter["q3"]["__call__"][0].mu).reshape(len(ks), B, -1)
  for r in (3, 4, 5):
    np.testing.assert_array_equal(q2[r], q2[2])
  assert np.all(q2[0] != q2[1]) and np.all(q2[0] != q2[2])
  np.testing.assert_array_equal(q3[5], q3[4])
  assert np.all(q3[2] != q3[3]) and np.all(q3[0] != q3[1])


def test_generate_and_reconstruct(tiny):
  """Samples and means are images in [0, 1]; at temperature 0 every latent is its prior mean, so the mean images do
  not depend on the key (the sampled ones do)."""
  model, params, x = tiny
  gen = jax.jit(lambda p, t, k: model.apply({"params": p}, 4, t, method=BIVA.generate, rngs={"sample": k}))
  m1, s1 = gen(params, 0.0, jax.random.key(1))
  m2, s2 = gen(params, 0.0, jax.random.key(2))
  m3, _ = gen(params, 1.0, jax.random.key(1))
  for a in (m1, s1, m3):
    assert a.shape == (4,) + CIFAR_SHAPE
    assert 0.0 <= float(jnp.min(a)) and float(jnp.max(a)) <= 1.0
  np.testing.assert_allclose(_np(m1), _np(m2), rtol=0, atol=1e-6)
  assert not np.allclose(_np(s1), _np(s2))
  assert not np.allclose(_np(m1), _np(m3))
  rec = jax.jit(lambda p, b, k: model.apply({"params": p}, b, method=BIVA.reconstruct, rngs={"sample": k}))(
      params, jnp.asarray(x), jax.random.key(3))
  assert rec.shape == x.shape and 0.0 <= float(jnp.min(rec)) and float(jnp.max(rec)) <= 1.0


# --------------------------------------------------------------------------------------------------------------
# configs and validation


def _tiny_model_cfg(**overrides):
  m = ml_collections.ConfigDict(cifar10_biva.get_config("tiny").model.to_dict())
  for k, v in overrides.items():
    m[k] = v
  return m


@pytest.mark.parametrize("overrides,field", [
    (dict(kernels=(3,), channels=((4,),), strides=((2,),), latent_types=("dense",), latent_dims=(4,)), "kernels"),
    (dict(latent_dims=(2, 2)), "latent_dims"),
    (dict(channels=((4, 4), (4,), (4,))), r"channels\[0\]"),
    (dict(strides=((3,), (1,), (2,))), r"strides\[0\]"),
    (dict(latent_types=("conv", "spatial", "dense")), r"latent_types\[1\]"),
    (dict(latent_dims=(2, 0, 4)), r"latent_dims\[1\]"),
    (dict(likelihood="poisson"), "likelihood"),
    (dict(compute_dtype="float16"), "compute_dtype"),
])
def test_bad_config_fields_raise_naming_the_field(overrides, field):
  with pytest.raises(ValueError, match=rf"config\.model\.{field}.*Fix: "):
    biva_spec_from_config(_tiny_model_cfg(**overrides), CIFAR_SHAPE)


def test_dlm_needs_rgb():
  with pytest.raises(ValueError, match=r"config\.model\.likelihood.*RGB"):
    biva_spec_from_config(_tiny_model_cfg(), (32, 32, 1))


@pytest.mark.parametrize("mod,name,ood,model_name", [
    (cifar10_biva, "cifar10", ("svhn_cropped",), "biva"),
    (svhn_biva, "svhn_cropped", ("cifar10",), "biva"),
    (svhn_hvae, "svhn_cropped", ("cifar10",), "hvae"),
    (mnist_hvae, "mnist", ("fashion_mnist",), "hvae"),
])
def test_configs_and_variants(mod, name, ood, model_name):
  for variant in ("paper", "cpu", "tiny"):
    cfg = mod.get_config(variant)
    assert cfg.data.name == name and tuple(cfg.eval.ood_datasets) == ood
    assert cfg.model.get("name", "hvae") == model_name
    shape = (28, 28, 1) if name == "mnist" else CIFAR_SHAPE
    model = build_model(cfg.model, shape)
    assert model.spec.image_shape == shape
  assert mod.get_config("tiny").train.batch_size == 16
  assert mod.get_config("cpu").train.time_budget_minutes == 30.0
  if name == "svhn_cropped":
    assert mod.get_config().data.shuffle_buffer >= 73_257  # a full permutation of the training split
    assert mod.get_config().model.channels == (cifar10_biva if model_name == "biva" else cifar10_hvae).get_config(
        ).model.channels
  if name == "mnist":
    assert mod.get_config().data.preprocessing == "binarize" and mod.get_config().model.likelihood == "bernoulli"


# --------------------------------------------------------------------------------------------------------------
# one training step and one evaluation on mocked CIFAR10 / SVHN


@pytest.fixture(scope="module")
def mock_dir(tmp_path_factory):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  d = str(tmp_path_factory.mktemp("tfds_mock"))
  for name, splits in (("cifar10", ("train", "test")), ("svhn_cropped", ("train", "test", "extra"))):
    builder = tfds.builder(name, data_dir=d)
    os.makedirs(builder.data_dir, exist_ok=True)
    builder.info.set_splits(tfds.core.SplitDict(
        [tfds.core.SplitInfo(name=s, shard_lengths=[N_MOCK], num_bytes=0) for s in splits]))
    builder.info.write_to_directory(builder.data_dir)
  return d


@contextlib.contextmanager
def _mocked(data_dir):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  with tfds.testing.mock_data(num_examples=N_MOCK, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=data_dir):
    yield


def _mock_config(mod, data_dir):
  config = mod.get_config("tiny")
  config.data.data_dir = data_dir
  config.schedule.warmup_epochs = 0.0  # beta = 1 and lambda = 2 at step 0: the loss depends on every KL term
  config.eval.batch_size = 16
  config.eval.max_examples = N_MOCK  # the whole mocked split (mock_data ignores split slicing)
  return config


def _np_loss(out, beta, lam):
  """-log p(x|z) + beta * sum over latent variables and elements of max(KL, lambda / n) (n = the variable's element
  count), batch mean, in float64."""
  kl = 0.0
  for elem in out.kl_elem:
    e = _np(elem[0]).reshape(elem.shape[1], -1)  # [B, n]
    kl = kl + np.maximum(e, lam / e.shape[1]).sum(-1)
  return float(np.mean(-_np(out.log_px[0]) + beta * kl))


@pytest.mark.parametrize("mod", [cifar10_biva, cifar10_hvae], ids=["biva", "hvae"])
def test_one_train_step_and_evaluation_on_mock_data(mod, mock_dir):
  config = _mock_config(mod, mock_dir)
  model = state_lib.model_for_config(config)
  assert type(model).__name__ == ("BIVA" if mod is cifar10_biva else "HVAE")
  with _mocked(mock_dir):
    spe = input_pipeline.steps_per_epoch(config)
    batch = next(input_pipeline.create_train_iterator(config))["image"]
  assert spe == N_MOCK // 16 and batch.shape == (16,) + CIFAR_SHAPE and 0.0 <= batch.min() and batch.max() < 1.0

  # ---- one training step (jitted as train_and_evaluate jits it), against an independent recomputation
  _, data_sharding = H.shardings(jax.devices())
  state0 = H.init_state(config, model, batch)
  host0 = H.state_to_host(state0)
  state1, metrics = H.jit_step(config, model, spe)(state0, devices.to_global(batch, data_sharding))
  metrics = jax.device_get(metrics)
  host1 = H.state_to_host(state1)
  beta, lam = (float(v) for v in schedules.schedule_values(0, config, spe))
  assert (beta, lam) == (1.0, 2.0)
  out = jax.jit(lambda p, b, k: model.apply({"params": p}, b, 0, rngs={"sample": k}))(
      host0.params, jnp.asarray(batch), jax.random.fold_in(host0.rng, 0))
  loss, elbo = bounds.training_loss(out, beta, lam, config.schedule.free_nats_granularity)
  assert np.isfinite(metrics["loss"])
  np.testing.assert_allclose(metrics["loss"], float(loss), rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], _np_loss(out, beta, lam), rtol=1e-5)
  np.testing.assert_allclose(metrics["elbo"], float(jnp.mean(elbo)), rtol=1e-5)
  for i in range(model.spec.num_layers):
    np.testing.assert_allclose(metrics[f"kl_z{i + 1}"], float(jnp.mean(out.kl[i][0])), rtol=1e-4, atol=1e-3)
  assert int(host1.step) == 1 and int(metrics["skipped_update"]) == 0
  # Adam's first update moves every parameter by about lr * sign(gradient).
  lr = config.optim.lr
  deltas = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a, b: np.max(np.abs(a - b)), host1.params,
                                                            host0.params))
  assert all(0.5 * lr < d <= 1.01 * lr for d in deltas), (min(deltas), max(deltas))

  # ---- one evaluation (the scoring the training loop runs), against independent model passes
  mesh = devices.make_mesh()
  rng = jax.random.PRNGKey(11)
  names = ["cifar10", "svhn_cropped"]
  with _mocked(mock_dir):
    results = train.evaluate_model(model, host1.params, config, mesh, rng, names)
    it, n = input_pipeline.create_eval_dataset("cifar10", "test", preprocessing=config.data.preprocessing,
                                               batch_size=16, seed=config.seed, max_examples=N_MOCK,
                                               data_dir=mock_dir)
    first = next(iter(it))["image"]
  L = model.spec.num_layers
  for name in names:
    r = results[name]
    assert r["elbo"].shape == (N_MOCK,) and r["lk"].shape == (L, N_MOCK) and r["kl"].shape == (L, N_MOCK)
    for v in r.values():
      assert np.all(np.isfinite(v))
  # Batch 0 of dataset 0: rows (skip counts) [0, 1, ..., L-1] in one chunk (L>0 is the ELBO's row), key
  # fold_in(fold_in(fold_in(rng, dataset 0), batch 0), chunk 0) (evaluate.score_pass, bounds.compute_bounds).
  key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(rng, 0), 0), 0)
  o = jax.device_get(jax.jit(lambda p, b, s, k: bounds.apply_model(model, p, b, s, k))(
      host1.params, jnp.asarray(first), jnp.asarray(list(range(L)), jnp.int32), key))
  r = results["cifar10"]
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-2)
  close(r["elbo"][:16], o.elbo[0])
  close(r["log_px"][:16], o.log_px[0])
  close(r["lk"][:, :16], o.elbo)
  np.testing.assert_array_equal(r["lk"][0], r["elbo"])
  close(r["kl"][:, :16], np.stack([k[0] for k in o.kl]))
  summary = train.eval_summary(results, "cifar10", math.prod(CIFAR_SHAPE))
  assert np.isfinite(summary["eval_bits_per_dim"]) and summary["eval_bits_per_dim"] > 0
  for k in range(1, L):
    assert 0.0 <= summary[f"eval_auroc_LLR>{k}_svhn_cropped"] <= 1.0
