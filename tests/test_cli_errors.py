"""Bad input (issue 7): every user mistake gets exit status 2 and one `error: ...` line naming the problem and the
fix, with no traceback and no partial output that looks complete.

Each case runs the real `train.py` or `evaluate.py` in a subprocess. The cases start together when the module
does (three at a time); those that need a trained checkpoint use the session's reference run (see
helpers.reference_workdir), built by whichever module asks first.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import json
import pathlib
import re
import socket
import subprocess
import sys

import pytest

import helpers as H
from hvaeood import integrity

N = H.N_STEPS
TINY = "configs/fashion_mnist_hvae.py:tiny"
CASES = {}


def case(fn):
  CASES[fn.__name__] = fn
  return fn


class Env:

  def __init__(self, data_dir, base: pathlib.Path, shared: pathlib.Path):
    self.data_dir = data_dir
    self.base = base
    self.shared = shared
    self.cfg = H.write_config(base / "config.py", data_dir)

  def dir(self, name) -> pathlib.Path:
    return self.base / name

  def reference(self) -> pathlib.Path:
    return H.reference_workdir(self.shared, self.data_dir)

  def train(self, name, *args, devices=1, workdir=None):
    wd = workdir or self.dir(name) / "wd"
    return H.run_cli([H.REPO / "train.py", *args, f"--workdir={wd}"], devices=devices), wd

  def evaluate(self, name, *args, checkpoint=None, devices=1, output_dir=None):
    out = output_dir or self.dir(name) / "out"
    ckpt_args = [] if checkpoint is False else [f"--checkpoint={checkpoint or self.reference()}"]
    res = H.run_cli([H.REPO / "evaluate.py", *ckpt_args, f"--output_dir={out}", "--max_examples=32",
                     "--batch_size=32", *args], devices=devices)
    return res, out


# ---------------------------------------------------------------------------------------------------------------
# train.py


@case
def unknown_config_field(env):
  return env.train("unknown_config_field", f"--config={TINY}", "--config.optim.nonexistent=1")


@case
def unknown_config_section(env):
  return env.train("unknown_config_section", f"--config={TINY}", "--config.optimiser.lr=1e-3")


@case
def bad_config_value(env):
  return env.train("bad_config_value", f"--config={TINY}", "--config.optim.lr=fast")


@case
def missing_config_file(env):
  return env.train("missing_config_file", "--config=configs/no_such_config.py")


@case
def unknown_config_variant(env):
  return env.train("unknown_config_variant", "--config=configs/fashion_mnist_hvae.py:huge")


@case
def unknown_train_dataset(env):
  return env.train("unknown_train_dataset", f"--config={env.cfg}", "--config.data.name=fashion_mnits")


@case
def bad_train_precision(env):
  return env.train("bad_train_precision", f"--config={env.cfg}", "--config.train.precision=fp8")


@case
def unwritable_workdir(env):
  blocker = env.dir("unwritable_workdir")
  blocker.parent.mkdir(parents=True, exist_ok=True)
  blocker.write_text("a file where a directory is expected\n")
  return env.train("unwritable_workdir", f"--config={env.cfg}", workdir=blocker / "wd")


@case
def workdir_in_use(env):
  wd = env.dir("workdir_in_use") / "wd"
  wd.mkdir(parents=True)
  holder = subprocess.Popen([H.PYTHON, str(H.PROGRAMS / "lock_holder.py"), str(wd), "600"], env=H.subprocess_env(),
                            stdout=subprocess.PIPE,
                            text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    res, _ = env.train("workdir_in_use", f"--config={env.cfg}", workdir=wd)
    return res, wd, holder.pid
  finally:
    holder.kill()
    holder.wait()


@case
def resume_with_other_model(env):
  wd = H.copy_workdir(env.reference(), env.dir("resume_with_other_model") / "wd")
  before = {p.name: p.stat().st_mtime_ns for p in (wd / "checkpoints").iterdir()}
  config_before = (wd / "config.json").read_text()
  res, _ = env.train("resume_with_other_model", f"--config={env.cfg}", "--config.model.latent_dims=(2, 4, 4)",
                     workdir=wd)
  return res, wd, before, config_before


# ---------------------------------------------------------------------------------------------------------------
# evaluate.py


@case
def missing_checkpoint(env):
  return env.evaluate("missing_checkpoint", "--ood=mnist", checkpoint=env.dir("missing_checkpoint") / "nope")


@case
def checkpoint_config_mismatch(env):
  """A checkpoint whose stored config builds a model other than the one its arrays belong to (as after a code
  change): its files are intact (the manifest is rewritten), so only the shapes can tell."""
  wd = H.copy_workdir(env.reference(), env.dir("checkpoint_config_mismatch") / "wd")
  step_dir = wd / "checkpoints" / str(N)
  meta_file = step_dir / "meta" / "metadata"
  meta = json.loads(meta_file.read_text())
  config = json.loads(meta["config"])
  config["model"]["channels"] = [[16] * len(c) for c in config["model"]["channels"]]
  meta["config"] = json.dumps(config, sort_keys=True)
  meta_file.write_text(json.dumps(meta))
  integrity.write_manifest(str(step_dir))
  return env.evaluate("checkpoint_config_mismatch", "--ood=mnist", checkpoint=step_dir)


@case
def unknown_ood_dataset(env):
  return env.evaluate("unknown_ood_dataset", "--ood=mnist,not_a_dataset")


@case
def ood_npz_with_unnamed_arrays(env):
  import numpy as np  # pylint: disable=import-outside-toplevel
  path = env.dir("ood_npz_with_unnamed_arrays") / "two.npz"
  path.parent.mkdir(parents=True, exist_ok=True)
  np.savez(path, a=np.zeros((3, 28, 28), np.uint8), b=np.zeros((3, 28, 28), np.uint8))
  return env.evaluate("ood_npz_with_unnamed_arrays", f"--ood=mnist,{path}")


@case
def ood_shape_mismatch(env):
  # cifar10 (32x32x3) against a 28x28x1 model, with a data_dir where cifar10 is certainly not prepared: the
  # shape check must come before any data access.
  empty = env.dir("ood_shape_mismatch") / "empty_data_dir"
  empty.mkdir(parents=True)
  return env.evaluate("ood_shape_mismatch", "--ood=cifar10", f"--data_dir={empty}")


@case
def iw_samples_zero(env):
  return env.evaluate("iw_samples_zero", "--ood=mnist", "--iw_samples=0")


@case
def k_out_of_range(env):
  return env.evaluate("k_out_of_range", "--ood=mnist", "--k=1,3")


@case
def unwritable_output_dir(env):
  blocker = env.dir("unwritable_output_dir")
  blocker.parent.mkdir(parents=True, exist_ok=True)
  blocker.write_text("a file where a directory is expected\n")
  return env.evaluate("unwritable_output_dir", "--ood=mnist", output_dir=blocker / "out")


@case
def eval_bad_flag_value(env):
  # The flags are parsed before the checkpoint is looked at: any path will do.
  return env.evaluate("eval_bad_flag_value", "--ood=mnist", "--iw_samples=many",
                      checkpoint=env.dir("eval_bad_flag_value") / "unused")


class _Cases(dict):
  """name -> future of a case's result; a case no selected test announced is started when first asked for."""

  def __init__(self, pool, env):
    super().__init__()
    self.pool, self.env = pool, env

  def __missing__(self, name):
    self[name] = self.pool.submit(CASES[name], self.env)
    return self[name]


