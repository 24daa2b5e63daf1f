"""evaluate.py end to end on a tiny checkpoint trained here, against real offline MNIST; scores vs independent
model passes; bounded memory of S = 1000 importance sampling; one-line user errors."""

import json
import math
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers as H
from hvaeood import bounds
from hvaeood import devices
from hvaeood import loading
from hvaeood import scoring
from hvaeood import state as state_lib
from hvaeood import train

REPO = pathlib.Path(__file__).resolve().parents[1]
N = 150  # examples per dataset in the end-to-end run: the second batch of 100 is half padding
BATCH = 100
SCORES = ["ELBO", "L>0", "L>1", "L>2", "LLR>1", "LLR>2", "typicality", "input_complexity", "DoSE", "fisher"]
FIT = 100  # --fit_examples of the end-to-end run (under N: --max_examples caps it too)
# Native (C++) and absl-formatted log lines that TensorFlow/XLA/orbax write to stderr on their own.
_LOG_LINE = re.compile(r"^([IWEF]\d{4} \d\d:\d\d:\d\d|WARNING: All log messages before absl::InitializeLog)")


def _env(**extra):
  return H.subprocess_env(**extra)


def run_cli(*args, timeout=900, **env):
  return subprocess.run([sys.executable, str(REPO / "evaluate.py"), *map(str, args)], cwd=REPO, env=_env(**env),
                        capture_output=True, text=True, timeout=timeout, check=False)


def user_lines(stderr: str) -> list[str]:
  return [l for l in stderr.splitlines() if l.strip() and not _LOG_LINE.match(l)]


@pytest.fixture(scope="module")
def workdir(tfds_data_dir, tmp_path_factory):
  """A tiny FashionMNIST model trained for a few steps with the real training function."""
  from configs import fashion_mnist_hvae  # pylint: disable=import-outside-toplevel
  config = fashion_mnist_hvae.get_config("tiny")
  config.data.data_dir = tfds_data_dir
  config.train.num_steps = 4
  config.train.eval_every_steps = 4
  config.checkpoint.every_steps = 4
  config.eval.ood_datasets = ()
  config.eval.max_examples = 50
  config.optim.ema_decay = 0.5  # an EMA far from the raw parameters after 4 steps
  path = tmp_path_factory.mktemp("tiny_run")
  train.train_and_evaluate(config, str(path))
  return str(path)


@pytest.fixture(scope="module")
def cli_run(workdir, tmp_path_factory):
  """The CLI on that checkpoint vs real MNIST (data_dir from the checkpoint's config)."""
  out = tmp_path_factory.mktemp("eval_out")
  proc = run_cli("--checkpoint", workdir, "--ood", "mnist", "--output_dir", out, "--max_examples", N,
                 "--batch_size", BATCH, "--fit_examples", FIT)
  assert proc.returncode == 0, proc.stderr[-5000:]
  return out, proc


def _markdown_rows(md: str) -> tuple[list[str], dict[str, list[str]]]:
  lines = [l for l in md.splitlines() if l.startswith("| ")]
  header = [c.strip() for c in lines[0].strip("|").split("|")]
  rows = {}
  for l in lines[1:]:
    cells = [c.strip() for c in l.strip("|").split("|")]
    if not set(cells[0]) <= set("-:"):  # not the alignment row
      rows[cells[0]] = cells[1:]
  return header, rows


