"""Files written so that a reader never sees half of one: the one atomic writer, and the writable-directory check.

Every output of a run (results, scores, plots, the run's config and summary, checkpoint manifests) is written by
`atomic_write`: into a temporary file in the target's directory, then `os.replace`d onto the target, so a crash
leaves the old file or the new one, never a truncated one, and no temporary behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Callable


def _umask() -> int:
  """The process's umask, read without changing it (Linux), else 0o022."""
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except OSError:
    pass
  return 0o022


def atomic_write(path, write: Callable[[str], None], *, fsync: bool = False) -> str:
  """Calls `write(tmp_path)`, then moves tmp_path onto `path` atomically (permissions as a plain open() gives).

  Args:
    path: the target file; its directory is created if needed.
    write: writes the whole content to the path it is given.
    fsync: flush the file to disk before the rename (for files that must survive a power loss).

  Returns:
    The target path.
  """
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
  os.close(fd)
  try:
    write(tmp)
    if fsync:
      with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise
  return path


def write_text(path, text: str, **kwargs) -> str:
  """`atomic_write` of a text file."""
  def write(tmp: str) -> None:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
  return atomic_write(path, write, **kwargs)


def write_json(path, obj: Any, **kwargs) -> str:
  """`atomic_write` of a JSON file (sorted keys, one space of indentation)."""
  return write_text(path, json.dumps(obj, indent=1, sort_keys=True), **kwargs)


def ensure_writable_dir(path: str, flag: str, purpose: str) -> str:
  """Creates directory `path` if needed and proves it writable; a ValueError naming `--flag` otherwise.

  Args:
    path: the directory.
    flag: the command-line flag that gave it (for the message).
    purpose: what goes there, e.g. "checkpoints, logs and images".

  Returns:
    The absolute path.
  """
  if not path:
    raise ValueError(f"--{flag} is empty: pass the directory for {purpose}.")
  path = os.path.abspath(path)
  try:
    os.makedirs(path, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=path, prefix=".write_probe.")
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    kind = "Workdir" if flag == "workdir" else "Output directory"
    raise ValueError(f"{kind} {path} is not writable ({e.strerror or type(e).__name__}). Pass a writable "
                     f"--{flag}.") from None
  return path
