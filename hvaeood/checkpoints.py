"""Orbax checkpoints of training runs: save, restore, and resume from the latest good one.

Workdir layout:
  WORKDIR/config.json            the run's full config (also stored in every checkpoint's `meta` item)
  WORKDIR/checkpoints/<step>/    the latest N checkpoints: items `state` (TrainState) and `meta` (JSON), and
                                 hvaeood_files.json (the file manifest, written after the commit)
  WORKDIR/checkpoints/<step>.corrupt/  a checkpoint that failed to restore, set aside when training fell back
  WORKDIR/best/<step>/           the checkpoint with the best validation ELBO so far
  WORKDIR/.lock                  flock'ed while a training process owns the workdir (`workdir_lock`)

Orbax writes each step into a temporary directory and renames it when complete, so a process killed mid-write
leaves no directory that looks finished (the temporary one is removed when the next run opens the directory).
A finished checkpoint that fails its integrity checks (`integrity`), or fails to restore at all, is reported, set
aside and skipped in favour of the previous one when training resumes; evaluation refuses it (`loading`). Never a
silent garbage model.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from hvaeood import integrity
from hvaeood.errors import CheckpointError, CheckpointMismatchError  # noqa: F401  (the errors callers catch)
from hvaeood.integrity import FILES_MANIFEST  # noqa: F401

CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "best"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1


class OrbaxFailedReadNoise(logging.Filter):
  """Drops asyncio's "Task exception was never retrieved" tracebacks of orbax reads abandoned after a failed
  restore: the failure itself is reported (once, clearly) by the code that asked for the restore."""

  def filter(self, record: logging.LogRecord) -> bool:
    try:
      text = record.getMessage()
    except Exception:  # pylint: disable=broad-except
      return True
    return not ("exception was never retrieved" in text and "orbax" in text)



@contextlib.contextmanager
def quiet_failed_reads():
  """While orbax reads: drops asyncio's "Task exception was never retrieved" tracebacks of reads abandoned after
  a failed restore (the failure itself is reported, once, by the caller). The filter is removed afterwards."""
  f = OrbaxFailedReadNoise()
  logger = logging.getLogger("asyncio")
  logger.addFilter(f)
  try:
    yield
  finally:
    logger.removeFilter(f)


def make_manager(directory: str, keep: int, read_only: bool = False) -> ocp.CheckpointManager:
  if read_only:
    options = ocp.CheckpointManagerOptions(create=False, read_only=True, save_interval_steps=0,
                                           max_to_keep=None, cleanup_tmp_directories=False,
                                           enable_async_checkpointing=False)
  else:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False,
                                           cleanup_tmp_directories=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=("state", "meta"))


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  """Saves `state` (a pytree of arrays) and `meta` (JSON-serialisable) as checkpoint `step`.

  The meta item also gets `state_checksum`, which `restore` verifies; process 0 then writes the file manifest.
  Every process must call it (an orbax save is a collective).
  """
  meta = dict(meta, state_checksum=integrity.state_checksum(state))
  if step in manager.all_steps():
    # A resumed run redoing a step that was saved before (e.g. the best checkpoint of an evaluation that ran
    # just before the process was killed): this run's state replaces it.
    logging.info("Replacing the existing checkpoint %s/%d.", manager.directory, step)
    manager.delete(step)
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
               force=True)
  if jax.process_index() == 0:
    integrity.write_manifest(os.path.join(str(manager.directory), str(step)))


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any):
  """Restores (state, meta) of `step`, placing arrays as `abstract_state` (ShapeDtypeStructs with shardings).

  Raises:
    CheckpointError: the checkpoint's files or restored arrays do not match the checksums saved with them
      (corrupted or truncated files).
  """
  step_dir = os.path.join(str(manager.directory), str(step))
  integrity.verify_files(step_dir)
  integrity.check_shapes(step_dir, abstract_state)
  with quiet_failed_reads():
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                             meta=ocp.args.JsonRestore()))
  state, meta = restored["state"], restored["meta"]
  integrity.check_state(state, meta)
  return state, meta


def restore_meta(manager: ocp.CheckpointManager, step: int) -> dict:
  integrity.verify_files(os.path.join(str(manager.directory), str(step)))
  with quiet_failed_reads():
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def short_error(e: BaseException) -> str:
  """The first line of an exception, with its type (for one-line messages)."""
  text = str(e).strip()
  return f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"


def restore_latest_good(manager: ocp.CheckpointManager, abstract_state: Any):
  """Restores the newest checkpoint that loads; warns about and skips broken ones. None if there is none.

  Broken checkpoints newer than the one restored are renamed to `<step>.corrupt` (kept for inspection, out of
  the manager's way, so the resumed run can write those steps again). If checkpoints exist but none restores,
  nothing is renamed: that is what a changed model config looks like, and a CheckpointError says so.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  broken = []
  for step in steps:
    try:
      state, meta = restore(manager, step, abstract_state)
      integrity.check_finite(state)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("Checkpoint %s/%d could not be restored (%s); falling back to the previous one.",
                      manager.directory, step, short_error(e))
      broken.append((step, e))
      continue
    if broken:
      _quarantine(manager, [b for b, _ in broken])
    return step, state, meta
  if broken:
    step, e = broken[0]
    raise CheckpointError(
        f"None of the {len(broken)} checkpoints in {manager.directory} can be restored for this config (newest, "
        f"step {step}: {short_error(e)}). If the model config changed, resume with the run's own config "
        f"({CONFIG_FILE} in the workdir) or use a new --workdir; if the checkpoints are corrupted, move "
        f"{manager.directory} away to start over.")
  return None


def _quarantine(manager: ocp.CheckpointManager, steps) -> None:
  """Renames broken step directories to `<step>.corrupt[.N]` (process 0) and reloads the manager's step list."""
  directory = str(manager.directory)
  if jax.process_index() == 0:
    for step in steps:
      src = os.path.join(directory, str(step))
      dst, n = src + ".corrupt", 1
      while os.path.exists(dst):
        dst, n = f"{src}.corrupt.{n}", n + 1
      try:
        os.rename(src, dst)
        logging.warning("Moved the unreadable checkpoint %s to %s; training resumes from an earlier step.",
                        src, dst)
      except OSError as e:
        raise CheckpointError(f"Checkpoint {src} is unreadable and could not be moved aside ({e.strerror}); "
                              "delete it and restart.") from None
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices("hvaeood_checkpoint_quarantine")
  manager.reload()