def test_cli_writes_complete_consistent_outputs(cli_run, workdir):
  out, proc = cli_run
  for name in ("results.json", "results.md", "scores.npz", "roc.png", "hist.png"):
    assert (out / name).stat().st_size > 0, name
  assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
  for png in ("roc.png", "hist.png"):
    assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  r = json.loads((out / "results.json").read_text())
  for key in ("checkpoint", "step", "in_distribution", "iw_samples", "iw_samples_k", "n_examples", "ood",
              "bits_per_dim", "elbo", "wall_seconds", "images_per_sec"):
    assert key in r, key
  # By default the workdir's best checkpoint, its EMA parameters, highest precision, the reference's L>k.
  assert r["checkpoint"] == os.path.join(workdir, "best", "4") and r["step"] == 4 and r["which"] == "best"
  assert r["parameters"] == "EMA" and r["precision"] == "highest" and r["prior_sample"] is False
  assert f"Evaluating {os.path.join(workdir, 'best', '4')} (step 4, best, EMA parameters)" in proc.stdout
  assert r["in_distribution"] == "fashion_mnist" and r["iw_samples"] == 1 and r["iw_samples_k"] == 1
  assert r["n_examples"] == N
  assert list(r["ood"]) == ["mnist", "fashion_mnist (sanity)"]
  for ood_name, per_score in r["ood"].items():
    assert list(per_score) == SCORES, ood_name
    for score, m in per_score.items():
      assert set(m) == {"auroc", "auprc", "fpr80"}
      assert all(0.0 <= v <= 1.0 for v in m.values()), (ood_name, score, m)
  assert set(r["bits_per_dim"]) == set(r["elbo"]) == {"fashion_mnist", "mnist"}
  for name, elbo in r["elbo"].items():
    assert elbo < 0
    assert r["bits_per_dim"][name] == pytest.approx(-elbo / (784 * math.log(2)), rel=1e-5)
  assert r["wall_seconds"] > 0 and r["images_per_sec"] > 0

  scores = np.load(out / "scores.npz")
  for ds in ("fashion_mnist", "fashion_mnist (sanity)", "mnist"):
    for key in ("ELBO", "L>0", "L>1", "L>2", "LLR>0", "LLR>1", "LLR>2", "log_px"):
      assert scores[f"{ds}/{key}"].shape == (N,), (ds, key)
      assert np.all(np.isfinite(scores[f"{ds}/{key}"]))
    assert scores[f"{ds}/kl"].shape == (N, 3)
    np.testing.assert_allclose(scores[f"{ds}/LLR>2"], scores[f"{ds}/ELBO"] - scores[f"{ds}/L>2"], rtol=1e-6)
    if ds in r["elbo"]:
      assert np.mean(scores[f"{ds}/ELBO"]) == pytest.approx(r["elbo"][ds], rel=1e-5)
  # The metric really is computed on the stored scores with the documented orientation.
  from hvaeood import ood_metrics  # pylint: disable=import-outside-toplevel
  s_in, s_ood = scores["fashion_mnist/LLR>1"], scores["mnist/LLR>1"]
  labels = np.r_[np.zeros(N), np.ones(N)]
  assert r["ood"]["mnist"]["LLR>1"]["auroc"] == pytest.approx(ood_metrics.auroc(labels, np.r_[s_in, s_ood]))
  assert r["ood"]["mnist"]["L>1"]["auroc"] == pytest.approx(
      ood_metrics.auroc(labels, -np.r_[scores["fashion_mnist/L>1"], scores["mnist/L>1"]]))

  md = (out / "results.md").read_text()
  header, rows = _markdown_rows(md)
  assert header[0] == "Score" and list(rows) == SCORES
  for i, col in enumerate(header[1:]):
    ood_name, metric = col.rsplit(" ", 1)
    for score, cells in rows.items():
      assert float(cells[i]) == pytest.approx(round(r["ood"][ood_name][score][metric.lower()], 3), abs=1e-9)
  assert "Bits/dim" in md
  assert "EMA parameters" in md and "parameters EMA" in md and "precision highest" in md
  assert "L>k conditional-prior mean (reference)" in md
  # stdout: the table and the throughput.
  assert "| LLR>1 |" in proc.stdout and "images/s" in proc.stdout


def _jit_apply(model, prior_sample=False):
  return jax.jit(lambda p, x, skips, key: bounds.apply_model(model, p, x, skips, key, prior_sample))


def assert_scores_are_independent_passes(scores, params, model, passes, *, batch, n, data_dir, prior_sample=False):
  """Every stored score of each pass equals an independent model pass with the documented keys and row layout.

  With S = S_k = 1 and ks = (0, 1, 2), `compute_bounds` evaluates the rows [0 (ELBO), 1, 2] (skip counts) of
  each (padded) batch in one chunk with key fold_in(batch key, chunk 0); batch i of pass `name` has key
  fold_in(pass_key(seed 0, name), i). So for every example: ELBO = L>0 = row 0's single-sample bound, L>k = row
  k's, LLR>k = their difference, log_px and kl = row 0's terms.

  Args:
    passes: (pass name, dataset, split, data seed) of each pass to check.
  """
  from hvaeood import input_pipeline  # pylint: disable=import-outside-toplevel
  apply = _jit_apply(model, prior_sample)
  for name, dataset, split, data_seed in passes:
    it, got_n = input_pipeline.create_eval_dataset(dataset, split, preprocessing="binarize", batch_size=batch,
                                                   seed=data_seed, max_examples=n, data_dir=data_dir)
    assert got_n == n
    assert_batches_match(lambda key, name=name: scores[f"{name}/{key}"], it, apply, params, name, batch=batch, n=n)


