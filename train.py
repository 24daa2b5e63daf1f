"""Trains a hierarchical VAE: `python train.py --config configs/fashion_mnist_hvae.py[:VARIANT] --workdir DIR`.

Config fields can be overridden on the command line, e.g. `--config.optim.lr=1e-3`. A run resumes from the
workdir's latest checkpoint automatically. User errors (a flag or config field that does not exist, an unwritable
workdir, a workdir in use by another run, ...) print one `error: ...` line and exit with status 2.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file, optionally with :variant.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and images.")
flags.mark_flags_as_required(["config", "workdir"])


def _check_workdir(workdir: str) -> None:
  """Creates the workdir if needed and proves it writable; a ValueError naming the fix otherwise."""
  from hvaeood import io_utils  # pylint: disable=import-outside-toplevel
  io_utils.ensure_writable_dir(workdir, "workdir", "checkpoints, logs and images, e.g. --workdir runs/fmnist")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  from hvaeood import cli  # pylint: disable=import-outside-toplevel

  def run():
    cli.check_config_loaded(_CONFIG.value, cli.flag_value(sys.argv, "config"))
    _check_workdir(_WORKDIR.value)
    from hvaeood import train  # pylint: disable=import-outside-toplevel
    return train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)

  cli.run_guarded(run)


if __name__ == "__main__":
  import hvaeood  # pylint: disable=g-import-not-at-top
  hvaeood.set_xla_cpu_defaults()  # before JAX starts its CPU backend
  from hvaeood import cli as _cli  # pylint: disable=g-import-not-at-top
  _cli.quiet_library_logs()
  app.run(main, flags_parser=_cli.flags_parser)
