"""Shared command-line plumbing: user errors become one clear line on stderr and exit code 2.

* `run_guarded(fn)` runs a tool's body: user errors (bad values, paths, checkpoints, a run that cannot go on)
  print `error: <message>` and exit with status 2; anything else is a bug and keeps its traceback.
* `flags_parser(argv)` is an `app.run(main, flags_parser=...)` replacement for absl's default: a flag that does
  not parse (including a `--config.<field>` override naming a field the config lacks, or a config file that does
  not load) prints one `error: ...` line and exits with status 2 instead of a traceback or absl's status 1.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
import warnings
from typing import Callable, Optional, Sequence

from absl import logging as absl_logging

from hvaeood.checkpoints import OrbaxFailedReadNoise
from hvaeood.errors import CheckpointError, TrainingError

USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, NotADirectoryError, KeyError)
# Other OSErrors caused by the user's paths or disk rather than by a bug.
USER_OS_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.ENOENT, errno.ENOTDIR, errno.EISDIR,
                  errno.EEXIST, errno.EDQUOT, errno.ENAMETOOLONG)


def user_error_types():
  return USER_ERRORS + (CheckpointError, TrainingError)


def _fail(msg: str) -> None:
  print(f"error: {msg}", file=sys.stderr, flush=True)
  sys.exit(2)


def _os_message(e: OSError) -> str:
  what = e.strerror or type(e).__name__
  where = f" ({e.filename})" if e.filename else ""
  return f"{what}{where}. Check the path, its permissions and the free disk space."


def _is_abandoned_orbax_read(exc_type, exc, tb) -> bool:
  """RuntimeError('Event loop is closed') raised in asyncio by a tensorstore read that completed after a failed
  orbax restore had closed its event loop (printed by a background thread; the restore failure is reported)."""
  if exc_type is not RuntimeError or str(exc) != "Event loop is closed":
    return False
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  return tb is not None and "asyncio" in tb.tb_frame.f_code.co_filename


def _quiet_abandoned_reads() -> None:
  """Filters those errors out of sys.excepthook and sys.unraisablehook, and asyncio's "never retrieved" tracebacks
  of the same abandoned reads, for the rest of the process (other errors print as before). Only the launchers call
  this, through `run_guarded`: such tracebacks can surface until the interpreter exits, after the tool returned."""
  if getattr(sys.unraisablehook, "_hvaeood_quiet", False):
    return
  previous_excepthook, previous_unraisablehook = sys.excepthook, sys.unraisablehook

  def excepthook(exc_type, exc, tb):
    if not _is_abandoned_orbax_read(exc_type, exc, tb):
      previous_excepthook(exc_type, exc, tb)

  def unraisablehook(unraisable):
    if not _is_abandoned_orbax_read(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback):
      previous_unraisablehook(unraisable)

  excepthook._hvaeood_quiet = unraisablehook._hvaeood_quiet = True  # pylint: disable=protected-access
  sys.excepthook, sys.unraisablehook = excepthook, unraisablehook
  logging.getLogger("asyncio").addFilter(OrbaxFailedReadNoise())


def run_guarded(fn: Callable[[], object]) -> object:
  """Runs `fn`; a user-caused error prints `error: <message>` and exits with status 2."""
  _quiet_abandoned_reads()
  try:
    return fn()
  except user_error_types() as e:  # pylint: disable=catching-non-exception
    logging.debug("user error", exc_info=True)
    if isinstance(e, KeyError):
      msg = f"unknown key {e}"
    elif isinstance(e, OSError) and e.strerror and not str(e).startswith("[Errno"):
      msg = str(e).strip().splitlines()[0]
    elif isinstance(e, OSError) and e.strerror:
      msg = _os_message(e)
    else:
      msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    _fail(msg)
  except OSError as e:
    if e.errno not in USER_OS_ERRNOS:
      raise
    logging.debug("user error", exc_info=True)
    _fail(_os_message(e))


# ---------------------------------------------------------------------------------------------------------------
# Flag parsing


def flag_value(argv: Sequence[str], name: str) -> Optional[str]:
  """The value of `--name=V` or `--name V` in argv (the last one wins), else None."""
  value = None
  for i, a in enumerate(argv):
    if a.startswith(f"--{name}="):
      value = a.split("=", 1)[1]
    elif a == f"--{name}" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def _config_overrides(argv: Sequence[str], name: str) -> list[str]:
  out = []
  for a in argv:
    if a.startswith(f"--{name}.") or a.startswith(f"--no{name}."):
      out.append(a.split("=", 1)[0].split(".", 1)[1])
  return out


def _load_config(spec: str):
  """Loads `path[:variant]` like ml_collections.config_flags does; ValueError with a one-line reason."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  parts = spec.split(":", 1)
  path = parts[0]
  if not os.path.isfile(path):
    raise ValueError(f"Config file {path} does not exist. Pass --config PATH[:VARIANT], e.g. "
                     "--config configs/fashion_mnist_hvae.py:tiny.")
  try:
    module_spec = importlib.util.spec_from_file_location("_hvaeood_cli_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(*parts[1:])
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"Config {spec} does not load: {_last_error_line(str(e)) or type(e).__name__}") from None
  if not _is_config(config):
    raise ValueError(f"Config {spec} does not load: get_config() returned {type(config).__name__}.")
  return config


def _is_config(obj) -> bool:
  import ml_collections  # pylint: disable=import-outside-toplevel
  return isinstance(obj, (ml_collections.ConfigDict, dict))


def _last_error_line(text: str) -> str:
  """The `SomeError: message` line of a message that embeds a traceback (its last one), else the first line."""
  lines = [l.strip() for l in text.strip().splitlines() if l.strip()]
  for line in reversed(lines):
    m = re.match(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception)): (.*)$", line)
    if m:
      return m.group(2)
  return lines[0] if lines else ""