def assert_batches_match(stored, it, apply, params, name, *, batch, n):
  """The stored scores (`stored(key)`) of a pass named `name` over the batches of `it` equal independent model
  passes (see `assert_scores_are_independent_passes`)."""
  skips = jnp.array([0, 1, 2], jnp.int32)
  for i, b in enumerate(it):
    key = jax.random.fold_in(jax.random.fold_in(scoring.pass_key(0, name), i), 0)
    o = jax.device_get(apply(params, jnp.asarray(b["image"]), skips, key))
    real = b["mask"]
    assert real.sum() == min(batch, n - i * batch)
    rows = slice(i * batch, i * batch + int(real.sum()))
    close = lambda a, c: np.testing.assert_allclose(a, c[..., real], rtol=2e-5, atol=1e-2)
    close(stored("ELBO")[rows], o.elbo[0])
    np.testing.assert_array_equal(stored("L>0")[rows], stored("ELBO")[rows])
    for k in range(3):
      close(stored(f"L>{k}")[rows], o.elbo[k])
      # A difference of two float32 bounds: its error scales with the operands, not with the result.
      llr = stored(f"LLR>{k}")[rows]
      tol = 2e-5 * (np.abs(o.elbo[0]) + np.abs(o.elbo[k]))[real] + 1e-2
      assert np.all(np.abs(llr - (o.elbo[0] - o.elbo[k])[real]) <= tol), (name, k)
    close(stored("log_px")[rows], o.log_px[0])
    # The single-sample KL of a model trained 4 steps is heavy-tailed (one example's z1 KL was 3.8e9 nats), and
    # it amplifies the float32 rounding by which the evaluation's sharded convolutions (8 devices, 3 rows each)
    # differ from this 1-device pass: that example's z2 KL, 6,640.90 against 6,640.74, differed by 2.4e-5 of
    # itself. A wrong row, example or key changes a KL by O(1) of itself.
    np.testing.assert_allclose(stored("kl")[rows].T, np.stack([kl[0] for kl in o.kl])[..., real], rtol=1e-4,
                               atol=1e-2)


def test_all_k_scores_equal_separately_computed_passes(cli_run, workdir, tfds_data_dir):
  """Every stored score equals an independent model pass of the checkpoint's EMA parameters (the default) with
  the documented keys and row layout (`assert_scores_are_independent_passes`): this checks the evaluation's
  batching, padding/masking, gathering, ordering and key schedule, not just that it runs."""
  out, _ = cli_run
  scores = np.load(out / "scores.npz")
  loaded = loading.load_for_eval(workdir)
  assert loaded.parameters == "EMA"
  model = state_lib.model_for_config(loaded.config)
  assert_scores_are_independent_passes(
      scores, loaded.params, model, [("fashion_mnist", "fashion_mnist", "test", 0),
                                     ("fashion_mnist (sanity)", "fashion_mnist", "test", 1),
                                     ("mnist", "mnist", "test", 0)], batch=BATCH, n=N, data_dir=tfds_data_dir)
  # The sanity pass is a genuinely different draw of the same examples.
  assert not np.allclose(scores["fashion_mnist/ELBO"], scores["fashion_mnist (sanity)/ELBO"])


def test_raw_parameters_prior_samples_train_reference_and_latest(workdir, tfds_data_dir, tmp_path):
  """--no_ema --prior_sample --train_reference --which latest: results name the raw parameters, the latest
  checkpoint and the paper's L>k; every score is an independent pass of the raw parameters with z_{<=k} sampled
  from the conditional prior; the in-distribution train split is scored as a reference row."""
  n, batch = 20, 10
  proc = run_cli("--checkpoint", workdir, "--ood", "mnist", "--output_dir", tmp_path, "--max_examples", n,
                 "--batch_size", batch, "--no_ema", "--prior_sample", "--train_reference", "--which", "latest")
  assert proc.returncode == 0, proc.stderr[-5000:]
  r = json.loads((tmp_path / "results.json").read_text())
  assert r["checkpoint"] == os.path.join(workdir, "checkpoints", "4") and r["which"] == "latest"
  assert r["parameters"] == "raw" and r["prior_sample"] is True
  assert r["lk_mode"] == "conditional-prior sample (paper)"
  assert list(r["ood"]) == ["mnist", "fashion_mnist (sanity)", "fashion_mnist (train split)"]
  assert r["n_examples_by_dataset"]["fashion_mnist (train split)"] == n
  md = (tmp_path / "results.md").read_text()
  assert "raw parameters" in md and "conditional-prior sample (paper)" in md
  assert "fashion_mnist (train split) AUROC" in md
  scores = np.load(tmp_path / "scores.npz")
  loaded = loading.load_for_eval(workdir, which="latest", use_ema=False)
  assert loaded.parameters == "raw"
  model = state_lib.model_for_config(loaded.config)
  assert_scores_are_independent_passes(
      scores, loaded.params, model, [("fashion_mnist", "fashion_mnist", "test", 0),
                                     ("fashion_mnist (train split)", "fashion_mnist", "train", 0)],
      batch=batch, n=n, data_dir=tfds_data_dir, prior_sample=True)
  # The EMA differs from the raw parameters, so the two runs' parameters are really different ones.
  ema = loading.load_for_eval(workdir, which="latest").params
  assert max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(jax.tree_util.tree_leaves(ema), jax.tree_util.tree_leaves(loaded.params))) > 1e-4


