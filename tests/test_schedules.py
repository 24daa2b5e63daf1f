"""KL warm-up and free-nats schedules (SPEC 3) and the free-nats floor in the loss. No training, no data."""

import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from hvaeood import bounds
from hvaeood import schedules

# The paper / reference schedule: warm-up 200 epochs, free nats 2 for 200 epochs then annealed over 200.
PAPER = dict(warmup_epochs=200.0, free_nats=2.0, free_nats_constant_epochs=200.0,
             free_nats_anneal_epochs=200.0)
SPE = 468  # FashionMNIST steps per epoch in our pipeline (60,000 // 128: the last partial batch is dropped)


def _schedule_config(continuous=False, **overrides):
  s = dict(PAPER, continuous=continuous, free_nats_granularity='per_layer_total', epochs=1000)
  s.update(overrides)
  return ml_collections.ConfigDict({'schedule': s})


def _beta(epoch):
  return float(schedules.kl_beta(epoch, PAPER['warmup_epochs']))


def _lam(epoch, continuous=False):
  return float(schedules.free_nats(epoch, PAPER['free_nats'], PAPER['free_nats_constant_epochs'],
                               PAPER['free_nats_anneal_epochs'], continuous))


@pytest.mark.parametrize('epoch, beta', [(1, 0.005), (2, 0.01), (100, 0.5), (199, 0.995), (200, 1.0),
                                         (201, 1.0), (400, 1.0), (401, 1.0), (1000, 1.0)])
def test_kl_warmup_paper(epoch, beta):
  """beta_e = e / 200 for e = 1..199 (epoch 1 -> 0.005, t incremented before use), 1 from epoch 200 on."""
  assert _beta(epoch) == pytest.approx(beta, rel=1e-6)


@pytest.mark.parametrize('epoch, lam', [
    (1, 2.0), (199, 2.0), (200, 2.0),
    (201, 2.0),                           # first annealed epoch: linspace(2, 0, 200)[0]
    (202, 2.0 * (1 - 1 / 199)),           # step 2/199 ~ 0.01005
    (300, 2.0 * (1 - 99 / 199)),
    (399, 2.0 * (1 - 198 / 199)),
    (400, 0.0),                           # linspace(2, 0, 200)[-1]
    (401, 0.0), (1000, 0.0)])
def test_free_nats_paper(epoch, lam):
  assert _lam(epoch) == pytest.approx(lam, rel=1e-6, abs=1e-7)


def test_free_nats_paper_is_the_reference_linspace():
  """Epochs 201..400 take exactly numpy.linspace(2, 0, 200), the reference's schedule."""
  epochs = np.arange(201, 401)
  got = np.asarray(schedules.free_nats(jnp.asarray(epochs), 2.0, 200.0, 200.0, False))
  np.testing.assert_allclose(got, np.linspace(2.0, 0.0, 200), rtol=1e-6, atol=1e-6)
  assert np.all(np.diff(got) < 0)
  np.testing.assert_allclose(-np.diff(got), 2.0 / 199, rtol=1e-4)


def test_epoch_of_step_discrete():
  """Discrete epochs are 1-based and step once per epoch, at its start."""
  for step, epoch in [(0, 1), (1, 1), (467, 1), (468, 2), (935, 2), (936, 3), (199 * SPE, 200),
                      (200 * SPE - 1, 200), (200 * SPE, 201), (400 * SPE - 1, 400), (400 * SPE, 401)]:
    assert int(schedules.epoch_of_step(step, SPE, continuous=False)) == epoch, step
  # Also with traced (int32) steps, as inside the jitted train step.
  steps = jnp.array([0, 467, 468, 936], jnp.int32)
  np.testing.assert_array_equal(jax.jit(lambda s: schedules.epoch_of_step(s, SPE, False))(steps), [1, 1, 2, 3])


def test_epoch_of_step_continuous():
  np.testing.assert_allclose(float(schedules.epoch_of_step(0, SPE, True)), 0.0)
  np.testing.assert_allclose(float(schedules.epoch_of_step(468, SPE, True)), 1.0)
  np.testing.assert_allclose(float(schedules.epoch_of_step(234, SPE, True)), 0.5)


@pytest.mark.parametrize('jit', [False, True])
def test_schedule_values_by_step_paper(jit):
  """(beta, lambda) as the train step gets them from the global step, at the epoch boundaries that matter."""
  config = _schedule_config()
  fn = lambda s: schedules.schedule_values(s, config, SPE)
  if jit:
    fn = jax.jit(fn)
  cases = {  # step -> (epoch, beta, lambda)
      0: (1, 0.005, 2.0),
      SPE - 1: (1, 0.005, 2.0),
      SPE: (2, 0.01, 2.0),
      198 * SPE: (199, 0.995, 2.0),
      199 * SPE: (200, 1.0, 2.0),
      200 * SPE: (201, 1.0, 2.0),
      299 * SPE: (300, 1.0, 2.0 * (1 - 99 / 199)),
      399 * SPE: (400, 1.0, 0.0),
      400 * SPE: (401, 1.0, 0.0),
      1000 * SPE - 1: (1000, 1.0, 0.0),
  }
  for step, (_, beta, lam) in cases.items():
    b, l = fn(jnp.asarray(step, jnp.int32) if jit else step)
    assert float(b) == pytest.approx(beta, rel=1e-6), step
    assert float(l) == pytest.approx(lam, rel=1e-6, abs=1e-7), step


