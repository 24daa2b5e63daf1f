"""Training on real (offline) FashionMNIST with the tiny config: the jitted step, a short run, stop-and-resume.

All tests use one config (helpers.tiny_config), so the data-dependent init, the train step and the
evaluation compile once per session (persistent compilation cache, see helpers) and are reused by every
`train_and_evaluate` call here and in test_distributed.
"""

import functools
import glob
import json
import os
import shutil

import chex
import jax
import numpy as np
import pytest

import helpers as H
from hvaeood import checkpoints as ckpt
from hvaeood import devices as hdev
from hvaeood import input_pipeline
from hvaeood import loading
from hvaeood import schedules
from hvaeood import state as state_lib
from hvaeood import train


@pytest.fixture(scope='module', autouse=True)
def _cache():
  with H.compilation_cache() as d:
    yield d


# ---------------------------------------------------------------------------------------------------------------
# The jitted step, driven directly


class _Direct:
  """The train step jitted as train_and_evaluate jits it (1-device mesh), with chex counting its traces."""

  def __init__(self, data_dir):
    self.config = H.tiny_config(data_dir)
    self.model = state_lib.model_for_config(self.config)
    self.spe = input_pipeline.steps_per_epoch(self.config)
    it = input_pipeline.create_train_iterator(self.config, seed=self.config.seed)
    self.batches = [next(it)['image'] for _ in range(3)]
    devices = jax.devices()[:1]
    self.rep, self.data = H.shardings(devices)
    self.state0 = H.state_to_host(H.init_state(self.config, self.model, self.batches[0], devices))
    self.step = H.jit_step(self.config, self.model, self.spe, devices,
                           wrap=lambda fn: chex.assert_max_traces(fn, n=1))

  def x(self, i):
    return hdev.to_global(self.batches[i], self.data)

  def fresh_state(self):
    return jax.device_put(self.state0, self.rep)


@pytest.fixture(scope='module')
def direct(tfds_data_dir):
  chex.clear_trace_counter()
  return _Direct(tfds_data_dir)


def test_one_step(direct):
  """One jitted step from the data-dependent init on a real batch: consistent metrics, updates, donation."""
  state = direct.fresh_state()
  new, m = direct.step(state, direct.x(0))
  m = jax.device_get(m)
  assert int(new.step) == 1
  assert int(m['skipped_update']) == 0 and int(new.skipped) == 0 and int(new.consecutive_skips) == 0
  for k, v in m.items():
    assert np.all(np.isfinite(v)), k
  # Metric bookkeeping: ELBO = log p(x|z) - sum of the per-layer KLs, the step's schedule values.
  assert m['elbo'] == pytest.approx(m['log_px'] - m['kl'], rel=1e-5)
  assert m['kl'] == pytest.approx(sum(m[f'kl_z{i + 1}'] for i in range(3)), rel=1e-5)
  beta, lam = schedules.schedule_values(0, direct.config, direct.spe)
  assert m['beta'] == pytest.approx(float(beta)) and m['free_nats'] == pytest.approx(float(lam))
  # With beta ~ 0 the loss is the reconstruction term.
  assert m['loss'] == pytest.approx(-m['log_px'], abs=1e-2)
  assert m['grad_norm'] > 0
  # Every parameter with a gradient moved (Adam's first step is ~lr per element); at step 0 beta = 0, so only the
  # priors' heads (no reconstruction gradient) stay put. The base RNG key is unchanged.
  grads = jax.tree_util.tree_leaves(new.opt_state[0].mu)
  moved = [np.any(np.asarray(a) != b) for a, b in zip(jax.tree_util.tree_leaves(new.params),
                                                       jax.tree_util.tree_leaves(direct.state0.params))]
  has_grad = [np.any(np.asarray(g) != 0) for g in grads]
  assert moved == has_grad
  assert sum(moved) >= 0.8 * len(moved), (sum(moved), len(moved))
  np.testing.assert_array_equal(np.asarray(new.rng), direct.state0.rng)
  # The state is donated: its buffers are reused for the new state.
  assert all(x.is_deleted() for x in jax.tree_util.tree_leaves(state.params))


def test_no_recompilation_across_steps(direct):
  """Three steps with different batches: one trace (chex.assert_max_traces(n=1) raises otherwise), one compile."""
  state = direct.fresh_state()
  losses = []
  for i in range(3):
    state, m = direct.step(state, direct.x(i))
    losses.append(float(m['loss']))
  assert int(state.step) == 3 and len(set(losses)) == 3
  assert direct.step._cache_size() == 1  # pylint: disable=protected-access