def _precisions(text: str) -> list[str]:
  """The precision of every convolution and dot in a lowered (StableHLO) program."""
  ops = [l for l in text.splitlines() if "stablehlo.convolution" in l or "stablehlo.dot_general" in l]
  assert ops
  return [re.findall(r"precision (?:= \[)?(\w+)", l) or ["DEFAULT"] for l in ops]


@pytest.mark.parametrize("precision", ["highest", "default"])
def test_lowered_evaluation_and_training_carry_the_precision(workdir, precision):
  """The evaluation's bounds and the training step ask XLA for the configured precision in the program itself,
  so a backend's default (bfloat16 passes on TPU, TF32 on GPU) cannot change the likelihoods."""
  loaded = loading.load_for_eval(workdir)
  model = state_lib.model_for_config(loaded.config)
  mesh = devices.make_mesh()
  x = jax.ShapeDtypeStruct((4, 28, 28, 1), jnp.float32)
  fn = scoring.make_bounds_fn(model, mesh, iw_samples=2, iw_samples_k=1, ks=(0, 1, 2), max_rows=None,
                         precision=precision)
  found = _precisions(fn.lower(loaded.params, x, jax.random.PRNGKey(0)).as_text())
  want = "HIGHEST" if precision == "highest" else "DEFAULT"
  assert all(set(p) == {want} for p in found), found[:5]
  config = loaded.config
  config.train.precision = precision
  step = jax.jit(state_lib.make_train_step(config, model, 100))
  found = _precisions(step.lower(state_lib.abstract_train_state(config), x).as_text())
  assert len(found) > 20 and all(set(p) == {want} for p in found), found[:5]


