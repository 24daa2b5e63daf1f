"""Shared helpers of the training tests (test_train, test_schedules, test_distributed).

* `tiny_config`: the `tiny` FashionMNIST config with a data_dir, few steps and a small evaluation.
* `compilation_cache`: a persistent XLA compilation cache shared by these tests and their subprocesses, so the
  same tiny programs (data-dependent init, train step, evaluation) compile once per session rather than once per
  `train_and_evaluate` call or subprocess. Enabled only while a module that asks for it runs.
* `run_python`: runs a Python snippet in a subprocess with the repository on the path and the cache shared.
* `state_to_host` / `tree_allclose`: moving a `TrainState` to numpy and comparing pytrees leaf by leaf.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from typing import Any, Optional, Sequence

import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
TESTS = pathlib.Path(__file__).resolve().parent

_CACHE_DIR: Optional[str] = None


def tiny_config(data_dir: str, *, num_steps: int = 4, ood_datasets: Sequence[str] = (),
                checkpoint_every: Optional[int] = None, log_every: int = 1):
  """The `tiny` FashionMNIST config, trimmed for tests.

  Evaluation runs once, at the end (eval_every_steps = num_steps), on 50 test examples of FashionMNIST plus
  `ood_datasets`; every step is logged; a checkpoint every `checkpoint_every` steps (default: only at the end).

  The KL warm-up is stretched to 10^6 epochs, so beta < 1e-8 over any test run and the loss is
  -log p(x|z) to within a fraction of a nat: the single-sample KL of z1 of a freshly initialised model is
  heavy-tailed (10^3..10^7 nats from one step to the next), which would make "the loss falls" a coin flip.
  The schedules themselves are tested in test_schedules.py.
  """
  from configs import fashion_mnist_hvae  # pylint: disable=import-outside-toplevel
  config = fashion_mnist_hvae.get_config('tiny')
  config.data.data_dir = data_dir
  config.train.num_steps = num_steps
  config.train.log_every_steps = log_every
  config.train.eval_every_steps = num_steps
  config.schedule.warmup_epochs = 1e6
  config.eval.batch_size = 50
  config.eval.max_examples = 50
  config.eval.num_samples = 4
  config.eval.ood_datasets = tuple(ood_datasets)
  config.checkpoint.every_steps = checkpoint_every or num_steps
  config.checkpoint.every_minutes = 0.0
  config.checkpoint.keep = 3
  return config


def read_jsonl(path) -> list[dict]:
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]


def train_rows(workdir) -> list[dict]:
  """The training-metric rows of WORKDIR/metrics.jsonl, in step order."""
  rows = [r for r in read_jsonl(os.path.join(workdir, 'metrics.jsonl')) if 'train_loss' in r]
  return sorted(rows, key=lambda r: r['step'])


def shardings(devices):
  """(replicated, batch-sharded) NamedShardings over a 1-D 'data' mesh of `devices`, as train.py makes them."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel
  mesh = Mesh(np.array(devices), ('data',))
  return NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))


def init_state(config, model, images: np.ndarray, devices=None):
  """The initial TrainState on `devices`, jitted exactly as train_and_evaluate does (so it shares the compile)."""
  import functools  # pylint: disable=import-outside-toplevel
  from hvaeood import train  # pylint: disable=import-outside-toplevel
  rep, data = shardings(devices or jax.devices())
  init = jax.jit(functools.partial(train.create_train_state, config, model), out_shardings=rep)
  return init(train.to_global(images, data))


def jit_step(config, model, spe: int, devices=None, wrap=None):
  """The train step jitted exactly as train_and_evaluate does; `wrap` (e.g. chex.assert_max_traces) wraps it."""
  from hvaeood import train  # pylint: disable=import-outside-toplevel
  rep, data = shardings(devices or jax.devices())
  fn = train.make_train_step(config, model, spe)
  if wrap is not None:
    fn = wrap(fn)
  return jax.jit(fn, in_shardings=(rep, data), out_shardings=(rep, rep), donate_argnums=(0,))


# ---------------------------------------------------------------------------------------------------------------
# Persistent compilation cache