def test_step_is_deterministic(direct):
  """Same state and batch -> bit-identical result (what stop-and-resume relies on)."""
  a, ma = direct.step(direct.fresh_state(), direct.x(1))
  b, mb = direct.step(direct.fresh_state(), direct.x(1))
  assert float(ma['loss']) == float(mb['loss'])
  H.tree_allclose(H.state_to_host(a), H.state_to_host(b), rtol=0, what='state')


# ---------------------------------------------------------------------------------------------------------------
# A short run through train_and_evaluate

RUN_STEPS = 30


@pytest.fixture(scope='module')
def tiny_run(tfds_data_dir, tmp_path_factory):
  """30 steps of train_and_evaluate on real FashionMNIST, evaluating against MNIST at the end.

  make_train_step is wrapped to count how often the loop's step function is traced.
  """
  workdir = str(tmp_path_factory.mktemp('tiny_run'))
  config = H.tiny_config(tfds_data_dir, num_steps=RUN_STEPS, ood_datasets=('mnist',), checkpoint_every=10)
  traces = []
  original = state_lib.make_train_step

  def counting_make_train_step(*args, **kwargs):
    fn = original(*args, **kwargs)

    @functools.wraps(fn)
    def counted(*a):
      traces.append(1)
      return fn(*a)
    return counted

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(state_lib, 'make_train_step', counting_make_train_step)
    summary = train.train_and_evaluate(config, workdir)
  return config, workdir, summary, traces


def test_run_writes_checkpoints_config_summary_and_images(tiny_run):
  config, workdir, summary, _ = tiny_run
  assert summary['step'] == RUN_STEPS and summary['stop_reason'] == 'completed'
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints')), key=int) == ['10', '20', '30']
  assert os.listdir(os.path.join(workdir, 'best')) == ['30']
  assert not os.path.exists(os.path.join(workdir, '.lock'))
  with open(os.path.join(workdir, 'config.json')) as f:
    saved = json.load(f)
  assert saved == json.loads(config.to_json_best_effort())
  with open(os.path.join(workdir, 'summary.json')) as f:
    assert json.load(f) == pytest.approx(summary)
  for k in ('eval_elbo', 'eval_bits_per_dim', 'eval_L>1', 'eval_L>2', 'eval_auroc_LLR>1_mnist',
            'train_loss', 'train_images_per_sec'):
    assert np.isfinite(summary[k]), k
  assert summary['eval_bits_per_dim'] == pytest.approx(-summary['eval_elbo'] / (784 * np.log(2)), rel=1e-5)
  # The sample grid of the evaluation at step 30: a real PNG of 4 samples of 28 x 28.
  pngs = sorted(glob.glob(os.path.join(workdir, 'images', '*.png')))
  assert sorted(os.path.basename(p) for p in pngs) == [
      'reconstructions_00000030.png', 'samples_00000030.png'], pngs
  import matplotlib.image  # pylint: disable=import-outside-toplevel
  for p in pngs:
    img = matplotlib.image.imread(p)
    assert img.ndim in (2, 3) and min(img.shape[:2]) >= 28, (p, img.shape)
  assert np.ptp(img) > 0  # not a blank image
  # The best checkpoint (chosen by default) loads for evaluation and is the state at step 30. The run kept no
  # EMA, so its raw parameters are what is evaluated, and said so, even though the EMA was not refused.
  loaded = loading.load_for_eval(workdir)
  assert loaded.step == RUN_STEPS and loaded.meta['step'] == RUN_STEPS
  assert loaded.which == 'best' and loaded.path == os.path.join(workdir, 'best', str(RUN_STEPS))
  assert loaded.parameters == 'raw'
  assert loading.load_for_eval(workdir, which='latest').path == os.path.join(workdir, 'checkpoints', str(RUN_STEPS))


