"""Data parallelism: 4 fake CPU devices against 1, and a 2-process run on localhost with the gloo collectives.

Both run in subprocesses (the device count and `jax.distributed` are fixed at JAX start-up). The tests share a
persistent compilation cache with test_train (see helpers) so the tiny programs compile once per session.
"""

import json
import os
import pickle
import time

import jax
import numpy as np
import pytest

import helpers as H
from hvaeood import checkpoints as ckpt
from hvaeood import devices as hdev
from hvaeood import loading
from hvaeood import state as state_lib
from hvaeood import train


@pytest.fixture(scope='module', autouse=True)
def _cache():
  with H.compilation_cache() as d:
    yield d


# ---------------------------------------------------------------------------------------------------------------
# 4 fake devices == 1 device

def _steps_on_this_process(config, state0, batches, spe, devices):
  rep, data = H.shardings(devices)
  step = H.jit_step(config, state_lib.model_for_config(config), spe, devices)
  state = jax.device_put(state0, rep)
  results = []
  for batch in batches:
    state, metrics = step(state, hdev.to_global(batch, data))
    results.append((H.state_to_host(state), H.state_to_host(metrics)))
  return results


def test_four_fake_devices_match_one_device(tfds_data_dir, tmp_path):
  """The jitted step with the batch sharded over 4 devices gives the 1-device loss, gradients and updates.

  Two steps from the same state on the same two real batches. After Adam's first step mu = (1 - b1) * grad
  exactly, so comparing the optimiser state compares the gradients themselves (the parameter update of a first
  Adam step is ~lr * sign(grad) and would hide a scaled gradient).
  """
  from hvaeood import input_pipeline  # pylint: disable=import-outside-toplevel
  # tiny_config runs both sides on XLA's conv kernels: 'auto' would put the 1-device run on oneDNN (single-device
  # only), whose float32 rounding differs from XLA's by more than this test's sharding tolerances.
  config = H.tiny_config(tfds_data_dir)
  assert config.model.conv_impl == 'fast'
  spe = input_pipeline.steps_per_epoch(config)
  it = input_pipeline.create_train_iterator(config, seed=config.seed)
  batches = [next(it)['image'] for _ in range(2)]
  model = state_lib.model_for_config(config)
  state0 = H.state_to_host(H.init_state(config, model, batches[0], jax.devices()[:1]))

  odd = np.concatenate([batches[0], batches[1][:2]])  # 18 rows: not a multiple of 4
  inp, out = tmp_path / 'in.pkl', tmp_path / 'out.pkl'
  with open(inp, 'wb') as f:
    pickle.dump({'state': state0, 'batches': batches, 'spe': spe, 'devices': 4, 'data_dir': tfds_data_dir,
                 'odd_batch': odd}, f)
  proc = H.start_program('sharded_steps', inp, out, devices=4)
  try:
    one = _steps_on_this_process(config, state0, batches, spe, jax.devices()[:1])
    one_odd = _steps_on_this_process(config, state0, [odd], spe, jax.devices()[:1])[0]
    log, _ = proc.communicate(timeout=400)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, log[-6000:]
  with open(out, 'rb') as f:
    four = pickle.load(f)
  # The 18-row batch padded to 20 rows on 4 devices (2 rows masked) gives the unpadded 18-row step of 1 device:
  # the same loss and metrics (means over the real rows) and the same gradients (Adam's first moment).
  padded, s_pad, m_pad = four.pop()
  assert padded == 20
  for k in one_odd[1]:
    np.testing.assert_allclose(m_pad[k], one_odd[1][k], rtol=1e-4, atol=1e-6, err_msg=f'padded step: {k}')
  np.testing.assert_allclose(m_pad['loss'], one_odd[1]['loss'], rtol=1e-5)
  H.tree_allclose(s_pad.opt_state[0].mu, one_odd[0].opt_state[0].mu, rtol=1e-4, atol_frac=1e-5,
                  what='Adam mu (gradients) of the padded step')

  # Step 1 starts both runs from the same state: only the summation order differs over 4 shards, and per leaf the
  # gradients agree to ~1e-6 of the leaf's largest one. Step 2 starts from parameters that already differ by that
  # rounding, passed through Adam's first update, and this tiny model's step-2 gradients are sensitive to it:
  # perturbing the 1-device step-1 parameters by a relative 1e-6 (random) moves step 2's grad_norm by 5e-5 and
  # Adam mu by up to 5e-3 of a leaf's largest value (measured on an AVX-512/AMX Xeon, where 4 shards against 1
  # gave 1.6e-4 and 2e-3). A sharding bug (a gradient scaled by the device count, a missing or doubled reduction)
  # changes them by O(1).
  tols = [dict(metric=1e-4, mu_rtol=1e-4, mu_frac=1e-5), dict(metric=1e-3, mu_rtol=1e-2, mu_frac=1e-2)]
  for i, ((s1, m1), (s4, m4)) in enumerate(zip(one, four)):
    tol = tols[i]
    assert int(m1['skipped_update']) == 0 and int(m4['skipped_update']) == 0
    np.testing.assert_allclose(m4['loss'], m1['loss'], rtol=1e-5, err_msg=f'loss of step {i + 1}')
    for k in m1:
      np.testing.assert_allclose(m4[k], m1[k], rtol=tol['metric'], atol=1e-6, err_msg=f'metric {k} of step {i + 1}')
    H.tree_allclose(s4.opt_state[0].mu, s1.opt_state[0].mu, rtol=tol['mu_rtol'], atol_frac=tol['mu_frac'],
                    what=f'Adam mu (gradients) after step {i + 1}')
    # An update is ~lr = 3e-4 per element; allow 7% of one where Adam's ratio amplifies gradient rounding.
    H.tree_allclose(s4.params, s1.params, rtol=1e-5, atol=2e-5, what=f'params after step {i + 1}')
    assert int(s4.step) == int(s1.step) == i + 1
  # The steps did something: the parameters moved and the gradients are not zero.
  # (Step 1 has beta = 0 in the continuous warm-up, so only step 2 gives the priors gradients.)
  assert all(np.any(g != 0) for g in jax.tree_util.tree_leaves(one[-1][0].opt_state[0].mu))
  moved = [np.max(np.abs(a - b)) for a, b in zip(jax.tree_util.tree_leaves(one[-1][0].params),
                                                  jax.tree_util.tree_leaves(state0.params))]
  assert max(moved) > 1e-4


