"""Orbax checkpoints of training runs, and loading them back for evaluation.

Workdir layout:
  WORKDIR/config.json            the run's full config (also stored in every checkpoint's `meta` item)
  WORKDIR/checkpoints/<step>/    the latest N checkpoints: items `state` (TrainState) and `meta` (JSON), and
                                 hvaeood_files.json (size and SHA-256 of every file, written after the commit)
  WORKDIR/checkpoints/<step>.corrupt/  a checkpoint that failed to restore, set aside when training fell back
  WORKDIR/best/<step>/           the checkpoint with the best validation ELBO so far
  WORKDIR/.lock                  flock'ed while a training process owns the workdir; holds its pid and host

Orbax writes each step into a temporary directory and renames it when complete, so a process killed mid-write
leaves no directory that looks finished (the temporary one is removed when the next run opens the directory).
Every checkpoint carries two checksums: the file manifest, checked before orbax reads anything, and a SHA-256 of
the restored arrays (`state_sha256` in `meta`), checked after. A finished checkpoint that fails either, or fails
to restore at all (disk corruption, a truncated or garbled file), is reported, set aside and skipped in favour of
the previous one when training resumes; evaluation refuses it with a clear error. Never a silent garbage model.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import socket
import time
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "best"
CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"
FILES_MANIFEST = "hvaeood_files.json"  # in each step directory: size and SHA-256 of every file of the checkpoint
FORMAT_VERSION = 1


class _OrbaxFailedReadNoise(logging.Filter):
  """Drops asyncio's "Task exception was never retrieved" tracebacks of orbax reads abandoned after a failed
  restore: the failure itself is reported (once, clearly) by the code that asked for the restore."""

  def filter(self, record: logging.LogRecord) -> bool:
    try:
      text = record.getMessage()
    except Exception:  # pylint: disable=broad-except
      return True
    return not ("exception was never retrieved" in text and "orbax" in text)


logging.getLogger("asyncio").addFilter(_OrbaxFailedReadNoise())


class CheckpointError(Exception):
  """A checkpoint path or content that cannot be used; the message says why and what to do."""


class CheckpointMismatchError(CheckpointError):
  """A readable checkpoint whose arrays are not those of the model the config builds (a config or code change)."""


def make_manager(directory: str, keep: int, read_only: bool = False) -> ocp.CheckpointManager:
  if read_only:
    options = ocp.CheckpointManagerOptions(create=False, read_only=True, save_interval_steps=0,
                                           max_to_keep=None, cleanup_tmp_directories=False,
                                           enable_async_checkpointing=False)
  else:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False,
                                           cleanup_tmp_directories=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=("state", "meta"))


def _host_value(x) -> Optional[np.ndarray]:
  """The full value of a leaf on this host, or None when this process holds only part of it."""
  if isinstance(x, jax.Array):
    if x.is_fully_addressable:
      return np.asarray(x)
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return None
  return np.asarray(x)


def state_digest(state: Any) -> Optional[str]:
  """SHA-256 over every leaf's path, dtype, shape and bytes; None if some leaf is not fully on this host.

  Stored in each checkpoint's meta (`state_sha256`) and verified on restore, so that a checkpoint whose files
  were garbled (bit rot, a partial copy) is refused instead of loading as a silently wrong model.
  """
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    value = _host_value(leaf)
    if value is None:
      return None
    value = np.ascontiguousarray(value)
    h.update(f"{jax.tree_util.keystr(path)}|{value.dtype}|{value.shape}|".encode())
    h.update(value.tobytes())
  return h.hexdigest()


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  """Saves `state` (a pytree of arrays) and `meta` (JSON-serialisable) as checkpoint `step`.

  The meta item also gets `state_sha256`, the checksum `restore` verifies.
  """
  meta = dict(meta)
  digest = state_digest(state)
  if digest is not None:
    meta["state_sha256"] = digest
  if step in manager.all_steps():
    # A resumed run redoing a step that was saved before (e.g. the best checkpoint of an evaluation that ran
    # just before the process was killed): this run's state replaces it.
    logging.info("Replacing the existing checkpoint %s/%d.", manager.directory, step)
    manager.delete(step)
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
               force=True)
  if jax.process_index() == 0:
    _write_files_manifest(os.path.join(str(manager.directory), str(step)))


def _file_digests(step_dir: str) -> dict[str, list]:
  out = {}
  for root, _, files in os.walk(step_dir):
    for name in files:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, step_dir)
      if rel.startswith(FILES_MANIFEST):
        continue
      h = hashlib.sha256()
      with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
          h.update(chunk)
      out[rel] = [os.path.getsize(path), h.hexdigest()]
  return out


def _write_files_manifest(step_dir: str) -> None:
  """Records size and SHA-256 of every file of a finished checkpoint (written atomically, after orbax's commit).

  A checkpoint killed between the two has no manifest; it is then checked by the arrays' checksum alone.
  """
  path = os.path.join(step_dir, FILES_MANIFEST)
  digests = _file_digests(step_dir)
  with open(path + ".tmp", "w") as f:
    json.dump(digests, f, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(path + ".tmp", path)


def verify_files(step_dir: str) -> bool:
  """Checks a checkpoint's files against its manifest before orbax reads them (a clear reason, no read noise).

  Returns:
    True if verified, False if the checkpoint has no manifest (older, or killed just before writing it).
  Raises:
    CheckpointError: a file is missing, truncated or does not match its checksum.
  """
  path = os.path.join(step_dir, FILES_MANIFEST)
  if not os.path.exists(path):
    return False
  try:
    with open(path) as f:
      expected = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"its file manifest {FILES_MANIFEST} is unreadable ({type(e).__name__})") from None
  for rel, (size, digest) in sorted(expected.items()):
    full = os.path.join(step_dir, rel)
    if not os.path.exists(full):
      raise CheckpointError(f"file {rel} is missing")
    got = os.path.getsize(full)
    if got != size:
      raise CheckpointError(f"file {rel} is truncated or overwritten ({got} bytes, {size} when saved)")
  actual = _file_digests(step_dir)
  for rel, (size, digest) in sorted(expected.items()):
    if actual[rel][1] != digest:
      raise CheckpointError(f"file {rel} does not match its checksum")
  return True


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any):
  """Restores (state, meta) of `step`, placing arrays as `abstract_state` (ShapeDtypeStructs with shardings).

  Raises:
    CheckpointError: the checkpoint's files or restored arrays do not match the checksums saved with them
      (corrupted or truncated files).
  """
  step_dir = os.path.join(str(manager.directory), str(step))
  verify_files(step_dir)
  check_shapes(step_dir, abstract_state)
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                           meta=ocp.args.JsonRestore()))
  state, meta = restored["state"], restored["meta"]
  expected = meta.get("state_sha256") if isinstance(meta, dict) else None
  if expected is not None:
    got = state_digest(state)
    if got is not None and got != expected:
      raise CheckpointError("its arrays do not match the checksum saved with them (corrupted or truncated files)")
  return state, meta


def _dotted(path) -> str:
  parts = []
  for k in path:
    for attr in ("name", "key", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return ".".join(parts)


def check_shapes(step_dir: str, abstract_state: Any) -> None:
  """Compares the stored arrays' names and shapes (orbax metadata, no data read) with `abstract_state`.

  A mismatch means the checkpoint belongs to another model (a changed config, or code that builds the model
  differently); it is reported here, naming the first differing array, before orbax starts reading.

  Raises:
    CheckpointMismatchError: an array with another shape, or an array missing on either side.
  """
  try:
    md = ocp.StandardCheckpointer().metadata(os.path.join(step_dir, "state"))
    tree = getattr(md, "item_metadata", md)
    tree = getattr(tree, "tree", tree)
    stored = {leaf.name: tuple(leaf.shape) for _, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
              if hasattr(leaf, "shape") and hasattr(leaf, "name")}
  except Exception:  # pylint: disable=broad-except
    return  # unreadable metadata: the restore itself reports the problem
  wanted = {_dotted(p): tuple(leaf.shape) for p, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
  if not stored or not set(stored) & set(wanted):
    return  # names in a layout we do not know: leave the check to orbax
  for name, shape in wanted.items():  # tree order: parameters before optimiser state
    if name in stored and stored[name] != shape:
      raise CheckpointMismatchError(f"array {name} is stored with shape {stored[name]} but the config builds "
                                    f"{shape}")
  missing = [name for name in wanted if name not in stored]
  if missing:
    raise CheckpointMismatchError(f"the config builds array {missing[0]}, which the checkpoint does not hold"
                                  + (f" ({len(missing)} such arrays)" if len(missing) > 1 else ""))
  extra = sorted(set(stored) - set(wanted))
  if extra:
    raise CheckpointMismatchError(f"the checkpoint holds array {extra[0]}, which the config does not build"
                                  + (f" ({len(extra)} such arrays)" if len(extra) > 1 else ""))


def restore_meta(manager: ocp.CheckpointManager, step: int) -> dict:
  verify_files(os.path.join(str(manager.directory), str(step)))
  return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def _short(e: BaseException) -> str:
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
      _check_tree(state)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("Checkpoint %s/%d could not be restored (%s); falling back to the previous one.",
                      manager.directory, step, _short(e))
      broken.append((step, e))
      continue
    if broken:
      _quarantine(manager, [b for b, _ in broken])
    return step, state, meta
  if broken:
    step, e = broken[0]
    raise CheckpointError(
        f"None of the {len(broken)} checkpoints in {manager.directory} can be restored for this config (newest, "
        f"step {step}: {_short(e)}). If the model config changed, resume with the run's own config "
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
  """A checkpoint loaded for evaluation.

  Attributes:
    config: the run's config, as stored in the checkpoint.
    params: the parameters that are evaluated (see `parameters`).
    step: the checkpoint's step.
    path: its step directory.
    meta: its meta item.
    parameters: which parameters `params` holds: "EMA" (the checkpoint has an EMA and it was asked for) or "raw".
    which: how the step was chosen: "best", "latest" or "step directory".
  """
  config: ml_collections.ConfigDict
  params: Any
  step: int
  path: str
  meta: dict
  parameters: str = "raw"
  which: str = "step directory"


WHICH = ("best", "latest")


def _steps_in(directory: str) -> list[int]:
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(directory) else []


def find_step_dir(path: str, which: Optional[str] = None) -> tuple[str, int, str]:
  """Resolves a workdir or a step directory to (manager directory, step, how it was chosen).

  For a workdir, `which` is 'best' (the best-validation-ELBO checkpoint), 'latest', or None: 'best' where the
  workdir has one, else 'latest' (the reference evaluates its best model).
  """
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise CheckpointError(f"Checkpoint path {path} does not exist. Pass a training workdir (the --workdir of "
                          "train.py) or one of its checkpoint step directories, e.g. WORKDIR/checkpoints/1000.")
  if which is not None and which not in WHICH:
    raise CheckpointError(f"--which must be 'best' or 'latest', got {which!r}.")
  base = os.path.basename(path.rstrip("/"))
  if base.isdigit() and os.path.isdir(os.path.join(path, "state")):
    return os.path.dirname(path), int(base), "step directory"
  if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)) or os.path.isdir(os.path.join(path, BEST_DIR)):
    if which is None:
      which = "best" if _steps_in(os.path.join(path, BEST_DIR)) else "latest"
    sub = os.path.join(path, CHECKPOINT_DIR if which == "latest" else BEST_DIR)
    steps = _steps_in(sub)
    if not steps:
      raise CheckpointError(f"No {which} checkpoint under {sub}: the run saved none yet. Train longer, or "
                            f"use --which={'best' if which == 'latest' else 'latest'}.")
    return sub, steps[-1], which
  raise CheckpointError(f"{path} is neither a training workdir (with {CHECKPOINT_DIR}/ or {BEST_DIR}/) nor a "
                        "checkpoint step directory (a number with a state/ folder inside).")


def _earlier_hint(directory: str, step: int) -> str:
  earlier = sorted(int(d) for d in os.listdir(directory) if d.isdigit() and int(d) < step)
  if earlier:
    return f"Pass an earlier checkpoint instead, e.g. --checkpoint {os.path.join(directory, str(earlier[-1]))}."
  return "There is no earlier checkpoint in that directory; retrain or restore the files."


def load_for_eval(path: str, which: Optional[str] = None, use_ema: bool = True) -> LoadedCheckpoint:
  """Loads a checkpoint's config and (EMA, if present and `use_ema`) parameters onto the default device.

  `which`: see `find_step_dir` (None: the best checkpoint where the workdir has one, else the latest).

  Raises:
    CheckpointError: a missing path, no checkpoint, a corrupted one, or one whose parameters do not match
      the model the stored config builds with the current code.
  """
  from hvaeood import train as train_lib  # pylint: disable=import-outside-toplevel
  directory, step, chosen = find_step_dir(path, which)
  manager = make_manager(directory, keep=10**6, read_only=True)
  hint = _earlier_hint(directory, step)
  try:
    meta = restore_meta(manager, step)
  except CheckpointError as e:
    raise CheckpointError(f"Checkpoint {directory}/{step} is corrupted: {e}. {hint}") from e
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"Checkpoint {directory}/{step} is unreadable ({type(e).__name__}); it may be "
                          f"truncated or corrupted. {hint}") from e
  if meta.get("format_version") != FORMAT_VERSION:
    raise CheckpointError(f"Checkpoint {directory}/{step} has format version {meta.get('format_version')} but "
                          f"this code reads version {FORMAT_VERSION}.")
  config = ml_collections.ConfigDict(json.loads(meta["config"]))
  try:
    abstract = train_lib.abstract_train_state(config)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"The config stored in {directory}/{step} does not build a model with this code "
                          f"({_short(e)}).") from e
  try:
    state, _ = restore(manager, step, abstract)
  except CheckpointMismatchError as e:
    raise CheckpointError(f"Checkpoint {directory}/{step} does not match the model its stored config builds with "
                          f"this code: {e}. It was written by another version of the code (or its stored config "
                          "was edited); evaluate it with that version.") from e
  except CheckpointError as e:
    raise CheckpointError(f"Checkpoint {directory}/{step} is corrupted: {e}. {hint}") from e
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"Checkpoint {directory}/{step} could not be restored against the model its stored "
                          f"config builds ({_short(e)[:160]}): it is corrupted, or its config does not match this "
                          f"code. {hint}") from e
  try:
    _check_tree(state)
  except CheckpointError as e:
    raise CheckpointError(f"Checkpoint {directory}/{step}: {e}. {hint}") from e
  ema = use_ema and state.ema_params is not None
  return LoadedCheckpoint(config, state.ema_params if ema else state.params, step,
                          os.path.join(directory, str(step)), meta, "EMA" if ema else "raw", chosen)


# ---------------------------------------------------------------------------------------------------------------
# Workdir lock


class WorkdirLock:
  """An exclusive lock on a workdir, naming the owner's pid and host; a stale lock of a dead process is taken over.

  The lock is a `flock` on WORKDIR/.lock, which the kernel drops when its holder dies however it dies (kill -9
  included), so taking over a stale lock is race-free: of several processes starting at once, exactly one wins.
  The file holds "<pid> <host>" for the messages and is removed on release. On filesystems without `flock` the
  lock falls back to O_EXCL creation plus a liveness check of the recorded pid.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self.held = False
    self._fd: Optional[int] = None

  def acquire(self) -> None:
    try:
      import fcntl  # pylint: disable=import-outside-toplevel
    except ImportError:
      fcntl = None
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        if fcntl is None:
          raise OSError(errno.ENOLCK, "flock unavailable")
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        os.close(fd)
        raise CheckpointError(self._in_use_message(self._read_owner(wait=True))) from None
      except OSError as e:
        os.close(fd)
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
          self._acquire_by_pid()
          return
        raise
      # Locked. The file may have been removed (and recreated) by its previous holder between our open and our
      # flock; then we hold a lock on an orphaned inode: start over.
      try:
        same = os.path.samestat(os.fstat(fd), os.stat(self.path))
      except FileNotFoundError:
        same = False
      if not same:
        os.close(fd)
        continue
      owner = self._read_owner()
      host = socket.gethostname()
      if owner is not None and owner[1] != host:
        # flock need not be shared between hosts on network filesystems: trust the recorded owner.
        os.close(fd)
        raise CheckpointError(
            f"Workdir {os.path.dirname(self.path)} is locked by process {owner[0]} on host {owner[1]}. If that "
            f"run is dead, delete {self.path}.")
      if owner is not None and owner[0] != os.getpid():
        logging.warning("Taking over the stale lock %s of process %d on %s, which is not running.", self.path,
                        owner[0], owner[1])
      os.ftruncate(fd, 0)
      os.pwrite(fd, f"{os.getpid()} {host}\n".encode(), 0)
      os.fsync(fd)
      self._fd = fd
      self.held = True
      return

  def _in_use_message(self, owner: Optional[tuple[int, str]]) -> str:
    who = f"process {owner[0]} on {owner[1]}" if owner is not None else "another process"
    return (f"Workdir {os.path.dirname(self.path)} is in use by {who} (lock {self.path}). Stop that run or "
            "choose another --workdir.")

  def _acquire_by_pid(self) -> None:
    """Fallback without flock: exclusive creation, taking over the file of a dead pid."""
    host = socket.gethostname()
    while True:
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        owner = self._read_owner(wait=True)
        if owner is not None and owner[1] == host and _pid_alive(owner[0]) and owner[0] != os.getpid():
          raise CheckpointError(self._in_use_message(owner)) from None
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

  def _read_owner(self, wait: bool = False) -> Optional[tuple[int, str]]:
    """(pid, host) recorded in the lock file; with `wait`, gives a new holder up to 1 s to write it."""
    deadline = time.time() + (1.0 if wait else 0.0)
    while True:
      try:
        with open(self.path) as f:
          pid, host = f.read().split()[:2]
        return int(pid), host
      except (OSError, ValueError):
        if time.time() >= deadline:
          return None
        time.sleep(0.02)

  def release(self) -> None:
    if not self.held:
      return
    try:
      os.remove(self.path)  # while still locked: a waiting process then sees a different inode and retries
    except FileNotFoundError:
      pass
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None
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
