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

Format (`FORMAT_VERSION` 2): orbax's cost is per array, whatever its size (~2 ms of CPU each: the tiny
config's 446 leaves took 1.0 CPU s to save), so the `state` item packs the TrainState's leaves under
OWN_ARRAY_BYTES into one 1-D array per dtype (`pack_state`: flattened, concatenated in tree order) and stores
only the larger leaves as arrays of their own (a paper BIVA: 956 of its 3197 leaves, 98% of the bytes). The
`meta` item lists each leaf's name, dtype and shape (`layout`) and which are stored on their own
(`own_arrays`). Version 1 checkpoints (the state item as the TrainState's tree of arrays) are still restored.
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
OWN_ARRAY_BYTES = 1 << 20  # leaves of at least this size are stored as arrays of their own, smaller ones packed
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


def _size(shape) -> int:
  return int(np.prod(shape, dtype=np.int64))


def own_array_indices(layout: list) -> list:
  """The leaves (indices into `layout`) stored as arrays of their own: those of at least OWN_ARRAY_BYTES."""
  return [i for i, (_, dtype, shape) in enumerate(layout)
          if _size(shape) * jnp.dtype(dtype).itemsize >= OWN_ARRAY_BYTES]


def _packed_sizes(layout: list, own: list) -> dict:
  own, sizes = set(own), {}
  for i, (_, dtype, shape) in enumerate(layout):
    if i not in own:
      sizes[dtype] = sizes.get(dtype, 0) + _size(shape)
  return {dtype: n for dtype, n in sizes.items() if n}  # orbax saves no zero-size array


def pack_state(state: Any) -> tuple[dict, list, list]:
  """(item, layout, own): what `save` hands orbax, `state_layout(state)` and `own_array_indices(layout)`.

  item["packed"]: one 1-D numpy array per dtype name, the leaves under OWN_ARRAY_BYTES flattened and concatenated
  in tree order (each copied to the host once, as orbax would copy it to save it, straight into its place).
  item["own"]: the larger leaves as they are (jax arrays), keyed by their index in `layout`. A key is left out
  where it would be empty. The leaves must be replicated (or on this process's devices).
  """
  layout = state_layout(state)
  own = own_array_indices(layout)
  own_set = set(own)
  packed = {dtype: np.empty((n,), jnp.dtype(dtype)) for dtype, n in _packed_sizes(layout, own).items()}
  position = dict.fromkeys(packed, 0)
  item: dict = {}
  for i, ((name, dtype, _), leaf) in enumerate(zip(layout, jax.tree_util.tree_leaves(state))):
    if i in own_set:
      item.setdefault("own", {})[str(i)] = leaf
      continue
    value = integrity.host_value(leaf)
    if value is None:
      raise ValueError(f"cannot checkpoint array {name}: it is sharded over other processes' devices (the "
                       "training state is replicated)")
    if value.size:
      packed[dtype][position[dtype]:position[dtype] + value.size] = value.reshape(-1)
      position[dtype] += value.size
  if packed:
    item["packed"] = packed
  return item, layout, own


def abstract_item(layout: list, own: list, abstract_state: Any) -> dict:
  """What orbax restores for a state of `layout`: the packed arrays as numpy (on every process), the own arrays
  as `abstract_state`'s leaves (their shardings and dtypes)."""
  by_name = {integrity.leaf_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
  item = {}
  packed = {dtype: jax.ShapeDtypeStruct((n,), jnp.dtype(dtype)) for dtype, n in _packed_sizes(layout, own).items()}
  if packed:
    item["packed"] = packed
  if own:
    item["own"] = {str(i): by_name[layout[i][0]] for i in own}
  return item


def unpack_state(item: dict, layout: list, abstract_state: Any) -> Any:
  """The inverse of `pack_state`: the leaves of `abstract_state` (matched by name, cast to its dtypes, placed
  with its shardings), cut out of the packed numpy arrays or taken from the own arrays.

  The cutting is numpy views on the host and one transfer per leaf: a jitted program of one slice per leaf took
  9 CPU s to compile for the tiny config's 446 leaves.

  Raises:
    CheckpointMismatchError: the layout and `abstract_state` differ in an array's shape or in the set of arrays.
  """
  _check_layout(layout, abstract_state)
  return _unpack_checked(item, layout, abstract_state)


def _unpack_checked(item: dict, layout: list, abstract_state: Any) -> Any:
  """`unpack_state` of a layout already checked against `abstract_state`."""
  host = {dtype: np.asarray(x).reshape(-1) for dtype, x in item.get("packed", {}).items()}
  own_arrays = item.get("own", {})
  where, position = {}, {}
  for i, (name, dtype, shape) in enumerate(layout):
    if str(i) in own_arrays:
      where[name] = own_arrays[str(i)]
    else:
      where[name] = (dtype, position.get(dtype, 0))
      position[dtype] = where[name][1] + _size(shape)

  def leaf(path, wanted):
    stored = where[integrity.leaf_name(path)]
    if not isinstance(stored, tuple):
      return stored  # restored by orbax as `wanted` says
    dtype, start = stored
    size = _size(wanted.shape)
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
  """Saves `state` (a pytree of arrays, as `pack_state` stores it) and `meta` (JSON-serialisable) as checkpoint
  `step`.

  The meta item also gets `format_version`, the state's `layout`, `own_arrays` and the checksums `restore`
  verifies (`integrity.item_checksums`); process 0 then writes the file manifest. Every process must call it (an
  orbax save is a collective).
  """
  item, layout, own = pack_state(state)
  meta = dict(meta, format_version=FORMAT_VERSION, layout=layout, own_arrays=own,
              **integrity.item_checksums(item))
  if step in manager.all_steps():
    # A resumed run redoing a step that was saved before (e.g. the best checkpoint of an evaluation that ran
    # just before the process was killed): this run's state replaces it.
    logging.info("Replacing the existing checkpoint %s/%d.", manager.directory, step)
    manager.delete(step)
  chunks = {"packed": {dtype: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES) for dtype in item["packed"]}} \
      if "packed" in item else {}
  if "own" in item:
    chunks["own"] = {k: ocp.SaveArgs() for k in item["own"]}
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(item, save_args=chunks),
                                             meta=ocp.args.JsonSave(meta)), force=True)
  if jax.process_index() == 0:
    integrity.write_manifest(os.path.join(str(manager.directory), str(step)))


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
  """The meta item of `step`, without checking the files (`restore_meta` checks them first)."""
  with quiet_failed_reads():
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any, verify: bool = True):
  """Restores (state, meta) of `step`, placing arrays as `abstract_state` (ShapeDtypeStructs with shardings).

  `verify=False` skips the file manifest and the checksums (what orbax alone returns; for tests).

  Raises:
    CheckpointMismatchError: the checkpoint's arrays differ from `abstract_state`'s (another model).
    CheckpointError: the checkpoint's files or restored arrays do not match the checksums saved with them
      (corrupted or truncated files).
  """
  step_dir = os.path.join(str(manager.directory), str(step))
  if verify:
    integrity.verify_files(step_dir)
  meta = read_meta(manager, step)
  if isinstance(meta, dict) and "layout" in meta:
    layout, own = meta["layout"], meta.get("own_arrays", [])
    _check_layout(layout, abstract_state)  # before reading any data
    with quiet_failed_reads():
      item = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_item(layout, own, abstract_state))))["state"]
    if verify:
      integrity.check_item(item, meta)
    return _unpack_checked(item, layout, abstract_state), meta
  # Format 1: the state item is the TrainState's tree.
  if verify:
    integrity.check_shapes(step_dir, abstract_state)
  with quiet_failed_reads():
    state = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))["state"]
  if verify:
    integrity.check_state(state, meta)
  return state, meta


def restore_meta(manager: ocp.CheckpointManager, step: int) -> dict:
  integrity.verify_files(os.path.join(str(manager.directory), str(step)))
  return read_meta(manager, step)


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
