"""hvaeood: hierarchical VAEs for likelihood-based out-of-distribution detection, in JAX/Flax.

Importing the package (and its model and bound modules) does not import TensorFlow; only
`hvaeood.input_pipeline` and `hvaeood.data_import` do.

Importing it also sets one XLA:CPU default (see `_xla_cpu_defaults`), before JAX starts its backends.
"""

import os as _os

__version__ = "0.1.0"

_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def _jaxlib_version() -> tuple[int, int]:
  try:
    from importlib import metadata  # pylint: disable=import-outside-toplevel
    parts = metadata.version("jaxlib").split(".")
    return int(parts[0]), int(parts[1])
  except Exception:  # pylint: disable=broad-except
    return (0, 0)


# jaxlib releases in which the flag was checked to exist (XLA aborts on an unknown XLA_FLAGS entry).
_CHECKED_JAXLIB = ((0, 10),)


def _xla_cpu_defaults() -> None:
  """Runs XLA:CPU's convolutions and dots through its multi-threaded Eigen kernels instead of YNNPACK.

  On a 2-core CPU the YNNPACK convolutions of jaxlib 0.10 run on one thread; the Eigen ones use every core:
  training +19% and evaluation +66% images/s for the FashionMNIST model (benchmarks/README.md, change 6).
  Only the CPU backend reads the flag. It is added to `XLA_FLAGS` unless that already sets it, or the
  environment sets `HVAEOOD_XLA_CPU_DEFAULTS=0`; it only takes effect if JAX's CPU backend has not started yet
  (import hvaeood before running JAX computations). It is only added for the jaxlib releases in
  `_CHECKED_JAXLIB`, since XLA aborts on a flag it does not know.
  """
  if _os.environ.get("HVAEOOD_XLA_CPU_DEFAULTS", "1") == "0":
    return
  flags = _os.environ.get("XLA_FLAGS", "")
  if _YNN_FLAG in flags or _jaxlib_version() not in _CHECKED_JAXLIB:
    return
  _os.environ["XLA_FLAGS"] = f"{flags} {_YNN_FLAG}=".strip()


_xla_cpu_defaults()