def test_eight_devices_score_a_set_smaller_than_one_batch(workdir, tfds_data_dir, tmp_path):
  """A batch of 20 on 8 devices, 5 examples per set: the batch is padded to 24 rows (a multiple of 8), the padding
  masked, and the 5 scores of each pass are those of an independent pass over the padded batch. (The default
  batch, 500, pads to 504 by the same rule, `test_padded_batch_size_is_the_least_multiple_of_devices_and_processes`;
  scoring 504 rows for 5 examples took this test three times the CPU.)"""
  n, batch = 5, 20
  proc = run_cli("--checkpoint", workdir, "--ood", "mnist", "--output_dir", tmp_path, "--max_examples", n,
                 "--batch_size", batch, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  assert proc.returncode == 0, proc.stderr[-5000:]
  r = json.loads((tmp_path / "results.json").read_text())
  assert r["devices"] == 8 and r["batch_size"] == batch and r["padded_batch_size"] == 24
  assert r["n_examples_by_dataset"] == {"fashion_mnist": n, "fashion_mnist (sanity)": n, "mnist": n,
                                        "fashion_mnist (fit)": n}  # the fit pass, capped by --max_examples
  loaded = loading.load_for_eval(workdir)
  assert_scores_are_independent_passes(
      np.load(tmp_path / "scores.npz"), loaded.params, state_lib.model_for_config(loaded.config),
      [("fashion_mnist", "fashion_mnist", "test", 0), ("mnist", "mnist", "test", 0)], batch=24, n=n,
      data_dir=tfds_data_dir)


class _FakeMesh:
  """What `devices.padded_batch_size` reads of a mesh: its device array."""

  def __init__(self, n):
    self.devices = np.empty((n,), object)


@pytest.mark.parametrize("processes", [1, 2, 3])
def test_padded_batch_size_is_the_least_multiple_of_devices_and_processes(processes, monkeypatch):
  """Every batch on every device count pads to the least size >= the batch that both the devices and the processes
  divide (found here by search), e.g. the default evaluation batch 500 to 504 on 8 devices."""
  monkeypatch.setattr(jax, "process_count", lambda: processes)
  for n_dev in (1, 2, 3, 4, 6, 8, 12):
    for b in list(range(1, 40)) + [128, 500, 1000]:
      want = next(p for p in range(b, b + n_dev * processes + 1) if p % n_dev == 0 and p % processes == 0)
      assert devices.padded_batch_size(b, _FakeMesh(n_dev)) == want, (b, n_dev, processes)
  assert devices.padded_batch_size(500, _FakeMesh(8)) == 504  # 63 x 8 = 21 x 24


def test_chunked_importance_weighting_follows_the_documented_row_layout(workdir, tfds_data_dir):
  """S = 2, ks = (0, 1, 2), 8 examples, max_rows = 16: two replicas per chunk. The rows [0, 0 | 0, 1 | 2, pad]
  (skip counts) are evaluated in chunks c = 0, 1, 2 with key fold_in(key, c); the IW ELBO is the log-mean-exp
  of chunk 0's two rows, log_px/kl their mean, and L>k the single rows that follow."""
  from hvaeood import input_pipeline  # pylint: disable=import-outside-toplevel
  loaded = loading.load_for_eval(workdir)
  model, params = state_lib.model_for_config(loaded.config), loaded.params
  it, _ = input_pipeline.create_eval_dataset("fashion_mnist", "test", preprocessing="binarize", batch_size=8,
                                             seed=3, max_examples=8, data_dir=tfds_data_dir)
  x = jnp.asarray(next(iter(it))["image"])
  fn = scoring.make_bounds_fn(model, devices.make_mesh(), iw_samples=2, iw_samples_k=1, ks=(0, 1, 2), max_rows=16)
  key = jax.random.PRNGKey(7)
  got = jax.device_get(fn(params, x, np.asarray(key)))
  apply = _jit_apply(model)
  c = [jax.device_get(apply(params, x, jnp.array(s, jnp.int32), jax.random.fold_in(key, i)))
       for i, s in enumerate(([0, 0], [0, 1], [2, 0]))]
  e = c[0].elbo.astype(np.float64)
  iw = np.max(e, 0) + np.log(np.mean(np.exp(e - np.max(e, 0)), 0))
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-2)
  close(got.elbo, iw)
  close(got.log_px, c[0].log_px.mean(0))
  close(got.kl, np.stack([kl.mean(0) for kl in c[0].kl]))
  close(got.lk, np.stack([c[1].elbo[0], c[1].elbo[1], c[2].elbo[0]]))
  close(got.llr, got.elbo[None] - got.lk)


def test_multi_process_outputs_are_reassembled_in_file_order():
  """Two processes, 5 and 4 real examples of a 9-example split, local batch 3 (so 2 batches each, padded), and
  devices interleaved between processes in the global batch: the scores come back in file order, padding
  dropped."""
  n, local_batch, n_proc, nb = 9, 3, 2, 2
  starts = [0, 5, 9]
  masks = np.zeros((n_proc, nb, local_batch), bool)
  local = np.full((n_proc, nb, local_batch), -1.0)  # value = file index of the example, -1 = padding
  for p in range(n_proc):
    idx = np.arange(starts[p], starts[p + 1])
    masks[p].reshape(-1)[:len(idx)] = True
    local[p].reshape(-1)[:len(idx)] = idx
  owner = np.array([0, 1, 1, 0, 0, 1])  # rows of a global batch of 6 (2 devices per process, interleaved)
  batches = np.zeros((nb, 2, n_proc * local_batch))  # a leading axis, like lk [K, B]
  for b in range(nb):
    for p in range(n_proc):
      batches[b, :, owner == p] = local[p, b][:, None]
  batches[:, 1] += 100.0
  got = scoring.to_file_order(batches, owner, masks)
  np.testing.assert_array_equal(got, np.stack([np.arange(n), np.arange(n) + 100.0]))


