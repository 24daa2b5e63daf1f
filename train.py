"""Trains a hierarchical VAE: `python train.py --config configs/fashion_mnist_hvae.py[:VARIANT] --workdir DIR`.

Config fields can be overridden on the command line, e.g. `--config.optim.lr=1e-3`. A run resumes from the
workdir's latest checkpoint automatically.
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file, optionally with :variant.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and images.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  from hvaeood import cli  # pylint: disable=import-outside-toplevel
  cli.run_guarded(lambda: __import__("hvaeood.train", fromlist=["train"]).train_and_evaluate(
      _CONFIG.value, _WORKDIR.value))


if __name__ == "__main__":
  from hvaeood.logging_utils import quiet_library_logs  # pylint: disable=g-import-not-at-top
  quiet_library_logs()
  app.run(main)
