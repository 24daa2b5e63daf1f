"""Shared command-line plumbing: user errors become one clear line on stderr and exit code 2."""

from __future__ import annotations

import logging
import sys
from typing import Callable

USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, NotADirectoryError, KeyError)


def user_error_types():
  from hvaeood.checkpoints import CheckpointError  # pylint: disable=import-outside-toplevel
  from hvaeood.train import TrainingError  # pylint: disable=import-outside-toplevel
  return USER_ERRORS + (CheckpointError, TrainingError)


def run_guarded(fn: Callable[[], object]) -> object:
  """Runs `fn`; a user-caused error prints `error: <message>` and exits with status 2."""
  try:
    return fn()
  except user_error_types() as e:  # pylint: disable=catching-non-exception
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, KeyError):
      msg = f"unknown key {e}"
    logging.debug("user error", exc_info=True)
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)