def test_run_loss_falls_and_schedule_is_applied(tiny_run):
  config, workdir, _, _ = tiny_run
  rows = H.train_rows(workdir)
  assert [r['step'] for r in rows] == list(range(1, RUN_STEPS + 1))
  loss = np.array([r['train_loss'] for r in rows])
  log_px = np.array([r['train_log_px'] for r in rows])
  assert np.all(np.isfinite(loss)) and rows[-1]['train_skipped_total'] == 0
  # Each step a new real batch: compare medians of the first and last 6 steps (batch-to-batch spread ~ 20 nats;
  # the tiny model goes from ~600 to ~500 nats of reconstruction loss in 30 steps).
  first, last = np.median(loss[:6]), np.median(loss[-6:])
  assert last < first - 25, (first, last, loss.round(1))
  assert np.median(log_px[-6:]) > np.median(log_px[:6]) + 25
  # The logged beta and lambda of step s are the schedule at global step s - 1 (the step's own state.step).
  spe = input_pipeline.steps_per_epoch(config)
  for r in rows:
    beta, lam = schedules.schedule_values(r['step'] - 1, config, spe)
    assert r['train_beta'] == pytest.approx(float(beta), rel=1e-5, abs=1e-12)
    assert r['train_free_nats'] == pytest.approx(float(lam), rel=1e-5)
  evals = [r for r in H.read_jsonl(os.path.join(workdir, 'metrics.jsonl')) if 'eval_elbo' in r]
  assert [r['step'] for r in evals] == [RUN_STEPS]


def test_run_step_is_traced_once(tiny_run):
  """No recompilation across the loop's steps: its step function was traced exactly once in 30 steps."""
  *_, traces = tiny_run
  assert len(traces) == 1


def test_run_writes_tensorboard_events(tiny_run):
  pytest.importorskip('tensorboard', reason='tensorboard is not installed: MetricWriter logs to metrics.jsonl only')
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  _, workdir, _, _ = tiny_run
  files = glob.glob(os.path.join(workdir, 'tensorboard', 'events.out.tfevents.*'))
  assert files, os.listdir(workdir)
  tags = set()
  for f in files:
    for event in tf.compat.v1.train.summary_iterator(f):
      tags.update(v.tag for v in event.summary.value)
  for tag in ('train_loss', 'train_elbo', 'train_kl_z1', 'train_beta', 'train_free_nats', 'train_grad_norm',
              'train_skipped_total', 'train_images_per_sec', 'eval_elbo', 'eval_bits_per_dim', 'eval_L>1'):
    assert tag in tags, (tag, sorted(tags))
  assert any('samples' in t for t in tags), sorted(tags)


# ---------------------------------------------------------------------------------------------------------------
# Stop and resume


def _restore_state(workdir, step, abstract):
  manager = ckpt.make_manager(os.path.join(workdir, ckpt.CHECKPOINT_DIR), keep=100, read_only=True)
  state, meta = ckpt.restore(manager, step, abstract)
  return H.state_to_host(state), meta


def test_stop_and_resume_continues_the_same_run(tiny_run, tmp_path):
  """A one-step run, then resuming it to 30 steps in the same workdir == the uninterrupted 30-step tiny_run.

  Same final step, bit-identical states at steps 10, 20, 30 (parameters, Adam state, RNG key, counters), the same
  per-step losses and the same final evaluation; the resumed call did not start over.
  """
  config, wd_a, sa, _ = tiny_run
  wd_b = str(tmp_path / 'b')
  data_dir = config.data.data_dir
  # One-step run: stops at step 1 with a checkpoint.
  s1 = train.train_and_evaluate(H.tiny_config(data_dir, num_steps=1, ood_datasets=('mnist',)), wd_b)
  assert s1['step'] == 1 and os.listdir(os.path.join(wd_b, 'checkpoints')) == ['1']
  assert np.isfinite(s1['train_loss']) and np.isfinite(s1['eval_elbo'])
  # Resume to the tiny run's 30 steps (same training config; only num_steps differs from the first call).
  sb = train.train_and_evaluate(config, wd_b)
  assert sa['step'] == sb['step'] == RUN_STEPS and sb['stop_reason'] == 'completed'

  rows_a, rows_b = H.train_rows(wd_a), H.train_rows(wd_b)
  assert [r['step'] for r in rows_b] == list(range(1, RUN_STEPS + 1)), 'the resumed run started over'
  for ra, rb in zip(rows_a, rows_b):
    if ra['train_loss'] != rb['train_loss']:
      _diagnose_resume(data_dir, ra['step'])
    for k in ('train_loss', 'train_log_px', 'train_kl', 'train_grad_norm', 'train_beta', 'train_param_norm'):
      assert ra[k] == rb[k], (ra['step'], k, ra[k], rb[k])
  for k in ('eval_elbo', 'eval_L>1', 'eval_L>2', 'eval_auroc_LLR>1_mnist'):
    assert sa[k] == sb[k], k
  assert sb['train_seconds'] > s1['train_seconds']  # the resumed run added to the restored training time

  assert sorted(os.listdir(os.path.join(wd_b, 'checkpoints')), key=int) == ['10', '20', '30']
  abstract = state_lib.abstract_train_state(config)
  for step in (10, 20, 30):
    state_a, meta_a = _restore_state(wd_a, step, abstract)
    state_b, meta_b = _restore_state(wd_b, step, abstract)
    assert int(state_a.step) == int(state_b.step) == step and meta_a['step'] == meta_b['step'] == step
    H.tree_allclose(state_b, state_a, rtol=0, atol=0, what=f'state at step {step} after stop-and-resume')


