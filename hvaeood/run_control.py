"""Run-control decisions of the training loop that every process must take at the same step.

Saving a checkpoint, stopping, and evaluating are collectives in a multi-process run (orbax saves and the
jitted calls on global arrays need every process). A decision taken from host-local state would let one process
save or stop while the others step on, which deadlocks the pod. Three such inputs are host-local:

* the wall-clock checkpoint cadence (`checkpoint.every_minutes`) and the time budget
  (`train.time_budget_minutes`): each host has its own clock;
* SIGTERM: a preempted TPU VM host receives it alone, or before the others.

`RunControl` turns them into decisions that are identical on every process: at every `sync_every`-th step (every
step with one process, where it costs nothing) each process contributes [SIGTERM seen, training seconds, seconds
since its last checkpoint]; one all-gather gives everyone the same rows; the decision uses process 0's clocks and
stops all processes if any one of them got SIGTERM. Between sync steps nothing time- or signal-based is decided,
so a decision lands at most `sync_every - 1` steps late. Step-based cadences (`checkpoint.every_steps`, the
evaluation cadence) are the same everywhere by construction and need no sync.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from typing import Callable, Optional

import jax
import numpy as np


class Preemption:
  """Turns SIGTERM into a flag polled by the loop (a context manager; a no-op off the main thread)."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self) -> "Preemption":
    if threading.current_thread() is threading.main_thread():
      self._old = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = True

  def __exit__(self, *exc) -> None:
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)
      self._old = None


@dataclasses.dataclass(frozen=True)
class Decision:
  """What every process does after a step (identical on all of them)."""
  preempted: bool = False      # some process received SIGTERM: save and stop
  out_of_time: bool = False    # the time budget (process 0's clock) is spent: save and stop
  save_for_time: bool = False  # checkpoint.every_minutes has passed on process 0's clock
  train_seconds: Optional[float] = None  # process 0's training seconds at this sync (None between syncs)


def _allgather_rows(row: np.ndarray) -> np.ndarray:
  """[P, n] rows of all processes (float32, which keeps training seconds to ~0.1 s over 10^6 s)."""
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  out = multihost_utils.process_allgather(row.astype(np.float32), tiled=False)
  return np.asarray(out, np.float64).reshape(jax.process_count(), row.size)


class RunControl:
  """Synchronised preemption, time-budget and checkpoint-timer decisions (see the module docstring).

  Args:
    sync_every: the cadence, in steps, of the all-gather with several processes (ignored with one process).
    budget_seconds: training-time budget (<= 0: none).
    checkpoint_every_seconds: wall-clock checkpoint cadence (<= 0: none).
    preemption: the SIGTERM flag of this process.
    clock: time source (tests).
    gather: rows of all processes from this one's (tests); default: `jax.experimental.multihost_utils`.
  """

  def __init__(self, *, sync_every: int, budget_seconds: float, checkpoint_every_seconds: float,
               preemption: Preemption, clock: Callable[[], float] = time.time,
               gather: Optional[Callable[[np.ndarray], np.ndarray]] = None):
    if sync_every < 1:
      raise ValueError(f"config.train.sync_every_steps must be >= 1, got {sync_every}.")
    self.single = jax.process_count() == 1 and gather is None
    self.sync_every = 1 if self.single else int(sync_every)
    self.budget_seconds = float(budget_seconds)
    self.checkpoint_every_seconds = float(checkpoint_every_seconds)
    self.preemption = preemption
    self._clock = clock
    self._gather = gather or _allgather_rows
    self._last_checkpoint = clock()

  def checkpoint_saved(self) -> None:
    """Restarts the checkpoint timer (call after every save, on every process)."""
    self._last_checkpoint = self._clock()

  def poll(self, step: int, train_seconds: float) -> Decision:
    """The decision after `step` given this process's training seconds; collective at sync steps."""
    if step % self.sync_every:
      return Decision()
    row = np.array([float(self.preemption.requested), train_seconds, self._clock() - self._last_checkpoint])
    rows = row[None] if self.single else self._gather(row)
    seconds, since_checkpoint = float(rows[0, 1]), float(rows[0, 2])
    return Decision(preempted=bool(np.any(rows[:, 0] > 0)),
                    out_of_time=self.budget_seconds > 0 and seconds >= self.budget_seconds,
                    save_for_time=(self.checkpoint_every_seconds > 0
                                   and since_checkpoint >= self.checkpoint_every_seconds),
                    train_seconds=seconds)