# ---------------------------------------------------------------------------------------------------------------
# 2 processes on localhost

def _summary(log: str) -> dict:
  lines = [l for l in log.splitlines() if l.startswith('SUMMARY ')]
  assert lines, log[-6000:]
  return json.loads(lines[-1][len('SUMMARY '):])


def _single_process_replica(config, num_steps):
  """What the 2-process run computes, on one device: per-step losses and the final state.

  Each process reads its own half of the train split (`process_index` of 2) with a local batch of 8; the global
  batch is process 0's 8 images then process 1's 8 (`make_array_from_process_local_data` on the 'data' axis).
  """
  from hvaeood import input_pipeline  # pylint: disable=import-outside-toplevel
  its = [input_pipeline.create_train_iterator(config, seed=config.seed, process_index=i, process_count=2)
         for i in range(2)]
  batches = [np.concatenate([next(it)['image'] for it in its]) for _ in range(num_steps)]
  model = state_lib.model_for_config(config)
  devices = jax.devices()[:1]
  spe = input_pipeline.steps_per_epoch(config, process_count=2)
  state = H.init_state(config, model, batches[0], devices)
  step = H.jit_step(config, model, spe, devices)
  losses = []
  for b in batches:
    state, m = step(state, hdev.to_global(b, H.shardings(devices)[1]))
    losses.append(float(m['loss']))
  return losses, H.state_to_host(state)


