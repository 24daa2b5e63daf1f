"""hvaeood: hierarchical VAEs for likelihood-based out-of-distribution detection, in JAX/Flax.

Importing the package (or any of its modules) changes no process-wide state: no environment variable, XLA flag,
logging filter or interpreter hook. TensorFlow is imported only by `hvaeood.input_pipeline` and
`hvaeood.data_import`. Launchers (train.py, evaluate.py, the benchmarks) call `set_xla_cpu_defaults()` first.
"""

import os as _os

__version__ = "0.1.0"
__all__ = ["OODDetector", "set_xla_cpu_defaults"]


def __getattr__(name: str):
  """`hvaeood.OODDetector`, imported on first use (so that `import hvaeood` stays light)."""
  if name == "OODDetector":
    from hvaeood.detector import OODDetector  # pylint: disable=import-outside-toplevel
    return OODDetector
  raise AttributeError(f"module 'hvaeood' has no attribute {name!r}")

_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
_YNN_KINDS = "reduce"  # the ops XLA:CPU hands to YNNPACK; convolutions and dots stay on Eigen

# jaxlib releases in which the flag was checked to exist (XLA aborts on an unknown XLA_FLAGS entry).
_CHECKED_JAXLIB = ((0, 10),)


def _jaxlib_version() -> tuple[int, int]:
  try:
    from importlib import metadata  # pylint: disable=import-outside-toplevel
    parts = metadata.version("jaxlib").split(".")
    return int(parts[0]), int(parts[1])
  except Exception:  # pylint: disable=broad-except
    return (0, 0)


def set_xla_cpu_defaults(environ=None) -> bool:
  """Runs XLA:CPU's convolutions and dots through its multi-threaded Eigen kernels, its reductions through YNNPACK.

  On a 2-core CPU the YNNPACK convolutions of jaxlib 0.10 run on one thread and the Eigen ones on every core
  (benchmarks/README.md, change 6), while without YNNPACK XLA splits every large reduction (a bias gradient, a KL
  sum) into a reduce-window that runs ~30x slower than YNNPACK's reduce (change 8). Only the CPU backend reads
  the flag. It is added to `XLA_FLAGS` unless that
  already sets it or the environment sets `HVAEOOD_XLA_CPU_DEFAULTS=0`, and only for the jaxlib releases in
  `_CHECKED_JAXLIB` (XLA aborts on a flag it does not know). Call it before JAX starts its CPU backend (before
  the first computation); the launchers do, as their first statement.

  Args:
    environ: the environment to change (default `os.environ`; e.g. a subprocess's environment dict).

  Returns:
    Whether the flag was added.
  """
  environ = _os.environ if environ is None else environ
  if environ.get("HVAEOOD_XLA_CPU_DEFAULTS", "1") == "0":
    return False
  flags = environ.get("XLA_FLAGS", "")
  if _YNN_FLAG in flags or _jaxlib_version() not in _CHECKED_JAXLIB:
    return False
  environ["XLA_FLAGS"] = f"{flags} {_YNN_FLAG}={_YNN_KINDS}".strip()
  return True
