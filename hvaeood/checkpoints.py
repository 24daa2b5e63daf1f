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

Format (`FORMAT_VERSION` 2): the `state` item holds the TrainState's leaves packed into one 1-D array per dtype
(`pack_state`: each leaf flattened, concatenated in tree order), and the `meta` item lists each leaf's name,
dtype and shape under `layout`. Orbax's cost is per array (~2 ms of CPU each, whatever its size: the tiny
config's 446 leaves took 1.0 CPU s to save, packed 0.03), and a paper BIVA has over 3,000 leaves. Version 1
checkpoints (the state item as the TrainState's tree of arrays) are still restored.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from hvaeood import integrity
from hvaeood.errors import CheckpointError, CheckpointMismatchError  # noqa: F401  (the errors callers catch)
from hvaeood.integrity import FILES_MANIFEST  # noqa: F401

CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "best"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
CHUNK_BYTES = 64 << 20  # the packed arrays are stored (and read) in chunks of at most this size


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


# ---------------------------------------------------------------------------------------------------------------
# The packed state (format 2)


def state_layout(state: Any) -> list:
  """[[name, dtype, shape], ...] of a state's leaves in tree order (names as `integrity.leaf_name`)."""
  return [[integrity.leaf_name(path), jnp.dtype(x.dtype).name, [int(d) for d in x.shape]]
          for path, x in jax.tree_util.tree_flatten_with_path(state)[0]]


def pack_state(state: Any) -> tuple[dict, list]:
  """(packed, layout): one 1-D numpy array per dtype name, the leaves flattened and concatenated in tree order,
  and `state_layout(state)`. The leaves must be replicated (or on this process's devices): each is copied to
  the host once, as orbax would copy it to save it."""
  layout = state_layout(state)
  groups: dict = {}
  for (name, dtype, _), leaf in zip(layout, jax.tree_util.tree_leaves(state)):
    value = integrity.host_value(leaf)
    if value is None:
      raise ValueError(f"cannot checkpoint array {name}: it is sharded over other processes' devices (the "
                       "training state is replicated)")
    if value.size:  # orbax saves no zero-size array: a dtype whose leaves are all empty gets none
      groups.setdefault(dtype, []).append(value.reshape(-1))
  return {dtype: np.concatenate(values) for dtype, values in groups.items()}, layout


def _packed_sizes(layout: list) -> dict:
  sizes: dict = {}
  for _, dtype, shape in layout:
    sizes[dtype] = sizes.get(dtype, 0) + int(np.prod(shape, dtype=np.int64))
  return sizes


def abstract_packed(layout: list) -> dict:
  """The packed arrays' shapes and dtypes: what orbax restores (as numpy arrays, on every process)."""
  return {dtype: jax.ShapeDtypeStruct((n,), jnp.dtype(dtype)) for dtype, n in _packed_sizes(layout).items() if n}


def unpack_state(packed: dict, layout: list, abstract_state: Any) -> Any:
  """The inverse of `pack_state`: the leaves of `abstract_state` (matched by name, cast to its dtypes, placed
  with its shardings) cut out of the packed numpy arrays.

  The cutting is numpy views on the host and one transfer per leaf: a jitted program of one slice per leaf took
  9 CPU s to compile for the tiny config's 446 leaves.

  Raises:
    CheckpointMismatchError: the layout and `abstract_state` differ in an array's shape or in the set of arrays.
  """
  _check_layout(layout, abstract_state)
  host = {dtype: np.asarray(x).reshape(-1) for dtype, x in packed.items()}
  offsets, position = {}, {}
  for name, dtype, shape in layout:
    offsets[name] = (dtype, position.get(dtype, 0))
    position[dtype] = offsets[name][1] + int(np.prod(shape, dtype=np.int64))

  def leaf(path, wanted):
    dtype, start = offsets[integrity.leaf_name(path)]
    size = int(np.prod(wanted.shape, dtype=np.int64))
    flat = host[dtype][start:start + size] if size else np.zeros((0,), jnp.dtype(dtype))
    value = flat.reshape(wanted.shape).astype(jnp.dtype(wanted.dtype), copy=False)
    sharding = getattr(wanted, "sharding", None)
    if sharding is None:
      return jnp.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

  return jax.tree_util.tree_map_with_path(leaf, abstract_state)


def _check_layout(layout: list, abstract_state: Any) -> None:
  integrity.compare_shapes({name: tuple(shape) for name, _, shape in layout},
                           {integrity.leaf_name(p): tuple(x.shape)
                            for p, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]})


# ---------------------------------------------------------------------------------------------------------------
# Save and restore


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  """Saves `state` (a pytree of arrays, packed as `pack_state`) and `meta` (JSON-serialisable) as checkpoint
  `step`.

  The meta item also gets `format_version`, the state's `layout` and `state_crc32` (of the packed arrays), which
  `restore` verifies; process 0 then writes the file manifest. Every process must call it (an orbax save
  is a collective).
  """
  packed, layout = pack_state(state)
  meta = dict(meta, format_version=FORMAT_VERSION, layout=layout, state_crc32=integrity.packed_crc32(packed))
  if step in manager.all_steps():
    # A resumed run redoing a step that was saved before (e.g. the best checkpoint of an evaluation that ran
    # just before the process was killed): this run's state replaces it.
    logging.info("Replacing the existing checkpoint %s/%d.", manager.directory, step)
    manager.delete(step)
  chunks = jax.tree_util.tree_map(lambda _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES), packed)
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(packed, save_args=chunks),
                                             meta=ocp.args.JsonSave(meta)), force=True)
  if jax.process_index() == 0:
    integrity.write_manifest(os.path.join(str(manager.directory), str(step)))


def _read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
  with quiet_failed_reads():
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any):
  """Restores (state, meta) of `step`, placing arrays as `abstract_state` (ShapeDtypeStructs with shardings).

  Raises:
    CheckpointMismatchError: the checkpoint's arrays differ from `abstract_state`'s (another model).
    CheckpointError: the checkpoint's files or restored arrays do not match the checksums saved with them
      (corrupted or truncated files).
  """
  step_dir = os.path.join(str(manager.directory), str(step))
  integrity.verify_files(step_dir)
  meta = _read_meta(manager, step)
  if isinstance(meta, dict) and "layout" in meta:
    layout = meta["layout"]
    _check_layout(layout, abstract_state)  # before reading any data
    with quiet_failed_reads():
      packed = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_packed(layout))))["state"]
    integrity.check_state(packed, meta)
    return unpack_state(packed, layout, abstract_state), meta
  # Format 1: the state item is the TrainState's tree.
  integrity.check_shapes(step_dir, abstract_state)
  with quiet_failed_reads():
    state = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))["state"]
  integrity.check_state(state, meta)
  return state, meta


def restore_meta(manager: ocp.CheckpointManager, step: int) -> dict:
  integrity.verify_files(os.path.join(str(manager.directory), str(step)))
  return _read_meta(manager, step)


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