def test_two_process_run_trains_and_checkpoints(tfds_data_dir, tmp_path):
  """2 processes x 1 CPU device, jax.distributed on localhost with gloo: a 4-step run with 2 checkpoints.

  Both finish with the same summary; the checkpoints and logs are written once; and the run computes what one
  process computes on the same global batches (the multi-host data assembly is right).
  """
  workdir = tmp_path / 'wd'
  port = H.free_port()
  num_steps = 4
  procs, logs = [], []
  for pid in range(2):
    log = tmp_path / f'process_{pid}.log'
    procs.append(H.start_program('distributed_process', pid, port, workdir, tfds_data_dir, log_path=log))
    logs.append(log)
  try:
    config = H.tiny_config(tfds_data_dir, num_steps=num_steps, checkpoint_every=2)
    replica_losses, replica_state = _single_process_replica(config, num_steps)
    deadline = time.time() + 480
    for p in procs:
      p.wait(timeout=max(1.0, deadline - time.time()))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  texts = [l.read_text() for l in logs]
  for pid, (p, text) in enumerate(zip(procs, texts)):
    assert p.returncode == 0, f'process {pid} exited with {p.returncode}:\n{text[-8000:]}'
  s0, s1 = _summary(texts[0]), _summary(texts[1])
  assert s0['step'] == s1['step'] == num_steps
  assert s0['stop_reason'] == s1['stop_reason'] == 'completed'
  # Every process computes the same replicated metrics and evaluation.
  keys = [k for k in s0 if k.startswith(('train_', 'eval_')) and k not in ('train_seconds', 'train_images_per_sec')]
  assert 'train_loss' in keys and 'eval_elbo' in keys, keys
  for k in keys:
    assert np.isfinite(s0[k]) and s0[k] == s1[k], (k, s0[k], s1[k])
  # Checkpoints written once (one directory per step, no temporaries), the lock released, one metrics log.
  ckpts = sorted(os.listdir(workdir / 'checkpoints'))
  assert ckpts == ['2', '4'], ckpts
  assert os.listdir(workdir / 'best') == ['4']
  assert (workdir / 'config.json').is_file() and (workdir / 'summary.json').is_file()
  assert not (workdir / '.lock').exists()
  rows = H.train_rows(workdir)
  assert [r['step'] for r in rows] == list(range(1, num_steps + 1))
  assert rows[-1]['train_loss'] == s0['train_loss']
  # The same numbers as one process on the assembled global batches. The first loss (same initial params) agrees
  # to float32 rounding; after that, reduction-order differences of the multi-threaded convs (half batches vs the
  # whole batch) pass through Adam's normalised first updates, which amplify them for near-zero gradients.
  losses = [r['train_loss'] for r in rows]
  np.testing.assert_allclose(losses[0], replica_losses[0], rtol=1e-5)
  np.testing.assert_allclose(losses, replica_losses, rtol=2e-3)
  # Both storage paths of the checkpoint format were written by the two processes (distributed_process.py).
  meta = ckpt.read_meta(ckpt.make_manager(str(workdir / 'checkpoints'), keep=1000, read_only=True), num_steps)
  assert 0 < len(meta['own_arrays']) < len(meta['layout']), (len(meta['own_arrays']), len(meta['layout']))
  loaded = loading.load_for_eval(str(workdir))
  assert loaded.step == num_steps
  # After 4 Adam steps the same amplified rounding differences as the losses above (tight agreement of one
  # sharded step with one device is test_four_fake_devices_match_one_device's job).
  H.tree_allclose(H.state_to_host(loaded.params), replica_state.params, rtol=2e-3, atol=1e-3,
                  what='params of the 2-process run vs 1 process')
  # Its evaluation (each process scoring half of every eval batch) == one process evaluating the saved params.
  _assert_evaluation_is_one_devices(s0, loaded.params, config, num_steps)


def _assert_evaluation_is_one_devices(summary, params, config, step):
  """The run's in-training evaluation at `step` == one device evaluating `params` with the same keys and batches."""
  model = state_lib.model_for_config(config)
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed + 1), step)  # as train._evaluate_and_log
  mesh = H.shardings(jax.devices()[:1])[0].mesh
  results = train.evaluate_model(model, params, config, mesh, rng, [config.data.name])
  assert len(results[config.data.name]['elbo']) == config.eval.max_examples
  single = train.eval_summary(results, config.data.name, 784)
  for k in ('eval_elbo', 'eval_log_px', 'eval_L>1', 'eval_L>2', 'eval_kl_z1'):
    np.testing.assert_allclose(summary[k], single[k], rtol=1e-4, err_msg=k)


# ---------------------------------------------------------------------------------------------------------------
# 8 fake devices: the tiny config trains through its evaluations

def test_eight_devices_train_through_the_evaluations(tfds_data_dir, tmp_path):
  """The tiny config with batch 20 and evaluation batch 50 on 8 devices: it trains on batches padded to 24 rows,
  evaluates at steps 2 and 4 on batches padded to 56, and its evaluation equals one device's evaluation of the
  saved parameters on batches of the same 56 rows (the latent draws of a row depend on the batch's shape)."""
  workdir = tmp_path / 'wd'
  log = H.run_program('eight_devices', workdir, tfds_data_dir, timeout=400, devices=8)
  summary = _summary(log)
  assert summary['step'] == 4 and summary['stop_reason'] == 'completed'
  evals = [r for r in H.read_jsonl(workdir / 'metrics.jsonl') if 'eval_elbo' in r]
  assert [r['step'] for r in evals] == [2, 4]
  loaded = loading.load_for_eval(str(workdir), which='latest')
  assert loaded.step == 4
  config = H.tiny_config(tfds_data_dir, num_steps=4)
  config.eval.batch_size = 56
  _assert_evaluation_is_one_devices(summary, loaded.params, config, 4)


# ---------------------------------------------------------------------------------------------------------------
# 2 processes: wall-clock checkpoints and SIGTERM to one process only

