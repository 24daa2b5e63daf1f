"""Orbax checkpoints of training runs, and loading them back for evaluation.

Workdir layout:
  WORKDIR/config.json            the run's full config (also stored in every checkpoint's `meta` item)
  WORKDIR/checkpoints/<step>/    the latest N checkpoints: items `state` (TrainState) and `meta` (JSON)
  WORKDIR/best/<step>/           the checkpoint with the best validation ELBO so far
  WORKDIR/.lock                  pid of the training process that owns the workdir

Orbax writes each step into a temporary directory and renames it when complete, so a process killed mid-write
leaves no directory that looks finished. A finished directory that fails to restore (disk corruption, a
truncated file) is reported and skipped in favour of the previous one when training resumes; evaluation
refuses it with a clear error.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
from typing import Any, Optional

import jax
import ml_collections
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "best"
CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"
FORMAT_VERSION = 1


class CheckpointError(Exception):
  """A checkpoint path or content that cannot be used; the message says why and what to do."""


def make_manager(directory: str, keep: int, read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only,
                                         enable_async_checkpointing=False, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=("state", "meta"))


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  """Saves `state` (a pytree of arrays) and `meta` (JSON-serialisable) as checkpoint `step`."""
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
               force=True)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any):
  """Restores (state, meta) of `step`, placing arrays as `abstract_state` (ShapeDtypeStructs with shardings)."""
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                           meta=ocp.args.JsonRestore()))
  return restored["state"], restored["meta"]


def restore_meta(manager: ocp.CheckpointManager, step: int) -> dict:
  return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore_latest_good(manager: ocp.CheckpointManager, abstract_state: Any):
  """Restores the newest checkpoint that loads; warns about and skips broken ones. None if there is none."""
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      state, meta = restore(manager, step, abstract_state)
      _check_tree(state)
      return step, state, meta
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("Checkpoint %s/%d could not be restored (%s: %s); falling back to the previous one.",
                      manager.directory, step, type(e).__name__, str(e).splitlines()[0][:300])
  return None


def _check_tree(state: Any) -> None:
  """Rejects restored trees with non-finite parameters (a checkpoint that 'loads' but holds garbage)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  leaves = jax.tree_util.tree_leaves(getattr(state, "params", state))
  if not all(bool(jnp.all(jnp.isfinite(x))) for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)):
    raise CheckpointError("restored parameters contain non-finite values")


# ---------------------------------------------------------------------------------------------------------------
# Loading for evaluation


@dataclasses.dataclass
class LoadedCheckpoint:
  config: ml_collections.ConfigDict
  params: Any
  step: int
  path: str
  meta: dict


def _find_step_dir(path: str, which: str) -> tuple[str, int]:
  """Resolves a workdir (latest or best) or a step directory to (manager directory, step)."""
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise CheckpointError(f"Checkpoint path {path} does not exist. Pass a training workdir (the --workdir of "
                          "train.py) or one of its checkpoint step directories, e.g. WORKDIR/checkpoints/1000.")
  base = os.path.basename(path.rstrip("/"))
  if base.isdigit() and os.path.isdir(os.path.join(path, "state")):
    return os.path.dirname(path), int(base)
  if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)) or os.path.isdir(os.path.join(path, BEST_DIR)):
    if which not in ("latest", "best"):
      raise CheckpointError(f"--which must be 'latest' or 'best', got {which!r}.")
    sub = os.path.join(path, CHECKPOINT_DIR if which == "latest" else BEST_DIR)
    steps = sorted(int(d) for d in os.listdir(sub) if d.isdigit()) if os.path.isdir(sub) else []
    if not steps:
      raise CheckpointError(f"No {which} checkpoint under {sub}: the run saved none yet. Train longer, or "
                            f"use --which={'best' if which == 'latest' else 'latest'}.")
    return sub, steps[-1]
  raise CheckpointError(f"{path} is neither a training workdir (with {CHECKPOINT_DIR}/ or {BEST_DIR}/) nor a "
                        "checkpoint step directory (a number with a state/ folder inside).")


def load_for_eval(path: str, which: str = "latest", use_ema: bool = True) -> LoadedCheckpoint:
  """Loads a checkpoint's config and (EMA, if present and `use_ema`) parameters onto the default device.

  Raises:
    CheckpointError: a missing path, no checkpoint, a corrupted one, or one whose parameters do not match
      the model the stored config builds with the current code.
  """
  from hvaeood import train as train_lib  # pylint: disable=import-outside-toplevel
  directory, step = _find_step_dir(path, which)
  manager = make_manager(directory, keep=10**6, read_only=True)
  try:
    meta = restore_meta(manager, step)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"Checkpoint {directory}/{step} is unreadable ({type(e).__name__}); it may be "
                          "truncated or corrupted. Pass an earlier step directory.") from e
  if meta.get("format_version") != FORMAT_VERSION:
    raise CheckpointError(f"Checkpoint {directory}/{step} has format version {meta.get('format_version')} but "
                          f"this code reads version {FORMAT_VERSION}.")
  config = ml_collections.ConfigDict(json.loads(meta["config"]))
  try:
    abstract = train_lib.abstract_train_state(config)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"The config stored in {directory}/{step} does not build a model with this code "
                          f"({type(e).__name__}: {e}).") from e
  try:
    state, _ = restore(manager, step, abstract)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"Checkpoint {directory}/{step} could not be restored against the model its config "
                          f"builds ({type(e).__name__}: {str(e).splitlines()[0][:300]}). It is corrupted, or "
                          "was written by an incompatible version of the code.") from e
  try:
    _check_tree(state)
  except CheckpointError as e:
    raise CheckpointError(f"Checkpoint {directory}/{step}: {e}. Pass an earlier step directory.") from e
  params = state.ema_params if (use_ema and state.ema_params is not None) else state.params
  return LoadedCheckpoint(config, params, step, os.path.join(directory, str(step)), meta)


# ---------------------------------------------------------------------------------------------------------------
# Workdir lock


class WorkdirLock:
  """An exclusive lock on a workdir holding the owner's pid and host; a stale lock of a dead pid is taken over."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self.held = False

  def acquire(self) -> None:
    host = socket.gethostname()
    while True:
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        owner = self._read_owner()
        if owner is not None and owner[1] == host and _pid_alive(owner[0]) and owner[0] != os.getpid():
          raise CheckpointError(
              f"Workdir {os.path.dirname(self.path)} is in use by process {owner[0]} on {host} (lock "
              f"{self.path}). Stop that run or choose another --workdir.") from None
        if owner is not None and owner[1] != host:
          raise CheckpointError(
              f"Workdir {os.path.dirname(self.path)} is locked by process {owner[0]} on host {owner[1]}. If that "
              f"run is dead, delete {self.path}.") from None
        logging.warning("Taking over stale lock %s (owner %s is not running).", self.path, owner)
        try:
          os.remove(self.path)
        except FileNotFoundError:
          pass
        continue
      with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()} {host}\n")
      self.held = True
      return

  def _read_owner(self) -> Optional[tuple[int, str]]:
    try:
      with open(self.path) as f:
        pid, host = f.read().split()[:2]
      return int(pid), host
    except (OSError, ValueError):
      return None

  def release(self) -> None:
    if self.held:
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass
      self.held = False


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  # A zombie (killed, not yet reaped) is not alive for our purpose.
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().split(")")[-1].split()[0] != "Z"
  except OSError:
    return True
