"""Loading a checkpoint for evaluation: a workdir's best or latest checkpoint, or one step directory, with the
config it was trained with, and clear errors for every way it can be unusable."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import ml_collections

from hvaeood import checkpoints as ckpt
from hvaeood import integrity
from hvaeood import state as state_lib
from hvaeood.errors import CheckpointError, CheckpointMismatchError


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
  if os.path.isdir(os.path.join(path, ckpt.CHECKPOINT_DIR)) or os.path.isdir(os.path.join(path, ckpt.BEST_DIR)):
    if which is None:
      which = "best" if _steps_in(os.path.join(path, ckpt.BEST_DIR)) else "latest"
    sub = os.path.join(path, ckpt.CHECKPOINT_DIR if which == "latest" else ckpt.BEST_DIR)
    steps = _steps_in(sub)
    if not steps:
      raise CheckpointError(f"No {which} checkpoint under {sub}: the run saved none yet. Train longer, or "
                            f"use --which={'best' if which == 'latest' else 'latest'}.")
    return sub, steps[-1], which
  raise CheckpointError(f"{path} is neither a training workdir (with {ckpt.CHECKPOINT_DIR}/ or {ckpt.BEST_DIR}/) "
                        "nor a checkpoint step directory (a number with a state/ folder inside).")


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
  directory, step, chosen = find_step_dir(path, which)
  manager = ckpt.make_manager(directory, keep=10**6, read_only=True)
  hint = _earlier_hint(directory, step)
  try:
    meta = ckpt.restore_meta(manager, step)
  except CheckpointError as e:
    raise CheckpointError(f"Checkpoint {directory}/{step} is corrupted: {e}. {hint}") from e
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"Checkpoint {directory}/{step} is unreadable ({type(e).__name__}); it may be "
                          f"truncated or corrupted. {hint}") from e
  if meta.get("format_version") not in ckpt.READABLE_FORMATS:
    raise CheckpointError(f"Checkpoint {directory}/{step} has format version {meta.get('format_version')} but "
                          f"this code reads versions {', '.join(map(str, ckpt.READABLE_FORMATS))}: evaluate it "
                          "with the version of hvaeood that wrote it.")
  config = ml_collections.ConfigDict(json.loads(meta["config"]))
  try:
    abstract = state_lib.abstract_train_state(config)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"The config stored in {directory}/{step} does not build a model with this code "
                          f"({ckpt.short_error(e)}).") from e
  try:
    state, _ = ckpt.restore(manager, step, abstract)
  except CheckpointMismatchError as e:
    raise CheckpointError(f"Checkpoint {directory}/{step} does not match the model its stored config builds with "
                          f"this code: {e}. It was written by another version of the code (or its stored config "
                          "was edited); evaluate it with that version.") from e
  except CheckpointError as e:
    raise CheckpointError(f"Checkpoint {directory}/{step} is corrupted: {e}. {hint}") from e
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"Checkpoint {directory}/{step} could not be restored against the model its stored "
                          f"config builds ({ckpt.short_error(e)[:160]}): it is corrupted, or its config does not "
                          f"match this code. {hint}") from e
  try:
    integrity.check_finite(state)
  except CheckpointError as e:
    raise CheckpointError(f"Checkpoint {directory}/{step}: {e}. {hint}") from e
  ema = use_ema and state.ema_params is not None
  return LoadedCheckpoint(config, state.ema_params if ema else state.params, step,
                          os.path.join(directory, str(step)), meta, "EMA" if ema else "raw", chosen)