def cache_dir() -> str:
  """The session's compilation-cache directory ($HVAEOOD_TEST_JAX_CACHE, or a temporary one)."""
  global _CACHE_DIR
  if _CACHE_DIR is None:
    _CACHE_DIR = os.environ.get('HVAEOOD_TEST_JAX_CACHE') or tempfile.mkdtemp(prefix='hvaeood_jax_cache_')
    if not os.environ.get('HVAEOOD_TEST_JAX_CACHE'):
      atexit.register(shutil.rmtree, _CACHE_DIR, True)
  return _CACHE_DIR


@contextlib.contextmanager
def compilation_cache():
  """Enables the persistent compilation cache in this process, restoring the previous settings afterwards."""
  names = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs',
           'jax_persistent_cache_min_entry_size_bytes')
  old = {n: getattr(jax.config, n) for n in names}
  if old['jax_compilation_cache_dir']:  # The user set one: use theirs.
    yield old['jax_compilation_cache_dir']
    return
  jax.config.update('jax_compilation_cache_dir', cache_dir())
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  try:
    yield cache_dir()
  finally:
    for n, v in old.items():
      jax.config.update(n, v)


# ---------------------------------------------------------------------------------------------------------------
# Subprocesses


def subprocess_env(**extra: str) -> dict:
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join([str(REPO), str(TESTS)] + [p for p in [env.get('PYTHONPATH')] if p])
  env['JAX_PLATFORMS'] = 'cpu'
  env['JAX_COMPILATION_CACHE_DIR'] = jax.config.jax_compilation_cache_dir or cache_dir()
  env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0.5'
  env['TF_CPP_MIN_LOG_LEVEL'] = '2'
  env.pop('XLA_FLAGS', None)
  env.update(extra)
  import hvaeood  # pylint: disable=import-outside-toplevel
  hvaeood.set_xla_cpu_defaults(env)  # the subprocess is a launcher too
  return env


def start_python(code: str, *args, cwd=None, log_path=None, **env) -> subprocess.Popen:
  """Starts `python -c code args...` (code dedented); stdout and stderr go to `log_path` (or a pipe)."""
  out = open(log_path, 'w', encoding='utf-8') if log_path else subprocess.PIPE  # pylint: disable=consider-using-with
  return subprocess.Popen([sys.executable, '-c', textwrap.dedent(code), *map(str, args)], cwd=cwd or str(REPO),
                          stdout=out, stderr=subprocess.STDOUT, text=True, env=subprocess_env(**env))


def run_python(code: str, *args, timeout: float, **env) -> str:
  """Runs `python -c code args...` to completion; raises AssertionError with its output if it fails."""
  proc = start_python(code, *args, **env)
  try:
    out, _ = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, _ = proc.communicate()
    raise AssertionError(f'subprocess timed out after {timeout} s; output:\n{out[-6000:]}') from None
  if proc.returncode != 0:
    raise AssertionError(f'subprocess failed (exit {proc.returncode}); output:\n{out[-6000:]}')
  return out


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------------
# Pytrees


def state_to_host(state) -> Any:
  """A copy of a pytree of (possibly donated later) device arrays as numpy arrays."""
  return jax.tree_util.tree_map(lambda x: np.array(jax.device_get(x)), state)


def tree_allclose(a, b, *, rtol: float, atol: float = 0.0, atol_frac: float = 0.0, what: str = 'tree') -> None:
  """Asserts two pytrees have the same structure and allclose leaves; names the first mismatching leaf.

  The absolute tolerance of a leaf is max(atol, atol_frac * max |leaf of b|).
  """
  la, ta = jax.tree_util.tree_flatten_with_path(a)
  lb, tb = jax.tree_util.tree_flatten_with_path(b)
  assert ta == tb, f'{what}: different tree structures\n{ta}\n{tb}'
  for (path, x), (_, y) in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.shape == y.shape and x.dtype == y.dtype, (what, jax.tree_util.keystr(path), x.shape, y.shape)
    tol = max(atol, atol_frac * float(np.max(np.abs(y)))) if y.size else atol
    np.testing.assert_allclose(x, y, rtol=rtol, atol=tol,
                               err_msg=f'{what}: leaf {jax.tree_util.keystr(path)} differs')
