"""The run's metric writers (CLU).

`create_writer(workdir)` gives CLU's default writer (a log line per write and TensorBoard event files in
WORKDIR/tensorboard) on process 0, plus WORKDIR/metrics.jsonl (one JSON object per write: the step and the
scalars), which scripts and tests read without TensorFlow; every other process only logs.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
from clu import metric_writers


class JsonlWriter(metric_writers.MetricWriter):
  """A CLU writer of scalars to a JSON-lines file (flushed after every write); other kinds are not written."""

  def __init__(self, path: str):
    self._f = open(path, "a", encoding="utf-8")  # pylint: disable=consider-using-with

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    self._f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n")
    self._f.flush()

  def write_summaries(self, step, values, metadata=None) -> None:
    del step, values, metadata

  def write_images(self, step, images) -> None:
    del step, images

  def write_videos(self, step, videos) -> None:
    del step, videos

  def write_audios(self, step, audios, *, sample_rate) -> None:
    del step, audios, sample_rate

  def write_texts(self, step, texts) -> None:
    del step, texts

  def write_histograms(self, step, arrays, num_buckets=None) -> None:
    del step, arrays, num_buckets

  def write_hparams(self, hparams) -> None:
    del hparams

  def flush(self) -> None:
    self._f.flush()

  def close(self) -> None:
    self._f.close()


def create_writer(workdir: str) -> metric_writers.MetricWriter:
  """CLU's default writer (+ metrics.jsonl) on process 0, logging only elsewhere (synchronous: the loop's
  scalars are already on the host when written)."""
  if jax.process_index() > 0:
    return metric_writers.create_default_writer(just_logging=True, asynchronous=False)
  default = metric_writers.create_default_writer(os.path.join(workdir, "tensorboard"), asynchronous=False)
  return metric_writers.MultiWriter([default, JsonlWriter(os.path.join(workdir, "metrics.jsonl"))])