def _unknown_override(config, field_path: str, name: str) -> Optional[str]:
  """A message if `field_path` names no field of `config`, else None."""
  node, seen = config, name
  for part in field_path.split("."):
    keys = list(node.keys()) if _is_config(node) else None
    if keys is None:
      return (f"--{name}.{field_path} names no config field: {seen} is a value, not a section. Fix the name "
              "(see configs/common.py for every field).")
    if part not in keys:
      return (f"--{name}.{field_path} names no config field: {seen} has no field {part!r} (its fields: "
              f"{', '.join(sorted(keys))}). Fix the name; configs/common.py lists every field.")
    node, seen = node[part], f"{seen}.{part}"
  return None


def flag_error_message(argv: Sequence[str], error: BaseException, config_flag: str = "config") -> str:
  """One line for a flag-parsing failure: which flag, what is wrong, how to fix it."""
  spec = flag_value(argv, config_flag)
  overrides = _config_overrides(argv, config_flag)
  if spec is not None and (overrides or config_flag in str(error)):
    try:
      config = _load_config(spec)
    except ValueError as e:
      return str(e)
    for field_path in overrides:
      msg = _unknown_override(config, field_path, config_flag)
      if msg:
        return msg
  text = str(error).strip()
  first = text.splitlines()[0] if text else type(error).__name__
  m = re.match(r"^flag --(\w[\w.]*)=(.*?): (.*)$", first)
  detail = _last_error_line(text)
  if m and "must have a value other than None" in text:
    return f"--{m.group(1)} is required. Run with --helpshort to see the flags."
  if m:
    reason = detail if detail and detail != first else m.group(3)
    return (f"invalid value {m.group(2)!r} for --{m.group(1)}: {reason.rstrip('.')}. "
            "Run with --helpshort to see the flags.")
  text = (detail or first).rstrip()
  return f"{text}{'' if text.endswith('.') else '.'} Run with --helpshort to see the flags."


def flags_parser(argv: Sequence[str]):
  """absl `flags_parser` that turns any flag-parsing failure into `error: ...` and exit status 2."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  try:
    return flags.FLAGS(list(argv))
  except Exception as e:  # pylint: disable=broad-except
    _fail(flag_error_message(argv, e))


def check_config_loaded(config, spec: Optional[str]) -> None:
  """ValueError if a `DEFINE_config_file` value is the placeholder of a config file that failed to load."""
  if _is_config(config):
    return
  _load_config(spec or "")  # raises the one-line reason
  raise ValueError(f"Config {spec} does not load (get_config() returned {type(config).__name__}).")


class _LibraryNoiseFilter(logging.Filter):
  """Drops INFO records of orbax/tensorflow_datasets internals; keeps warnings and our own messages."""

  NOISY = ("orbax", "tensorflow_datasets", "etils", "jax/_src")

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not any(n in record.pathname for n in self.NOISY)


# jax's warning when XLA:CPU fails to serialize a program for the persistent compilation cache, as it does for
# every program with a oneDNN custom call (jaxlib 0.10.2).
UNCACHEABLE_ONEDNN_WARNING = r"Error writing persistent compilation cache entry for .*std::bad_alloc"


def tensorflow_without_keras(environ=None) -> bool:
  """Lets `import tensorflow` skip its eager import of Keras, for a launcher that uses TensorFlow for tf.data only.

  evaluate.py needs TensorFlow only for tf.data (the tfds pipelines), yet `import tensorflow` imports Keras 3's
  optimizers eagerly, and with them most of Keras and scikit-learn: about 3 of the 8-9 CPU seconds the import
  takes (benchmarks/README.md, "Issue 14, eleventh session"). TensorFlow skips that import when
  `TF_USE_LEGACY_KERAS=1` and the legacy `tf_keras` package is not installed, and then fails only where `tf.keras`
  is used. So this sets `TF_USE_LEGACY_KERAS=1` unless the environment already sets it, `tf_keras` is installed or
  TensorFlow is already imported. (train.py cannot: CLU's TensorBoard writer imports TensorBoard's hparams plugin,
  which subclasses `tf.keras.callbacks.Callback` when imported.) A launcher's choice, like
  `hvaeood.set_xla_cpu_defaults()`: call it before anything imports TensorFlow.

  Args:
    environ: the environment to change (default `os.environ`).

  Returns:
    Whether the variable was set.
  """
  environ = os.environ if environ is None else environ
  if "TF_USE_LEGACY_KERAS" in environ or "tensorflow" in sys.modules:
    return False
  import importlib.util  # pylint: disable=import-outside-toplevel
  if importlib.util.find_spec("tf_keras") is not None:
    return False  # TensorFlow would import the legacy Keras instead: no saving, and tf.keras would change
  environ["TF_USE_LEGACY_KERAS"] = "1"
  return True


def quiet_library_logs() -> None:
  """INFO logging for the run's own progress lines, without the per-file chatter of orbax and tfds (the launchers
  call it; it imports no TensorFlow, so a user error is reported before TensorFlow loads)."""
  absl_logging.set_verbosity(absl_logging.INFO)
  # XLA:CPU cannot serialize a program that calls oneDNN (`hvaeood.onednn`, the single-device CPU default): with
  # a persistent compilation cache set (JAX_COMPILATION_CACHE_DIR), jax would warn once per such program; they
  # are compiled in each run instead, and other programs are cached as usual.
  warnings.filterwarnings("ignore", message=UNCACHEABLE_ONEDNN_WARNING, category=UserWarning)
  f = _LibraryNoiseFilter()
  absl_logging.get_absl_handler().addFilter(f)
  logging.getLogger().addFilter(f)
  for h in logging.getLogger().handlers:
    h.addFilter(f)
