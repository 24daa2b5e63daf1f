"""The lock that keeps two training processes out of one workdir (WORKDIR/.lock, flock'ed, naming its owner)."""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from typing import Optional

from hvaeood.errors import CheckpointError

LOCK_FILE = ".lock"


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