def _start_pair(tmp_path, tag, workdir, data_dir, num_steps):
  port = H.free_port()
  procs, logs = [], []
  for pid in range(2):
    log = tmp_path / f'{tag}_{pid}.log'
    procs.append(H.start_program('controlled_process', pid, port, workdir, data_dir, num_steps, log_path=log))
    logs.append(log)
  return procs, logs


def _wait_pair(procs, logs, timeout):
  deadline = time.time() + timeout
  try:
    for p in procs:
      p.wait(timeout=max(1.0, deadline - time.time()))
  except Exception:  # pylint: disable=broad-except
    pass
  finally:
    hung = [i for i, p in enumerate(procs) if p.poll() is None]
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  texts = [l.read_text() for l in logs]
  assert not hung, f'processes {hung} did not exit within {timeout} s (a deadlock?):\n{texts[0][-4000:]}'
  for pid, (p, text) in enumerate(zip(procs, texts)):
    assert p.returncode == 0, f'process {pid} exited with {p.returncode}:\n{text[-8000:]}'
  return [_summary(t) for t in texts]


def test_two_processes_sigterm_to_one_and_timed_checkpoints_stay_in_step(tfds_data_dir, tmp_path):
  """2 processes, a wall-clock checkpoint cadence of 0.25 s and SIGTERM to process 1 only.

  Timed saves (collectives) happen at the same steps on both processes, decided on process 0's clock; SIGTERM to
  one process stops both at the same step, both save it and exit 0 within a bounded time (no deadlock). Resuming
  the run from an earlier timed checkpoint in a copy of the workdir reproduces the preempted step's state bit for
  bit.
  """
  import shutil  # pylint: disable=import-outside-toplevel
  import signal  # pylint: disable=import-outside-toplevel
  workdir = tmp_path / 'wd'
  procs, logs = _start_pair(tmp_path, 'run', workdir, tfds_data_dir, 10**6)
  deadline = time.time() + 240
  try:
    while time.time() < deadline:  # until training is well under way (process 0 logs every step)
      rows = H.train_rows(workdir) if (workdir / 'metrics.jsonl').exists() else []
      if rows and rows[-1]['step'] >= 6 and len(os.listdir(workdir / 'checkpoints')) >= 2:
        break
      assert all(p.poll() is None for p in procs), logs[0].read_text()[-4000:]
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
  except BaseException:
    for p in procs:
      p.kill()
    raise
  s0, s1 = _wait_pair(procs, logs, timeout=60)
  stop = s0['step']
  assert s1['step'] == stop and s0['stop_reason'] == s1['stop_reason'] == 'preempted (SIGTERM): checkpoint saved'
  assert stop % 2 == 0  # decided at a sync step
  steps = sorted(int(d) for d in os.listdir(workdir / 'checkpoints') if d.isdigit())
  assert steps[-1] == stop and len(steps) >= 3, steps
  assert all(st % 2 == 0 for st in steps), steps  # timed saves only at sync steps
  assert not [d for d in os.listdir(workdir / 'checkpoints') if not d.isdigit()]  # no temporaries left

  # Resume from the last timed checkpoint before the stop, in a copy, up to the stop step.
  resume_from = steps[-2]
  copy = tmp_path / 'copy'
  shutil.copytree(workdir, copy)
  for st in steps[-1:]:
    shutil.rmtree(copy / 'checkpoints' / str(st))
  shutil.rmtree(copy / 'best', ignore_errors=True)
  rows_before = len(H.read_jsonl(copy / 'metrics.jsonl'))
  procs, logs = _start_pair(tmp_path, 'resume', copy, tfds_data_dir, stop)
  r0, r1 = _wait_pair(procs, logs, timeout=240)
  assert r0['step'] == r1['step'] == stop and r0['stop_reason'] == 'completed'
  resumed = [r for r in H.read_jsonl(copy / 'metrics.jsonl')[rows_before:] if 'train_loss' in r]
  assert [r['step'] for r in resumed] == list(range(resume_from + 1, stop + 1))
  original = {r['step']: r for r in H.train_rows(workdir)}
  for r in resumed:
    assert r['train_loss'] == original[r['step']]['train_loss'], r['step']
  config = H.tiny_config(tfds_data_dir)
  abstract = state_lib.abstract_train_state(config)
  states = []
  for wd in (workdir, copy):
    manager = ckpt.make_manager(str(wd / 'checkpoints'), keep=1000, read_only=True)
    states.append(H.state_to_host(ckpt.restore(manager, stop, abstract)[0]))
  assert int(states[0].step) == stop
  H.tree_allclose(states[1], states[0], rtol=0, atol=0, what='resumed vs preempted state')
