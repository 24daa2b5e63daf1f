"""Run control (hvaeood.run_control): the decisions that lead to collectives are the same on every process.

Several processes are simulated by giving each `RunControl` its own clock and a `gather` that returns the rows
every process would contribute (the real one is an all-gather; tests/test_distributed.py runs it with gloo).
"""

import numpy as np
import pytest

from hvaeood import run_control


class _Clock:
  def __init__(self, t=1000.0):
    self.t = t

  def __call__(self):
    return self.t


def _control(sync_every=1, budget=0.0, every=0.0, clock=None, gather=None):
  flag = run_control.Preemption()
  return run_control.RunControl(sync_every=sync_every, budget_seconds=budget, checkpoint_every_seconds=every,
                                preemption=flag, clock=clock or _Clock(), gather=gather), flag


def test_single_process_decides_every_step():
  clock = _Clock()
  ctl, flag = _control(budget=100.0, every=60.0, clock=clock)
  assert ctl.poll(1, 10.0) == run_control.Decision(train_seconds=10.0)
  clock.t += 61.0
  d = ctl.poll(2, 50.0)
  assert d.save_for_time and not d.out_of_time and not d.preempted
  ctl.checkpoint_saved()
  assert not ctl.poll(3, 60.0).save_for_time
  assert ctl.poll(4, 100.0).out_of_time
  flag.requested = True
  assert ctl.poll(5, 0.0).preempted


class _Pod:
  """Two processes with their own clocks and SIGTERM flags; `gather` answers with both processes' rows."""

  def __init__(self, sync_every, budget, every):
    self.clocks = [_Clock(1000.0), _Clock(5000.0)]  # unsynchronised hosts
    self.rows = {}
    self.controls, self.flags = [], []
    for p in range(2):
      ctl, flag = _control(sync_every, budget, every, self.clocks[p], gather=self._gather(p))
      self.controls.append(ctl)
      self.flags.append(flag)

  def _gather(self, p):
    def gather(row):
      self.rows[p] = row
      other = self.rows.get(1 - p)
      assert other is not None, "the other process has not reached this sync step"
      return np.stack([row, other] if p == 0 else [other, row])
    return gather

  def poll(self, step, seconds):
    """Both processes poll `step`, process 1 contributing its row first (as if it arrived first)."""
    self.rows = {}
    if step % self.controls[0].sync_every == 0:
      self.rows[1] = np.array([float(self.flags[1].requested), seconds[1],
                               self.clocks[1]() - self.controls[1]._last_checkpoint])  # pylint: disable=protected-access
    d0 = self.controls[0].poll(step, seconds[0])
    d1 = self.controls[1].poll(step, seconds[1])
    return d0, d1


def test_sigterm_on_one_process_stops_every_process_at_the_same_sync_step():
  pod = _Pod(sync_every=5, budget=0.0, every=0.0)
  pod.flags[1].requested = True  # only process 1 is preempted
  for step in range(1, 5):  # between sync steps nothing is decided, on either process
    d0, d1 = pod.poll(step, (1.0, 1.0))
    assert not d0.preempted and not d1.preempted and d0 == d1 == run_control.Decision()
  d0, d1 = pod.poll(5, (1.0, 1.0))
  assert d0.preempted and d1.preempted and d0 == d1


def test_time_budget_and_checkpoint_timer_follow_process_0s_clock():
  pod = _Pod(sync_every=2, budget=100.0, every=30.0)
  # Process 1 believes it has trained for 150 s (its own clock): no stop, since process 0 has only 90.
  d0, d1 = pod.poll(2, (90.0, 150.0))
  assert d0 == d1 and not d0.out_of_time and d0.train_seconds == pytest.approx(90.0)
  # Process 1's clock runs ahead by 40 s since its last checkpoint; process 0's only 10 s: no timed save anywhere.
  pod.clocks[0].t += 10.0
  pod.clocks[1].t += 40.0
  d0, d1 = pod.poll(4, (95.0, 160.0))
  assert d0 == d1 and not d0.save_for_time
  # Once process 0's timer passes 30 s, both save at the same step; both then restart their timers.
  pod.clocks[0].t += 25.0
  d0, d1 = pod.poll(6, (99.0, 170.0))
  assert d0 == d1 and d0.save_for_time and not d0.out_of_time
  for c in pod.controls:
    c.checkpoint_saved()
  d0, d1 = pod.poll(8, (100.0, 10.0))
  assert d0 == d1 and d0.out_of_time and not d0.save_for_time


def test_bad_cadence_is_a_clear_error():
  with pytest.raises(ValueError, match="sync_every_steps"):
    _control(sync_every=0, gather=lambda row: row[None])