def _diagnose_resume(data_dir, step):
  """Called when losses diverge at `step`: is it the data (input pipeline) or the loop (state, RNG)?"""
  config = H.tiny_config(data_dir)
  it = input_pipeline.create_train_iterator(config, seed=config.seed)
  uninterrupted = [next(it)['image'] for _ in range(step)]
  resumed = next(iter(input_pipeline.create_train_iterator(config, seed=config.seed, start_step=step - 1)))
  same_data = np.array_equal(uninterrupted[-1], resumed['image'])
  raise AssertionError(
      f'train loss of step {step} differs between the uninterrupted and the resumed run; the input pipeline '
      f'started at step {step - 1} gives {"the same" if same_data else "a DIFFERENT"} batch as the uninterrupted '
      f'one, so the fault is in {"the train loop (restored state / RNG)" if same_data else "the input pipeline"}.')


def test_resume_with_another_model_config_is_refused(tiny_run, tmp_path):
  """A workdir's checkpoints are not silently ignored (and overwritten) when the model config changes."""
  config, run_dir, _, _ = tiny_run
  wd = str(tmp_path / 'wd')
  shutil.copytree(run_dir, wd)
  with open(os.path.join(wd, 'config.json')) as f:
    before = f.read()
  other = H.tiny_config(config.data.data_dir, num_steps=RUN_STEPS + 2)
  other.model.latent_dims = (4, 4, 2)
  with pytest.raises(ckpt.CheckpointError, match='model config'):
    train.train_and_evaluate(other, wd)
  assert sorted(os.listdir(os.path.join(wd, 'checkpoints')), key=int) == ['10', '20', '30']
  with open(os.path.join(wd, 'config.json')) as f:
    assert f.read() == before, 'config.json of the run was overwritten by the refused config'
  assert not os.path.exists(os.path.join(wd, '.lock'))


# ---------------------------------------------------------------------------------------------------------------
# The loss through the schedule's phases, and the EMA, against float64


def _phase_config(data_dir):
  """Continuous schedule compressed into 8 steps: beta = t/4 up to step 4; lambda = 2 up to step 2, annealed to 0
  at step 6; the EMA kept with decay 0.8 (a running mean for 5 updates, then exponential)."""
  config = H.tiny_config(data_dir, num_steps=8)
  spe = input_pipeline.steps_per_epoch(config)
  config.schedule.warmup_epochs = 4 / spe
  config.schedule.free_nats = 2.0
  config.schedule.free_nats_constant_epochs = 2 / spe
  config.schedule.free_nats_anneal_epochs = 4 / spe
  config.optim.ema_decay = 0.8
  return config, spe