def test_iw_1000_samples_run_in_bounded_memory(workdir):
  """S = 1000 on 8 examples with max_rows = 256 (32 replicas per chunk). Memory is O(max_rows), not O(S): the
  peak RSS may grow only a little from S = 10 to S = 1000 (evaluating all 8024 rows at once adds ~1 GB here).
  The IW ELBO is >= the mean of its own single-sample ELBOs (Jensen, per example) and, on average, >= the
  single-sample ELBO estimated from a separate run's samples (S = 10). The model is the trained tiny checkpoint."""
  proc = subprocess.run([sys.executable, str(H.PROGRAMS / "iw_memory.py"), "256", workdir], cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-5000:]
  res = {int(k): v for k, v in json.loads(proc.stdout.split("RESULT ")[-1]).items()}
  grow = res[1000]["peak_mb"] - res[10]["peak_mb"]
  assert grow < 250, f"peak RSS grew by {grow:.0f} MB from S=10 to S=1000 ({res[1000]['peak_mb']:.0f} MB)"
  iw, single = np.array(res[1000]["elbo"]), np.array(res[1000]["mean_single"])
  assert np.all(np.isfinite(iw))
  assert np.all(iw >= single - 1e-3 * np.abs(single))
  assert iw.mean() >= np.mean(res[10]["mean_single"])


@pytest.fixture(scope="module")
def not_a_dir(tmp_path_factory):
  f = tmp_path_factory.mktemp("blocker") / "a_file"
  f.write_text("x")
  return f


@pytest.mark.parametrize("case", ["missing_checkpoint", "zero_samples", "k_too_large", "unknown_ood",
                                  "ood_shape_mismatch", "bad_precision", "bad_which", "train_reference_on_train",
                                  "unwritable_output"])
def test_cli_user_errors_exit_2_with_one_line(case, workdir, tmp_path, not_a_dir):
  out = tmp_path / "out"
  args = {"--checkpoint": workdir, "--ood": "mnist", "--output_dir": out, "--max_examples": 20,
          "--batch_size": 10}
  env, expect, extra = {}, None, []
  if case == "missing_checkpoint":
    args["--checkpoint"] = tmp_path / "no_such_run"
    expect = "does not exist"
  elif case == "zero_samples":
    args["--iw_samples"] = 0
    expect = "--iw_samples"
  elif case == "k_too_large":
    args["--k"] = "1,3"
    expect = "k = 3 is out of range"
  elif case == "unknown_ood":
    args["--ood"] = "mnist,not_a_dataset"
    expect = "not_a_dataset"
  elif case == "ood_shape_mismatch":
    args["--ood"] = "cifar10"
    expect = "(32, 32, 3)"
  elif case == "bad_precision":
    args["--precision"] = "fp8"
    expect = "--precision='fp8' is not a precision"
  elif case == "bad_which":
    args["--which"] = "newest"
    expect = "--which must be 'best' or 'latest'"
  elif case == "train_reference_on_train":
    extra.append("--train_reference")
    args["--split"] = "train"
    expect = "--train_reference scores the train split"
  elif case == "unwritable_output":
    args["--output_dir"] = out = not_a_dir / "out"
    expect = "not writable"
  proc = run_cli(*[str(a) for kv in args.items() for a in kv], *extra, **env)
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  lines = user_lines(proc.stderr)
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
  assert expect in lines[0]
  if case == "ood_shape_mismatch":
    assert "(28, 28, 1)" in lines[0] and "Fix" in lines[0]
  assert "Traceback" not in proc.stderr
  assert not (pathlib.Path(out) / "results.json").exists()


# ---------------------------------------------------------------------------------------------------------------
# Issue 13: the score suite, OOD sets from folders / arrays / tfds:, the embeddable detector


