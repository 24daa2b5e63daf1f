"""Metric writing: TensorBoard event files (when TensorFlow is importable) and a JSON-lines log, process 0 only."""

from __future__ import annotations

import json
import logging
import os
from typing import Mapping

import numpy as np


class MetricWriter:
  """Writes scalars and images to WORKDIR/tensorboard and scalars to WORKDIR/metrics.jsonl."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    if not enabled:
      return
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
    try:
      from flax.metrics import tensorboard  # pylint: disable=import-outside-toplevel
      self._tb = tensorboard.SummaryWriter(os.path.join(workdir, "tensorboard"))
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("TensorBoard logging is off (%s); metrics go to metrics.jsonl only.", e)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.scalar(k, float(v), int(step))

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    if not self.enabled or self._tb is None:
      return
    for k, v in images.items():
      v = np.asarray(v)
      n = v.shape[0]
      cols = int(np.ceil(np.sqrt(n)))
      rows = -(-n // cols)
      pad = np.zeros((rows * cols - n,) + v.shape[1:], v.dtype)
      grid = np.concatenate([v, pad]).reshape(rows, cols, *v.shape[1:])
      grid = grid.transpose(0, 2, 1, 3, 4).reshape(rows * v.shape[1], cols * v.shape[2], v.shape[3])
      self._tb.image(k, np.clip(grid, 0, 1), int(step))

  def flush(self) -> None:
    if self._jsonl is not None:
      self._jsonl.flush()
    if self._tb is not None:
      self._tb.flush()


class _LibraryNoiseFilter(logging.Filter):
  """Drops INFO records of orbax/tensorflow_datasets internals; keeps warnings and our own messages."""

  NOISY = ("orbax", "tensorflow_datasets", "etils", "jax/_src")

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not any(n in record.pathname for n in self.NOISY)


def quiet_library_logs() -> None:
  """INFO logging for the run's own progress lines, without the per-file chatter of orbax and tfds."""
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  absl_logging.set_verbosity(absl_logging.INFO)
  f = _LibraryNoiseFilter()
  absl_logging.get_absl_handler().addFilter(f)
  logging.getLogger().addFilter(f)
  for h in logging.getLogger().handlers:
    h.addFilter(f)