def test_schedule_values_continuous():
  """Continuous variant: piecewise linear in fractional epochs done (the cpu/tiny configs' short runs)."""
  config = _schedule_config(continuous=True, warmup_epochs=0.5, free_nats_constant_epochs=0.5,
                            free_nats_anneal_epochs=0.5)
  spe = 100
  cases = {  # step -> (beta, lambda)
      0: (0.0, 2.0), 25: (0.5, 2.0), 50: (1.0, 2.0), 60: (1.0, 1.6), 75: (1.0, 1.0), 90: (1.0, 0.4),
      100: (1.0, 0.0), 120: (1.0, 0.0)}
  jitted = jax.jit(lambda s: schedules.schedule_values(s, config, spe))
  for step, (beta, lam) in cases.items():
    for b, l in (schedules.schedule_values(step, config, spe), jitted(jnp.asarray(step, jnp.int32))):
      assert float(b) == pytest.approx(beta, abs=1e-6), step
      assert float(l) == pytest.approx(lam, abs=1e-6), step
  # The paper's numbers in continuous form: halfway through the anneal is lambda / 2.
  assert _lam(300.0, continuous=True) == pytest.approx(1.0)
  assert _lam(200.0, continuous=True) == pytest.approx(2.0)
  assert _lam(400.0, continuous=True) == pytest.approx(0.0)
  assert float(schedules.kl_beta(0.5, 200.0)) == pytest.approx(0.0025)


def test_no_warmup_means_beta_one():
  assert float(schedules.kl_beta(1, 0.0)) == 1.0
  assert float(schedules.kl_beta(0, 0.0)) == 1.0


# ---------------------------------------------------------------------------------------------------------------
# The free-nats floor in the loss


def _kl_elem():
  """A conv latent [R=1, B=2, 2, 2, 4] (16 elements) and a dense one [1, 2, 3], per element."""
  conv = np.zeros((1, 2, 2, 2, 4), np.float32)
  conv[0, 0] = 0.0  # example 0: all zero (floored everywhere)
  conv[0, 1] = 1.0  # example 1: all above both floors
  conv[0, 1, 0, 0, 0] = -0.3  # one negative single-sample KL: floored too
  dense = np.array([[[0.0, 5.0, -1.0], [2.0, 2.0, 2.0]]], np.float32)
  return [jnp.asarray(conv), jnp.asarray(dense)]


def test_free_nats_per_layer_total():
  """The paper: lambda per layer, shared over its elements (floor lambda / n_elements)."""
  lam = 2.0
  got = np.asarray(bounds.free_nats_kl(_kl_elem(), lam, 'per_layer_total'))
  # conv floor 2/16 = 0.125: ex0 16 * 0.125 = 2; ex1 15 * 1 + 0.125. dense floor 2/3: ex0 2/3 + 5 + 2/3; ex1 6.
  expected = [2.0 + (2 / 3 + 5 + 2 / 3), 15.125 + 6.0]
  np.testing.assert_allclose(got, [expected], rtol=1e-6)


def test_free_nats_per_channel():
  """The reference HEAD: floor lambda / channels at every spatial position (lambda * H * W per conv layer)."""
  lam = 2.0
  got = np.asarray(bounds.free_nats_kl(_kl_elem(), lam, 'per_channel'))
  # conv floor 2/4 = 0.5: ex0 16 * 0.5 = 8 (= lambda * H * W); ex1 15 * 1 + 0.5. dense as above.
  expected = [8.0 + (2 / 3 + 5 + 2 / 3), 15.5 + 6.0]
  np.testing.assert_allclose(got, [expected], rtol=1e-6)


def test_free_nats_zero_is_the_raw_kl_and_unknown_granularity_fails():
  kl = _kl_elem()
  raw = sum(np.asarray(k).reshape(1, 2, -1).sum(-1) for k in kl)
  clipped = sum(np.maximum(np.asarray(k), 0).reshape(1, 2, -1).sum(-1) for k in kl)
  for g in ('per_layer_total', 'per_channel'):
    # lambda = 0 is the raw KL: negative single-sample elements are not clipped (the reference returns the KL
    # unchanged when the budget is 0), so the loss after the anneal is the negative ELBO.
    np.testing.assert_allclose(bounds.free_nats_kl(kl, 0.0, g), raw, rtol=1e-6)
  assert not np.allclose(raw, clipped)
  with pytest.raises(ValueError, match='granularity'):
    bounds.free_nats_kl(kl, 2.0, 'per_pixel')


def test_training_loss_uses_floor_beta_and_raw_elbo():
  """loss = mean_b(-log p(x|z) + beta * floored KL); the returned ELBO is the raw one (no floor, no beta)."""
  kl = _kl_elem()
  raw = [np.asarray(k).reshape(1, 2, -1).sum(-1) for k in kl]
  log_px = jnp.asarray([[-100.0, -50.0]])
  out = types.SimpleNamespace(log_px=log_px, kl_elem=tuple(kl), kl=tuple(jnp.asarray(r) for r in raw),
                              elbo=log_px - sum(jnp.asarray(r) for r in raw))
  for g, floored in (('per_layer_total', [2.0 + 19 / 3, 21.125]), ('per_channel', [8.0 + 19 / 3, 21.5])):
    for beta in (0.005, 1.0):
      loss, elbo = bounds.training_loss(out, jnp.float32(beta), jnp.float32(2.0), g)
      expected = np.mean([100.0 + beta * floored[0], 50.0 + beta * floored[1]])
      assert float(loss) == pytest.approx(expected, rel=1e-6), (g, beta)
      np.testing.assert_allclose(elbo, out.elbo, rtol=1e-6)