def test_suite_scores_are_fitted_on_the_train_split_and_follow_their_formulas(cli_run):
  """The fitted scores come from the fit pass (the first FIT train examples, stored as "<in> (fit)"), not from the
  evaluated test split; input_complexity is (-ELBO/ln 2 - png_bits)/D of each pass's own stored values."""
  from hvaeood import ood_scores  # pylint: disable=import-outside-toplevel
  out, _ = cli_run
  r = json.loads((out / "results.json").read_text())
  assert r["fit_examples"] == FIT and r["n_examples_by_dataset"]["fashion_mnist (fit)"] == FIT
  assert "fashion_mnist (fit)" not in r["ood"] and r["scores"] == SCORES
  assert set(r["suite_seconds"]) == {"fit", "typicality", "input_complexity", "DoSE", "fisher"}
  z = np.load(out / "scores.npz")
  raw = lambda name: {k.split("/", 1)[1]: z[k] for k in z.files if k.split("/", 1)[0] == name}
  fit = ood_scores.fit(raw("fashion_mnist (fit)"), (1, 2))  # L>0 is the ELBO: not a statistic
  fit_elbo = z["fashion_mnist (fit)/ELBO"].astype(np.float64)
  for ds in ("fashion_mnist", "fashion_mnist (sanity)", "mnist"):
    elbo, png = z[f"{ds}/ELBO"].astype(np.float64), z[f"{ds}/png_bits"]
    assert png.shape == (N,) and np.all(png > 0)
    np.testing.assert_allclose(z[f"{ds}/input_complexity"], (-elbo / math.log(2) - png) / 784, rtol=1e-6)
    np.testing.assert_allclose(z[f"{ds}/typicality"], np.abs(elbo - fit_elbo.mean()), rtol=1e-6)
    np.testing.assert_allclose(z[f"{ds}/DoSE"], ood_scores.dose(fit, raw(ds)), rtol=1e-9)
    np.testing.assert_allclose(z[f"{ds}/fisher"], ood_scores.fisher(fit, raw(ds)), rtol=1e-9)
  labels = np.r_[np.zeros(N), np.ones(N)]
  from hvaeood import ood_metrics  # pylint: disable=import-outside-toplevel
  assert r["ood"]["mnist"]["DoSE"]["auroc"] == pytest.approx(
      ood_metrics.auroc(labels, np.r_[z["fashion_mnist/DoSE"], z["mnist/DoSE"]]))


def _mnist_uint8(data_dir, n):
  from hvaeood import image_sources  # pylint: disable=import-outside-toplevel
  return image_sources.load("tfds:mnist:test", (28, 28, 1), max_examples=n, data_dir=data_dir)