def test_loss_and_ema_through_warmup_free_nats_anneal_and_zero(tfds_data_dir):
  """8 jitted steps with beta > 0 and free nats active, through the anneal to 0: at every step the loss equals a
  float64 computation from the step's own model outputs (beta_t = t/4 capped at 1; lambda_t = 2 until t = 2, then
  2 (1 - (t-2)/4), 0 from t = 6; KL floored per element at lambda/n_l while lambda > 0, the raw KL after), and the
  EMA follows e <- (1 - s) e + s p after update t (0-based) with s = max(1 - 0.8, 1 / (t + 1)): the mean of the
  parameters so far for 5 updates (the initial parameters drop out at the first), then exponential."""
  config, spe = _phase_config(tfds_data_dir)
  model = state_lib.model_for_config(config)
  it = input_pipeline.create_train_iterator(config, seed=config.seed)
  batches = [next(it)['image'] for _ in range(8)]
  devices = jax.devices()[:1]
  _, data = H.shardings(devices)
  state = H.init_state(config, model, batches[0], devices)
  # The step and the forward pass below are two float32 programs compared to 5e-6: both are compiled at XLA's
  # default code generation level, where they agree to ~1e-7 (at the suite's level 0, to ~1e-5: the same accuracy
  # against float64, but less alike; see helpers.set_test_xla_flags).
  step = H.jit_step(config, model, spe, devices).lower(state, hdev.to_global(batches[0], data)).compile(
      H.DEFAULT_CODEGEN)
  forward = jax.jit(lambda p, x, r: model.apply({'params': p}, x, 0, rngs={'sample': r})).lower(
      state.params, batches[0], state.rng).compile(H.DEFAULT_CODEGEN)
  phases = set()
  for t, x in enumerate(batches):
    before = H.state_to_host(state)
    out = jax.device_get(forward(before.params, x, jax.random.fold_in(before.rng, t)))
    state, m = step(state, hdev.to_global(x, data))
    after = H.state_to_host(state)
    beta = min(t / 4, 1.0)
    lam = 2.0 if t <= 2 else max(2.0 * (1 - (t - 2) / 4), 0.0)
    kl_elem = [np.asarray(k, np.float64).reshape(k.shape[1], -1) for k in out.kl_elem]  # [B, n_l] per layer
    raw = sum(k.sum(-1) for k in kl_elem)
    floored = sum(np.maximum(k, lam / k.shape[-1]).sum(-1) for k in kl_elem) if lam > 0 else raw
    want = np.mean(-np.asarray(out.log_px[0], np.float64) + beta * floored)
    assert float(m['beta']) == pytest.approx(beta, abs=1e-6) and float(m['free_nats']) == pytest.approx(lam, abs=1e-5)
    # (The step's forward and this one are separate XLA programs: they agree to ~1e-6 relative.)
    assert float(m['loss']) == pytest.approx(want, rel=5e-6), (t, beta, lam)
    if lam == 0:  # the clipped objective max(KL_elem, 0) would fail the check above: the raw KL is optimised
      clipped = np.mean(-np.asarray(out.log_px[0], np.float64) + beta * sum(np.maximum(k, 0).sum(-1) for k in kl_elem))
      assert abs(clipped - want) > 2 * 5e-6 * abs(want), (t, clipped, want)
    phases.add(('warmup' if beta < 1 else 'beta1', 'free' if lam == 2 else 'anneal' if lam > 0 else 'zero'))
    assert int(m['skipped_update']) == 0
    f64 = lambda tree: jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)
    s = max(1 - 0.8, 1 / (t + 1))
    ema_want = jax.tree_util.tree_map(lambda e, p: (1 - s) * e + s * p, f64(before.ema_params), f64(after.params))
    H.tree_allclose(f64(after.ema_params), ema_want, rtol=1e-6, atol=1e-7, what=f'EMA after step {t + 1}')
  assert {('warmup', 'free'), ('warmup', 'anneal'), ('beta1', 'anneal'), ('beta1', 'zero')} <= phases, phases


# ---------------------------------------------------------------------------------------------------------------
# The in-training evaluation's data sets


def test_unprepared_ood_set_is_skipped_with_a_warning_that_says_how_to_prepare_it(tfds_data_dir, caplog):
  config = H.tiny_config(tfds_data_dir, ood_datasets=('mnist', 'kmnist', 'fmnist'))
  with caplog.at_level('WARNING'):
    sets = train.eval_datasets(config)
  assert sets == ['fashion_mnist', 'mnist']  # kmnist is not prepared; fmnist is the in-distribution set
  warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
  assert len(warnings) == 1, warnings
  assert 'kmnist' in warnings[0] and tfds_data_dir in warnings[0]
  assert 'python -m hvaeood.data_import --name kmnist' in warnings[0]


def test_unknown_free_nats_granularity_fails_before_the_workdir_is_made(tmp_path):
  """A misspelt --config.schedule.free_nats_granularity is a one-line error up front, not a trace-time failure."""
  config = H.tiny_config(str(tmp_path / 'no_data'))
  config.schedule.free_nats_granularity = 'per_batch'
  wd = tmp_path / 'wd'
  with pytest.raises(ValueError, match=r"'per_batch'.*free_nats_granularity.*per_layer_batch") as err:
    train.train_and_evaluate(config, str(wd))
  assert '\n' not in str(err.value)
  assert not wd.exists()
