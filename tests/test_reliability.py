"""Reliability (issue 7): a run survives kill -9 and SIGTERM, corrupted checkpoints, non-finite updates and a
second trainer on its workdir, and is deterministic.

Every training run here is the real `train.py` in a subprocess (tiny config, 128 training examples, a checkpoint
every step; see helpers). The slow parts run as three background chains that start when the module
does, so that their subprocesses overlap (the kill and SIGTERM chains once the reference run has compiled the
programs they all share, `_wait_for_compiled_programs`):

* reference: an uninterrupted N-step run (shared with test_cli_errors), then a resume from a copy with a
  truncated latest checkpoint, then evaluate.py twice;
* kill: kill -9 at several moments (during startup, between steps, during a checkpoint write), restarting each
  time, then run to completion;
* sigterm: two trainers started together on one workdir (one must refuse), SIGTERM to the one that runs, resume;
  then a run fed NaN images (skipped updates, then a stop after K consecutive skips).

The tests compare those runs' checkpoints with the reference bitwise. Kill points are random; the seed is
HVAEOOD_KILL_SEED (default 0) and the number of kills HVAEOOD_KILLS (default 4).
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import math
import os
import pathlib
import random
import re
import resource
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import helpers as H
from hvaeood import checkpoints as ckpt
from hvaeood import loading
from hvaeood import workdir_lock

N = H.N_STEPS
TIMEOUT = 900  # per chain wait; the runs take seconds to a minute each on a loaded 2-core machine


# ---------------------------------------------------------------------------------------------------------------
# Background chains


def _resumed_from(log: str):
  m = re.findall(r"Resumed from step (\d+)", log)
  return int(m[-1]) if m else None


KILL_KINDS = ("startup", "after-commit", "checkpoint-write", "random")


def _kill_chain(cfg: str, wd: pathlib.Path, logs: pathlib.Path, seed: int, kills: int) -> dict:
  """kill -9 at `kills` moments, restarting after each; then a run to completion.

  The moments: during startup (a random delay of 0.5-3 s, before any checkpoint); right after a checkpoint is
  committed (the manifest write, the pruning of the oldest checkpoint or the next step); while a checkpoint is
  being written (as soon as orbax's temporary directory appears); a random delay of 0-1 s after a checkpoint.
  More kills cycle through the last three.
  """
  rng = random.Random(seed)
  kinds = [KILL_KINDS[i] if i < len(KILL_KINDS) else KILL_KINDS[1 + (i - 1) % 3] for i in range(kills)]
  records, launches = [], []
  for i, kind in enumerate(kinds):
    before = H.checkpoint_steps(wd)
    if before and before[-1] >= N - 2:
      break  # no room left for another kill before the run ends
    run = H.launch_train(cfg, wd, logs / f"kill_{i}.log")
    launches.append(run)
    rec = {"kind": kind, "pid": run.pid, "before": before[-1] if before else None}
    if kind == "startup":
      delay = rng.uniform(0.5, 3.0)
      time.sleep(delay)
      rec["delay_s"] = round(delay, 3)
    else:
      start = before[-1] if before else 0
      if kind == "checkpoint-write":
        H.wait_for(lambda: [t for t in H.tmp_checkpoint_dirs(wd) if int(t.split(".")[0]) > start], TIMEOUT,
                   "a checkpoint write in progress", proc=run, interval=0.002)
      else:
        H.wait_for(lambda: (H.checkpoint_steps(wd) or [0])[-1] > start, TIMEOUT,
                   "the restarted run to commit a checkpoint", proc=run, interval=0.002)
        if kind == "random":
          delay = rng.uniform(0.0, 1.0)
          time.sleep(delay)
          rec["delay_s"] = round(delay, 3)
    if run.poll() is not None:
      rec["finished_before_kill"] = run.poll()
    run.signal(signal.SIGKILL)
    rc = run.wait(60)
    rec["rc"] = rc
    rec["complete_after"] = H.checkpoint_steps(wd)
    rec["partial_after"] = H.tmp_checkpoint_dirs(wd)
    lock = wd / ".lock"
    rec["lock_after"] = lock.read_text().strip() if lock.exists() else None
    rec["summary_after"] = (wd / "summary.json").exists()
    records.append(rec)
  final = H.launch_train(cfg, wd, logs / "kill_final.log")
  launches.append(final)
  final_rc = final.wait(TIMEOUT)
  # What each restart resumed from.
  for rec, nxt in zip(records, launches[1:]):
    rec["next_log"] = nxt.log()
    rec["resumed_from"] = _resumed_from(rec["next_log"])
  return {"records": records, "final_rc": final_rc, "final_log": final.log(), "workdir": wd}


def _sigterm_chain(cfg: str, wd: pathlib.Path, logs: pathlib.Path) -> dict:
  """Two trainers on one workdir (one refuses), SIGTERM to the other, then resume to N steps."""
  long_run = "--config.train.num_steps=100000"
  a = H.launch_train(cfg, wd, logs / "trainer_a.log", long_run)
  b = H.launch_train(cfg, wd, logs / "trainer_b.log", long_run)
  loser = H.wait_for(lambda: a if a.poll() is not None else (b if b.poll() is not None else None), TIMEOUT,
                     "one of two trainers on the same workdir to exit")
  winner = b if loser is a else a
  out = {"loser_rc": loser.wait(60), "loser_log": loser.log(), "winner_pid": winner.pid, "loser_pid": loser.pid}
  H.wait_for(lambda: (H.checkpoint_steps(wd) or [0])[-1] >= 3, TIMEOUT, "3 checkpoints of the winner",
             proc=winner)
  winner.signal(signal.SIGTERM)
  t0 = time.time()
  out["winner_rc"] = winner.wait(TIMEOUT)
  out["sigterm_exit_s"] = time.time() - t0
  out["winner_log"] = winner.log()
  out["summary"] = json.loads((wd / "summary.json").read_text()) if (wd / "summary.json").exists() else None
  out["steps_after_sigterm"] = H.checkpoint_steps(wd)
  out["losses_after_sigterm"] = H.train_losses(wd)
  resume = H.launch_train(cfg, wd, logs / "resume.log")
  out["resume_rc"] = resume.wait(TIMEOUT)
  out["resume_log"] = resume.log()
  out["workdir"] = wd
  return out


NAN_STEPS = (4, 5)  # two consecutive skipped updates, then training goes on
NAN_FROM = 9  # every update from here on is non-finite: the run must stop after K = 3 of them
MAX_SKIPS = 3

def _nan_run(cfg: str, wd: pathlib.Path, logs: pathlib.Path) -> dict:
  run = H.launch_train(cfg, wd, logs / "nan.log", "--config.train.num_steps=30",
                       f"--config.optim.max_consecutive_skips={MAX_SKIPS}", "--config.checkpoint.keep=100",
                       driver=str(H.PROGRAMS / "nan_train.py"),
                       env_extra={"HVAEOOD_TEST_NAN_STEPS": ",".join(map(str, NAN_STEPS)),
                                  "HVAEOOD_TEST_NAN_FROM": str(NAN_FROM)})
  rc = run.wait(TIMEOUT)
  return {"rc": rc, "log": run.log(), "workdir": wd}


def _corrupt_resume(ref: pathlib.Path, cfg: str, base: pathlib.Path) -> dict:
  """Resume from a copy of the reference whose latest checkpoint has every array file truncated."""
  wd = H.copy_workdir(ref, base / "corrupt_resume")
  files = H.state_data_files(wd, N)
  for f in files:
    H.truncate(f, 0.5)
  run = H.launch_train(cfg, wd, base / "logs" / "corrupt_resume.log")
  rc = run.wait(TIMEOUT)
  return {"rc": rc, "log": run.log(), "workdir": wd, "truncated": len(files)}


def _evaluate_twice(ref: pathlib.Path, base: pathlib.Path) -> dict:
  outs = [base / "eval_1", base / "eval_2"]
  runs = [H.Launched([H.REPO / "evaluate.py", f"--checkpoint={ref}", "--ood=mnist", f"--output_dir={o}",
                      "--max_examples=32", "--batch_size=32", "--iw_samples=2", "--iw_samples_k=2"],
                     base / "logs" / f"{o.name}.log") for o in outs]
  return {"rcs": [r.wait(TIMEOUT) for r in runs], "logs": [r.log() for r in runs], "outs": outs}


CHAINS = ("reference", "kill", "sigterm", "corrupt", "nan", "evaluate")  # start order
NEEDS_REFERENCE = ("corrupt", "evaluate")


def uses(*names):
  """Marks the background chains a test reads, so that a partial run (-k) starts only those."""
  def mark(fn):
    fn.reliability_chains = names
    return fn
  return mark


def _wait_for_compiled_programs(shared: pathlib.Path, reference: concurrent.futures.Future) -> None:
  """Waits until the reference run has committed its first checkpoint, or has ended (or was built earlier).

  Every chain runs the same config, so its processes compile the same init and training-step programs; started
  together, three processes compiled them at once (about 90 s each on the 2-core machine, the suite's largest
  compile cost) where one compile and two persistent-cache reads do. A committed checkpoint means both programs
  were compiled, and so written to the cache, first. The other chains start after it.
  """
  H.wait_for(lambda: reference.done() or H.checkpoint_steps(shared / "reference"), TIMEOUT,
             "the reference run's first checkpoint")


@pytest.fixture(scope="module")
def chains(tfds_data_dir, tmp_path_factory, pytestconfig, request):
  base = tmp_path_factory.mktemp("reliability")
  shared = H.session_shared_dir(tmp_path_factory)
  logs = base / "logs"
  logs.mkdir()
  cfg = H.write_config(base / "config.py", tfds_data_dir)
  seed = int(os.environ.get("HVAEOOD_KILL_SEED", "0"))
  kills = int(os.environ.get("HVAEOOD_KILLS", "4"))
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=3)
  futures = {}

  def submit(name):
    if name not in futures:
      if name in NEEDS_REFERENCE:
        submit("reference")
      makers = {
          "reference": lambda: H.reference_workdir(shared, tfds_data_dir),
          "kill": lambda: _kill_chain(cfg, base / "kill", logs, seed, kills),
          "sigterm": lambda: _sigterm_chain(cfg, base / "sigterm", logs),
          "corrupt": lambda: _corrupt_resume(futures["reference"].result(), cfg, base),
          "nan": lambda: _nan_run(cfg, base / "nan", logs),
          "evaluate": lambda: _evaluate_twice(futures["reference"].result(), base),
      }
      futures[name] = pool.submit(makers[name])
    return futures[name]

  module = sys.modules[__name__]
  wanted = set()
  for item in request.session.items:
    fn = getattr(item, "function", None)
    if getattr(item, "module", None) is module and fn is not None:
      wanted.update(getattr(fn, "reliability_chains", ()))
  t0 = time.time()
  for name in CHAINS:
    if name in wanted:
      submit(name)
      if name == "reference":
        _wait_for_compiled_programs(shared, futures["reference"])
  yield {"submit": submit, "base": base, "cfg": cfg, "seed": seed}
  for fut in futures.values():
    fut.cancel()
  concurrent.futures.wait(list(futures.values()), timeout=TIMEOUT)
  pool.shutdown(wait=False)
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
  capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
  if reporter is not None and capture is not None:
    with capture.global_and_fixture_disabled():
      reporter.write_line(f"\ntest_reliability: subprocesses of this session so far used "
                          f"{usage.ru_utime + usage.ru_stime:.0f} CPU-s; this module took {time.time() - t0:.0f} s")


def _get(chains, name):
  return chains["submit"](name).result(timeout=3 * TIMEOUT)


@pytest.fixture(scope="module")
def reference(chains):
  wd = _get(chains, "reference")
  state, meta = H.load_state(wd, N)
  return {"workdir": wd, "state": state, "losses": H.train_losses(wd)}


def _say(capsys, text):
  with capsys.disabled():
    print("\n" + text)


# ---------------------------------------------------------------------------------------------------------------
# kill -9


@uses("kill")
def test_kill9_restarts_resume_from_last_complete_checkpoint(chains, capsys):
  out = _get(chains, "kill")
  recs = out["records"]
  assert len(recs) >= 3, recs
  rows = []
  for i, rec in enumerate(recs):
    assert rec["rc"] == -signal.SIGKILL, (i, rec["kind"], rec.get("finished_before_kill"), rec["rc"])
    assert not rec["summary_after"], "a killed run left summary.json, which marks a completed run"
    last = rec["complete_after"][-1] if rec["complete_after"] else None
    assert rec["resumed_from"] == last, (
        f"kill {i} ({rec['kind']}): complete checkpoints {rec['complete_after']}, partial {rec['partial_after']}; "
        f"the restart resumed from {rec['resumed_from']}")
    rows.append(f"  kill {i + 1}: {rec['kind']:16s} complete {rec['complete_after']} partial "
                f"{rec['partial_after']} -> resumed from {rec['resumed_from']}")
  assert out["final_rc"] == 0, out["final_log"][-3000:]
  wd = out["workdir"]
  assert H.checkpoint_steps(wd)[-1] == N
  assert not H.tmp_checkpoint_dirs(wd), "a partial checkpoint of a killed run was left behind"
  assert json.loads((wd / "summary.json").read_text())["step"] == N
  _say(capsys, "kill -9 chain:\n" + "\n".join(rows))


@uses("kill")
def test_kill9_during_checkpoint_write_never_resumes_partial(chains):
  recs = _get(chains, "kill")["records"]
  during = [r for r in recs if r["kind"] == "checkpoint-write"]
  assert during, "no kill was aimed at a checkpoint write"
  # At least one kill landed inside a write: its temporary directory was left on disk ...
  partial = [r for r in during if r["partial_after"]]
  assert partial, [(r["complete_after"], r["partial_after"]) for r in during]
  for r in partial:
    partial_steps = [int(p.split(".")[0]) for p in r["partial_after"]]
    # ... for a step newer than every complete one, which the restart ignored (and cleaned up).
    assert max(partial_steps) > (r["complete_after"] or [0])[-1]
    assert r["resumed_from"] == (r["complete_after"][-1] if r["complete_after"] else None)


@uses("reference", "kill")
def test_kill9_final_state_identical_to_uninterrupted_run(chains, reference, capsys):
  out = _get(chains, "kill")
  state, _ = H.load_state(out["workdir"], N)
  H.assert_states_equal(state, reference["state"], "kill -9 chain vs uninterrupted run")
  tried = len(out["records"])
  survived = sum(1 for r in out["records"] if r["resumed_from"] == (r["complete_after"] or [None])[-1])
  _say(capsys, f"kill -9: {survived}/{tried} kills survived (resumed from the last complete checkpoint; final "
               f"state bitwise equal to the uninterrupted run); seed {chains['seed']}")
  assert survived == tried


@uses("kill")
def test_kill9_stale_lock_taken_over(chains):
  recs = _get(chains, "kill")["records"]
  held = [r for r in recs if r["lock_after"]]
  assert held, "no kill happened while the run held its workdir lock"
  for r in held:
    pid = int(r["lock_after"].split()[0])
    assert pid == r["pid"]
    assert re.search(rf"Taking over the stale lock .* of process {pid}\b", r["next_log"]), r["next_log"][-2000:]


# ---------------------------------------------------------------------------------------------------------------
# Two trainers, SIGTERM


@uses("sigterm")
def test_second_trainer_on_same_workdir_refuses(chains):
  out = _get(chains, "sigterm")
  assert out["loser_rc"] == 2, out["loser_log"][-3000:]
  errors = [l for l in out["loser_log"].splitlines() if l.startswith("error:")]
  assert len(errors) == 1, out["loser_log"][-3000:]
  assert f"in use by process {out['winner_pid']}" in errors[0]
  assert "--workdir" in errors[0]
  assert "Traceback" not in out["loser_log"]


@uses("sigterm")
def test_sigterm_checkpoints_and_exits_cleanly(chains):
  out = _get(chains, "sigterm")
  assert out["winner_rc"] == 0, out["winner_log"][-3000:]
  summary = out["summary"]
  assert summary is not None and "preempted" in summary["stop_reason"], summary
  stopped = summary["step"]
  assert out["steps_after_sigterm"][-1] == stopped, (out["steps_after_sigterm"], stopped)
  assert stopped < N, f"the run reached step {stopped} before SIGTERM; the test needs it below {N}"
  assert out["sigterm_exit_s"] < 120


@uses("reference", "sigterm")
def test_sigterm_resume_continues_and_matches_uninterrupted(chains, reference):
  out = _get(chains, "sigterm")
  assert out["resume_rc"] == 0, out["resume_log"][-3000:]
  assert _resumed_from(out["resume_log"]) == out["summary"]["step"]
  state, _ = H.load_state(out["workdir"], N)
  H.assert_states_equal(state, reference["state"], "SIGTERM + resume vs uninterrupted run")


# ---------------------------------------------------------------------------------------------------------------
# Corrupted checkpoints


@uses("reference", "corrupt")
def test_corrupt_latest_checkpoint_training_warns_and_falls_back(chains, reference):
  out = _get(chains, "corrupt")
  log = out["log"]
  assert out["rc"] == 0, log[-3000:]
  assert re.search(rf"Checkpoint \S+/checkpoints/{N} could not be restored", log), log[-3000:]
  assert _resumed_from(log) == N - 1
  wd = out["workdir"]
  assert (wd / "checkpoints" / f"{N}.corrupt").is_dir(), "the unreadable checkpoint was not set aside"
  state, _ = H.load_state(wd, N)
  H.assert_states_equal(state, reference["state"], "resume after a corrupted checkpoint vs uninterrupted run")


@uses("reference")
def test_corrupt_latest_checkpoint_evaluate_refuses(chains, tmp_path):
  ref = _get(chains, "reference")
  wd = H.copy_workdir(ref, tmp_path / "wd")
  for f in H.state_data_files(wd, N):
    H.truncate(f, 0.5)
  out = tmp_path / "eval_out"
  res = H.run_cli([H.REPO / "evaluate.py", f"--checkpoint={wd}", "--which=latest", "--ood=mnist",
                   f"--output_dir={out}", "--max_examples=32", "--batch_size=32"])
  line = H.assert_user_error(res, f"/{N} is corrupted", "truncated")
  assert f"checkpoints/{N - 1}" in line, line  # and it names the earlier checkpoint to use instead
  assert not (out / "results.json").exists()


def _drop_manifest(wd, step):
  (wd / "checkpoints" / str(step) / ckpt.FILES_MANIFEST).unlink()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax reads abandoned after an error
@uses("reference")
def test_garbled_checkpoint_never_loads_silently(chains, tmp_path):
  """Flip bytes in each array file of a checkpoint, one at a time: it must be refused or load unchanged.

  With the file manifest every garbling is refused before orbax reads anything; without it (a checkpoint killed
  between orbax's commit and the manifest) the arrays' checksum refuses what orbax would load silently.
  """
  ref = _get(chains, "reference")
  wd = H.copy_workdir(ref, tmp_path / "wd")
  original, _ = H.load_state(wd, N)
  files = H.state_data_files(wd, N)[:8]
  for f in files:
    saved = H.garble(f)
    try:
      with pytest.raises(ckpt.CheckpointError, match=f"{f.name} does not match its checksum"):
        H.load_state(wd, N)
      with pytest.raises(ckpt.CheckpointError, match="corrupted"):
        loading.load_for_eval(str(wd), which="latest")
    finally:
      f.write_bytes(saved)
  _drop_manifest(wd, N)
  outcomes = {}
  for f in files:
    saved = H.garble(f)
    try:
      try:
        raw, _ = H.load_state(wd, N, verify=False)  # what orbax alone returns
      except Exception:  # pylint: disable=broad-except
        outcomes[f.name] = "orbax error"
        continue
      if not H.tree_diffs(raw, original):
        outcomes[f.name] = "bytes not used"
        continue
      with pytest.raises(ckpt.CheckpointError, match="arrays do not match the checksum"):
        H.load_state(wd, N)
      with pytest.raises(ckpt.CheckpointError, match="corrupted"):
        loading.load_for_eval(str(wd), which="latest")
      outcomes[f.name] = "state checksum"
    finally:
      f.write_bytes(saved)
  assert "state checksum" in outcomes.values(), outcomes


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax reads abandoned after an error
@pytest.mark.parametrize("manifest", [True, False], ids=["file-manifest", "state-checksum"])
@uses("reference")
def test_garbled_latest_checkpoint_training_falls_back(chains, reference, tmp_path, caplog, manifest):
  """restore_latest_good (what training resumes with) warns about, sets aside and skips a garbled checkpoint."""
  ref = _get(chains, "reference")
  wd = H.copy_workdir(ref, tmp_path / "wd")
  if not manifest:
    _drop_manifest(wd, N)
  for f in H.state_data_files(wd, N):  # a garbling that orbax alone would load as different values
    saved = H.garble(f)
    try:
      raw, _ = H.load_state(wd, N, verify=False)
      if H.tree_diffs(raw, reference["state"]):
        break
    except Exception:  # pylint: disable=broad-except
      pass
    f.write_bytes(saved)
  else:
    pytest.fail("no garbling changed the loaded values")
  _, meta = H.load_state(ref, N)
  abstract = H._abstract_state(H._model_key(meta["config"]))  # pylint: disable=protected-access
  manager = ckpt.make_manager(str(wd / "checkpoints"), keep=3)
  with caplog.at_level(logging.WARNING):
    step, state, _ = ckpt.restore_latest_good(manager, abstract)
  assert step == N - 1
  assert any(f"checkpoints/{N} could not be restored" in r.getMessage() and "checksum" in r.getMessage()
             for r in caplog.records), [r.getMessage() for r in caplog.records]
  assert (wd / "checkpoints" / f"{N}.corrupt").is_dir()
  assert N not in manager.all_steps()
  ref_prev, _ = H.load_state(ref, N - 1)
  H.assert_states_equal(H.state_to_host(state), ref_prev, "fallback state")


# ---------------------------------------------------------------------------------------------------------------
# Non-finite updates


def _nan_metrics(out):
  rows = {}
  for row in H.read_jsonl(out["workdir"] / "metrics.jsonl"):
    if "train_loss" in row:
      rows[int(row["step"])] = row
  return rows


@uses("nan")
def test_nonfinite_updates_skipped_counted_and_training_continues(chains):
  out = _get(chains, "nan")
  m = _nan_metrics(out)
  for s in NAN_STEPS:
    assert not math.isfinite(m[s]["train_loss"]), m[s]
    assert m[s]["train_skipped_update"] == 1
  for s in (3, 6, 7, 8):
    assert m[s]["train_skipped_update"] == 0 and math.isfinite(m[s]["train_loss"]), m[s]
  assert m[NAN_STEPS[-1]]["train_consecutive_skips"] == 2
  assert m[6]["train_consecutive_skips"] == 0
  assert m[8]["train_skipped_total"] == 2
  # param_norm is the norm of the parameters going into a step: a skipped step leaves them unchanged ...
  assert m[4]["train_param_norm"] == m[5]["train_param_norm"] == m[6]["train_param_norm"]
  # ... and training goes on afterwards.
  assert m[7]["train_param_norm"] != m[6]["train_param_norm"]
  assert all(math.isfinite(r["train_param_norm"]) for r in m.values())
  wd = out["workdir"]
  s3, _ = H.load_state(wd, 3)
  s5, _ = H.load_state(wd, 5)
  s8, _ = H.load_state(wd, 8)
  H.assert_states_equal(s5.params, s3.params, "parameters across skipped updates")
  assert H.all_finite(s8.params) and H.all_finite(s8.opt_state)
  assert int(s8.skipped) == 2 and int(s8.consecutive_skips) == 0


@uses("nan")
def test_consecutive_nonfinite_updates_stop_the_run(chains):
  out = _get(chains, "nan")
  log = out["log"]
  assert out["rc"] == 2, log[-3000:]
  errors = [l for l in log.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "consecutive updates were skipped" in errors[0], log[-3000:]
  assert "--config.optim.lr" in errors[0]  # the fix
  assert "Traceback" not in log
  wd = out["workdir"]
  last = H.checkpoint_steps(wd)[-1]
  assert last < 30, "the run did not stop"
  assert last == NAN_FROM - 1 + MAX_SKIPS + 1, last  # K skips counted, noticed one step later
  assert not (wd / "summary.json").exists()
  final, _ = H.load_state(wd, last)
  good, _ = H.load_state(wd, NAN_FROM - 1)
  H.assert_states_equal(final.params, good.params, "parameters kept through the skipped updates")
  assert H.all_finite(final.params)
  assert int(final.consecutive_skips) >= MAX_SKIPS


# ---------------------------------------------------------------------------------------------------------------
# Workdir lock (in-process; the real two-trainer case is above)


def test_workdir_lock_refusal_names_holder_pid(tmp_path):
  holder = subprocess.Popen([H.PYTHON, str(H.PROGRAMS / "lock_holder.py"), str(tmp_path), "120"],
                            env=H.subprocess_env(),
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ckpt.CheckpointError, match=rf"in use by process {holder.pid} on "):
      workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  finally:
    holder.kill()
    holder.wait()
  # The holder died without releasing: its lock is now stale and is taken over.
  lock = workdir_lock.WorkdirLock(str(tmp_path))
  lock.acquire()
  assert (tmp_path / ".lock").read_text().split()[0] == str(os.getpid())
  lock.release()
  assert not (tmp_path / ".lock").exists()


def test_stale_lock_of_dead_pid_is_taken_over(tmp_path, caplog):
  pid = H.dead_pid()
  (tmp_path / ".lock").write_text(f"{pid} {socket.gethostname()}\n")
  lock = workdir_lock.WorkdirLock(str(tmp_path))
  with caplog.at_level(logging.WARNING):
    lock.acquire()
  assert any(f"process {pid}" in r.getMessage() and "stale" in r.getMessage() for r in caplog.records)
  assert (tmp_path / ".lock").read_text().split()[0] == str(os.getpid())
  lock.release()


def test_stale_lock_race_has_exactly_one_winner(tmp_path):
  """Several trainers restarting at once on a workdir with a stale lock: exactly one gets it."""
  (tmp_path / ".lock").write_text(f"{H.dead_pid()} {socket.gethostname()}\n")
  go = tmp_path / "go"
  procs = [subprocess.Popen([H.PYTHON, str(H.PROGRAMS / "lock_racer.py"), str(tmp_path), str(go)],
                            env=H.subprocess_env(),
                            stdout=subprocess.PIPE, text=True) for _ in range(4)]
  try:
    for p in procs:
      assert p.stdout.readline().strip() == "ready"
    go.touch()
    results = [p.communicate(timeout=120)[0].strip() for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert sum(r == "won" for r in results) == 1, results
  assert all(r == "won" or r.startswith("refused") for r in results), results


# ---------------------------------------------------------------------------------------------------------------
# Determinism


@uses("reference", "sigterm", "nan")
def test_same_seed_gives_identical_first_losses(chains, reference):
  ref = reference["losses"]
  assert sorted(ref) == list(range(1, N + 1)) and all(len(v) == 1 for v in ref.values())
  fresh = _get(chains, "sigterm")["losses_after_sigterm"]  # a second run from scratch, same seed
  steps = sorted(fresh)
  assert len(steps) >= 3 and steps[0] == 1
  for s in steps:
    assert fresh[s][0] == ref[s][0], (s, fresh[s], ref[s])
  nan = H.train_losses(_get(chains, "nan")["workdir"])  # a third, identical until its first NaN batch
  for s in range(1, min(NAN_STEPS)):
    assert nan[s] == ref[s], (s, nan[s], ref[s])


@uses("reference", "kill", "sigterm", "corrupt")
def test_resumed_runs_log_the_same_losses(chains, reference):
  ref = reference["losses"]
  for name in ("kill", "sigterm", "corrupt"):
    wd = _get(chains, name)["workdir"]
    for step, values in H.train_losses(wd).items():
      if step <= N:
        assert all(v == ref[step][0] for v in values), (name, step, values, ref[step])


@uses("evaluate")
def test_evaluate_twice_gives_identical_scores(chains):
  out = _get(chains, "evaluate")
  assert out["rcs"] == [0, 0], [l[-2000:] for l in out["logs"]]
  a, b = (np.load(o / "scores.npz") for o in out["outs"])
  assert sorted(a.files) == sorted(b.files) and a.files
  for k in a.files:
    assert np.array_equal(a[k], b[k]), k
  ra, rb = (json.loads((o / "results.json").read_text()) for o in out["outs"])
  assert ra["ood"] == rb["ood"] and ra["elbo"] == rb["elbo"] and ra["bits_per_dim"] == rb["bits_per_dim"]