@pytest.fixture(scope="module")
def results(tfds_data_dir, tmp_path_factory, pytestconfig, request):
  env = Env(tfds_data_dir, tmp_path_factory.mktemp("cli_errors"),
            H.session_shared_dir(tmp_path_factory))
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=3)
  # The cases of the selected tests, all at once; those needing the reference checkpoint last, so that the
  # quick ones overlap with its training run.
  module = sys.modules[__name__]
  wanted = set()
  for item in request.session.items:
    if getattr(item, "module", None) is module and getattr(item, "function", None) is not None:
      wanted.update(re.findall(r'get\(results, "(\w+)"\)', inspect.getsource(item.function)))
  needs_reference = ("resume_with_other_model", "checkpoint_config_mismatch", "unknown_ood_dataset",
                     "ood_shape_mismatch", "iw_samples_zero", "k_out_of_range",
                     "unwritable_output_dir")
  futures = _Cases(pool, env)
  for name in sorted((n for n in CASES if n in wanted), key=lambda n: n in needs_reference):
    futures[name]  # pylint: disable=pointless-statement
  yield futures
  for f in futures.values():
    f.cancel()
  pool.shutdown(wait=False)
  # The messages, for the record (shown with the test summary).
  lines = []
  for name, f in list(futures.items()):
    if f.done() and not f.cancelled() and f.exception() is None:
      res = f.result()[0]
      lines.append(f"  {name:28s} exit {res.rc}  {(res.error_lines or ['(no error line)'])[-1]}")
  reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
  capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
  if reporter is not None and capture is not None and lines:
    with capture.global_and_fixture_disabled():
      reporter.write_line("\nbad input -> message:\n" + "\n".join(lines))


def get(results, name):
  return results[name].result(timeout=1800)