def test_mnist_as_a_folder_of_pngs_gives_the_registry_scores(cli_run, workdir, tfds_data_dir, tmp_path):
  """MNIST's first N test images (read through tfds:mnist:test) as a folder of PNGs named mnist are the same
  examples with the same noise and latent keys as the registry set: every stored score equals the registry run's."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from hvaeood import evaluate  # pylint: disable=import-outside-toplevel
  folder = tmp_path / "pngs" / "mnist"
  folder.mkdir(parents=True)
  for i, im in enumerate(_mnist_uint8(tfds_data_dir, N)):
    Image.fromarray(im[..., 0]).save(folder / f"{i:04d}.png")
  r = evaluate.evaluate(workdir, str(tmp_path / "out"), ood=[str(folder)], max_examples=N, batch_size=BATCH,
                        fit_examples=FIT)
  assert list(r["ood"]) == ["mnist", "fashion_mnist (sanity)"]
  got, want = np.load(tmp_path / "out" / "scores.npz"), np.load(cli_run[0] / "scores.npz")
  assert sorted(got.files) == sorted(want.files)
  for key in want.files:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def _write_bad_input(tmp_path: pathlib.Path, case: str) -> str:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  path = tmp_path / case
  if case == "empty_folder":
    path.mkdir()
  elif case in ("corrupt_image", "mixed_sizes"):
    path.mkdir()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(path / "a.png")
    if case == "corrupt_image":
      (path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    else:
      Image.fromarray(np.zeros((30, 28), np.uint8)).save(path / "b.png")
  elif case == "five_channels":
    path = tmp_path / "five.npy"
    np.save(path, np.zeros((3, 28, 28, 5), np.uint8))
  elif case == "npz_unnamed":
    path = tmp_path / "two.npz"
    np.savez(path, a=np.zeros((3, 28, 28), np.uint8), b=np.zeros((3, 28, 28), np.uint8))
  elif case == "not_uint8":
    path = tmp_path / "floats.npy"
    np.save(path, np.zeros((3, 28, 28), np.float32))
  return str(path)


BAD_INPUTS = {"empty_folder": "no .png/.jpg/.jpeg images", "corrupt_image": "b.png: cannot read the image",
              "mixed_sizes": "different sizes", "five_channels": "5 channels", "npz_unnamed": "none is named",
              "not_uint8": "dtype float32"}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_ood_inputs_fail_in_one_line_before_any_output(case, workdir, tmp_path):
  from hvaeood import evaluate  # pylint: disable=import-outside-toplevel
  from hvaeood.errors import DataSourceError  # pylint: disable=import-outside-toplevel
  spec, out = _write_bad_input(tmp_path, case), tmp_path / "out"
  with pytest.raises(DataSourceError) as e:
    evaluate.evaluate(workdir, str(out), ood=["mnist", spec], max_examples=10, batch_size=10, fit_examples=10)
  message = str(e.value)
  assert BAD_INPUTS[case] in message and "\n" not in message
  assert spec.split(":")[0] in message or os.path.basename(spec) in message, message
  assert not (out / "results.json").exists() and not (out / "scores.npz").exists()


def test_detector_scores_equal_independent_passes_and_pad_the_last_batch(workdir, tfds_data_dir):
  """OODDetector.statistics: the documented preprocessing noise and latent keys (pass NOISE_NAME), batches of 7
  with the last one padded: scoring 10 or 12 images gives the same first 10 scores."""
  from hvaeood import OODDetector, detector, input_pipeline  # pylint: disable=import-outside-toplevel
  det = OODDetector.from_checkpoint(workdir, batch_size=7)
  images = _mnist_uint8(tfds_data_dir, 12)
  raw10, raw12 = det.statistics(images[:10]), det.statistics(images[:12])
  for k in raw10:
    np.testing.assert_array_equal(raw10[k], raw12[k][:10], err_msg=k)
  it, n = input_pipeline.create_eval_dataset_from_array(images, detector.NOISE_NAME, "any", preprocessing="binarize",
                                                        batch_size=7, seed=0)
  assert n == 12
  apply = _jit_apply(det.model)
  assert_batches_match(lambda key: raw12[key], it, apply, det.loaded.params, detector.NOISE_NAME, batch=7, n=12)
  s = det.score(images[:10])
  assert list(s) == det.score_names == ["ELBO", "L>0", "L>1", "L>2", "LLR>1", "LLR>2", "input_complexity"]
  np.testing.assert_array_equal(s["ELBO"], -raw10["ELBO"].astype(np.float64))
  np.testing.assert_array_equal(s["LLR>1"], raw10["LLR>1"].astype(np.float64))


def test_detector_fit_thresholds_flags_and_save_load(workdir, tfds_data_dir, tmp_path):
  """fit: the fitted scores of the fit data; threshold(score, keep) is its ceil(keep n)-th smallest score; is_ood
  flags exactly the inputs above it; save/load restores the same scores and thresholds; errors are one line."""
  from hvaeood import OODDetector  # pylint: disable=import-outside-toplevel
  det = OODDetector.from_checkpoint(workdir, batch_size=20)
  with pytest.raises(ValueError, match="not fitted"):
    det.is_ood(np.zeros((2, 28, 28), np.uint8))
  from hvaeood import ood_scores  # pylint: disable=import-outside-toplevel
  fit_images = _mnist_uint8(tfds_data_dir, 40)
  det.fit(fit_images)
  assert det.score_names == SCORES
  fitted = det.score(fit_images)
  raw = det.statistics(fit_images)  # the fit data, scored as new data: DoSE and fisher leave each example out
  fitted["DoSE"] = ood_scores.dose(det.fit_state, raw, leave_one_out=True)
  fitted["fisher"] = ood_scores.fisher(det.fit_state, raw, leave_one_out=True)
  for score in ("LLR>1", "DoSE", "fisher"):
    for keep in (0.5, 0.9, 0.95, 1.0):
      assert det.threshold(score, keep) == np.sort(fitted[score])[math.ceil(keep * 40) - 1]
  new = det.score(fit_images)  # scored as new inputs (DoSE and fisher not left out)
  for score, keep in (("LLR>1", 0.9), ("DoSE", 0.95), ("fisher", 0.5)):
    flags = det.is_ood(fit_images, score, keep)
    np.testing.assert_array_equal(flags, new[score] > det.threshold(score, keep))
    if score == "LLR>1":
      assert flags.sum() <= 40 - math.ceil(keep * 40)
  path = det.save(str(tmp_path / "det"))
  again = OODDetector.load(path)
  other = _mnist_uint8(tfds_data_dir, 60)[40:]
  a, b = det.score(other), again.score(other)
  assert list(a) == list(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert again.threshold("DoSE", 0.9) == det.threshold("DoSE", 0.9)
  for bad, match in (({"score": "nope"}, "Unknown score 'nope'"), ({"keep": 0.0}, "keep must be in")):
    with pytest.raises(ValueError, match=match):
      det.is_ood(other, **bad)
  (tmp_path / "garbage.npz").write_bytes(b"not a zip")
  with pytest.raises(ValueError, match="not a detector file"):
    OODDetector.load(str(tmp_path / "garbage.npz"))