def no_results(out: pathlib.Path):
  assert not (out / "results.json").exists(), "a failed evaluation left results.json, which marks a finished run"


# ---------------------------------------------------------------------------------------------------------------
# Tests: train.py


def test_unknown_config_field(results):
  res, wd = get(results, "unknown_config_field")
  line = H.assert_user_error(res, "--config.optim.nonexistent", "config.optim has no field 'nonexistent'", " lr")
  assert "configs/common.py" in line
  assert not wd.exists(), "nothing may be written before the flags are valid"


def test_unknown_config_section(results):
  res, _ = get(results, "unknown_config_section")
  H.assert_user_error(res, "config has no field 'optimiser'", "optim")


def test_bad_config_value(results):
  res, _ = get(results, "bad_config_value")
  H.assert_user_error(res, "'fast'", "--config.optim.lr")


def test_missing_config_file(results):
  res, _ = get(results, "missing_config_file")
  H.assert_user_error(res, "configs/no_such_config.py does not exist", "--config")


def test_unknown_config_variant(results):
  res, _ = get(results, "unknown_config_variant")
  H.assert_user_error(res, "'huge'", "tiny")


def test_unknown_train_dataset(results):
  res, wd = get(results, "unknown_train_dataset")
  H.assert_user_error(res, "'fashion_mnits'", "fashion_mnist")
  assert not (wd / "checkpoints").exists() and not (wd / "config.json").exists()


def test_bad_train_precision(results):
  res, wd = get(results, "bad_train_precision")
  H.assert_user_error(res, "--config.train.precision='fp8'", "default, high, highest")
  assert not (wd / "checkpoints").exists()


def test_unwritable_workdir(results):
  res, _ = get(results, "unwritable_workdir")
  H.assert_user_error(res, "not writable", "--workdir")


def test_workdir_in_use(results):
  res, wd, holder_pid = get(results, "workdir_in_use")
  H.assert_user_error(res, f"in use by process {holder_pid} on {socket.gethostname()}", "--workdir")
  assert sorted(p.name for p in wd.iterdir()) == [".lock"], "the refused run wrote into the workdir"


def test_resume_with_a_different_model_config(results):
  res, wd, before, config_before = get(results, "resume_with_other_model")
  H.assert_user_error(res, "can be restored for this config", "stored with shape", "config.json", "--workdir")
  after = {p.name: p.stat().st_mtime_ns for p in (wd / "checkpoints").iterdir()}
  assert after == before, "the run's checkpoints were changed (renamed, pruned or overwritten)"
  assert (wd / "config.json").read_text() == config_before, "the run's config.json was overwritten"


# ---------------------------------------------------------------------------------------------------------------
# Tests: evaluate.py


def test_missing_checkpoint_path(results):
  res, out = get(results, "missing_checkpoint")
  H.assert_user_error(res, "does not exist", "--workdir")
  no_results(out)


def test_checkpoint_config_does_not_match_code(results):
  res, out = get(results, "checkpoint_config_mismatch")
  H.assert_user_error(res, f"checkpoints/{N} does not match the model its stored config builds",
                      "is stored with shape (8,) but the config builds (16,)")
  no_results(out)


def test_unknown_ood_dataset(results):
  res, out = get(results, "unknown_ood_dataset")
  H.assert_user_error(res, "'not_a_dataset'", "mnist")
  no_results(out)


def test_ood_npz_with_several_unnamed_arrays(results):
  res, out = get(results, "ood_npz_with_unnamed_arrays")
  H.assert_user_error(res, "two.npz: holds 2 arrays ['a', 'b'] and none is named", "FILE.npz:KEY")
  no_results(out)


def test_ood_dataset_shape_mismatch_before_data_access(results):
  res, out = get(results, "ood_shape_mismatch")
  line = H.assert_user_error(res, "cifar10", "(32, 32, 3)", "(28, 28, 1)")
  assert "prepared" not in line and "data_import" not in line, "the data was accessed before the shape check"
  no_results(out)


def test_iw_samples_below_one(results):
  res, out = get(results, "iw_samples_zero")
  H.assert_user_error(res, "iw_samples", "0")
  no_results(out)


def test_k_not_below_number_of_layers(results):
  res, out = get(results, "k_out_of_range")
  H.assert_user_error(res, "k = 3", "0..2")
  no_results(out)


def test_unwritable_output_dir(results):
  res, out = get(results, "unwritable_output_dir")
  H.assert_user_error(res, "not writable", "--output_dir")


def test_eval_bad_flag_value(results):
  res, out = get(results, "eval_bad_flag_value")
  H.assert_user_error(res, "--iw_samples", "'many'")
  no_results(out)
