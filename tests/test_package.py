"""`import hvaeood` changes no process-wide state; `hvaeood.set_xla_cpu_defaults()` sets its one XLA:CPU default,
only where asked and known to be safe; the package's imports follow the layers of docs/design.md, without a cycle."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAG = "--xla_cpu_experimental_ynn_fusion_type"

_AFTER = ("import os, sys, logging, hvaeood{imports}{call}; "
          "print(repr((os.environ.get('XLA_FLAGS'), sys.excepthook is sys.__excepthook__, "
          "sys.unraisablehook is sys.__unraisablehook__, len(logging.getLogger('asyncio').filters))))")
MODULES = ("bounds", "checkpoints", "cli", "datasets_info", "devices", "distributions", "errors", "evaluate",
           "image_sources", "integrity", "io_utils", "layers", "loading", "logging_utils", "models", "models.biva",
           "onednn",
           "detector", "models.blocks", "models.hvae", "ood_metrics", "ood_scores", "plots", "run_control", "schedules",
           "scoring", "state", "train", "workdir_lock")


def _after(call: bool, imports: bool = False, **env_over):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "HVAEOOD_XLA_CPU_DEFAULTS")}
  env.update(env_over)
  code = _AFTER.format(imports="".join(f"; import hvaeood.{m}" for m in MODULES) if imports else "",
                       call="; hvaeood.set_xla_cpu_defaults()" if call else "")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
  return eval(out.stdout.strip().splitlines()[-1])  # pylint: disable=eval-used


def _checked_jaxlib() -> bool:
  import hvaeood  # pylint: disable=import-outside-toplevel
  return hvaeood._jaxlib_version() in hvaeood._CHECKED_JAXLIB  # pylint: disable=protected-access


def test_importing_every_module_changes_no_process_wide_state():
  assert _after(call=False, imports=True) == (None, True, True, 0)
  assert _after(call=False, imports=True, XLA_FLAGS="--a=1")[0] == "--a=1"


@pytest.mark.skipif(not _checked_jaxlib(), reason="the default is only set for jaxlib releases known to have the flag")
def test_default_added_and_other_flags_kept():
  assert _after(call=True)[0] == f"{FLAG}=reduce"
  assert _after(call=True, XLA_FLAGS="--xla_force_host_platform_device_count=2")[0] == (
      f"--xla_force_host_platform_device_count=2 {FLAG}=reduce")


def test_opt_out_and_explicit_setting_are_respected():
  assert _after(call=True, HVAEOOD_XLA_CPU_DEFAULTS="0")[0] is None
  assert _after(call=True, HVAEOOD_XLA_CPU_DEFAULTS="0", XLA_FLAGS="--a=1")[0] == "--a=1"
  assert _after(call=True, XLA_FLAGS=f"{FLAG}=ynn")[0] == f"{FLAG}=ynn"


# ---------------------------------------------------------------------------------------------------------------
# The import graph (read from the sources by scripts/code_report.py; function-local imports included)

def _code_report():
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location("code_report", os.path.join(ROOT, "scripts", "code_report.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


# docs/design.md's layers, lowest first: a module may import only modules of lower layers.
LAYERS = (
    ("hvaeood.onednn",),
    ("hvaeood.errors", "hvaeood.io_utils", "hvaeood.datasets_info", "hvaeood.schedules",
     "hvaeood.devices", "hvaeood.run_control", "hvaeood.logging_utils", "hvaeood.ood_metrics", "hvaeood.ood_scores",
     "hvaeood.layers", "hvaeood.data_import"),
    ("hvaeood.distributions", "hvaeood.plots", "hvaeood.integrity", "hvaeood.workdir_lock",
     "hvaeood.input_pipeline", "hvaeood.image_sources"),
    ("hvaeood.models.blocks", "hvaeood.checkpoints"),
    ("hvaeood.models.hvae", "hvaeood.models.biva"),
    ("hvaeood.models",),
    ("hvaeood.bounds",),
    ("hvaeood.scoring",),
    ("hvaeood.state",),
    ("hvaeood.loading",),
    ("hvaeood.train", "hvaeood.evaluate", "hvaeood.detector"),
    ("hvaeood.cli",),
    ("hvaeood",),  # the package's facade: `hvaeood.OODDetector`, imported on first use
)


def test_cycle_finder_finds_a_made_up_cycle():
  report = _code_report()
  assert report.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert report.cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycle():
  report = _code_report()
  assert report.cycles(report.import_graph()) == []


def test_every_module_imports_only_lower_layers():
  graph = _code_report().import_graph()
  rank = {m: i for i, group in enumerate(LAYERS) for m in group}
  assert set(graph) == set(rank), f"modules missing from LAYERS (docs/design.md): {set(graph) ^ set(rank)}"
  wrong = sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps if rank[d] >= rank[m])
  assert not wrong, f"imports against the layering: {wrong}"


def test_tensorflow_is_imported_only_by_the_input_modules():
  """image_sources imports tensorflow_datasets only inside the function that reads a tfds: source."""
  import ast  # pylint: disable=import-outside-toplevel
  found = set()
  for name, path in _code_report().modules().items():
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import)
               else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      if any(n.split(".")[0] in ("tensorflow", "tensorflow_datasets") for n in names):
        found.add(name)
  assert found == {"hvaeood.input_pipeline", "hvaeood.data_import", "hvaeood.image_sources"}


def test_only_the_input_modules_and_the_metric_writers_start_tensorflow():
  """TensorFlow (also imported by CLU's writers) loads only with input_pipeline and logging_utils."""
  lazy = [m for m in MODULES if m != "logging_utils"] + ["data_import"]  # MODULES has no input_pipeline
  code = "; ".join(f"import hvaeood.{m}" for m in lazy) + "; import sys; print('tensorflow' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
  assert out.stdout.strip().splitlines()[-1] == "False"


# ---------------------------------------------------------------------------------------------------------------
# evaluate.py's TensorFlow without Keras (`cli.tensorflow_without_keras`)


def test_tensorflow_without_keras_keeps_tf_data_and_leaves_keras_out():
  import importlib.util  # pylint: disable=import-outside-toplevel
  if importlib.util.find_spec("tf_keras") is not None:
    pytest.skip("tf_keras is installed: TensorFlow would import it instead, so the launcher leaves Keras alone")
  env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
  code = ("import os, sys; from hvaeood import cli; s = cli.tensorflow_without_keras(); import tensorflow as tf; "
          "print(repr((s, os.environ.get('TF_USE_LEGACY_KERAS'), 'keras' in sys.modules, 'sklearn' in sys.modules, "
          "int(tf.data.Dataset.range(5).map(lambda v: v * v).reduce(tf.constant(0, tf.int64), lambda a, b: a + b)))))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
  assert eval(out.stdout.strip().splitlines()[-1]) == (True, "1", False, False, 30)  # pylint: disable=eval-used


def test_tensorflow_without_keras_respects_the_user_and_an_imported_tensorflow(monkeypatch):
  from hvaeood import cli  # pylint: disable=import-outside-toplevel
  for value in ("0", "1"):
    environ = {"TF_USE_LEGACY_KERAS": value}
    assert not cli.tensorflow_without_keras(environ) and environ == {"TF_USE_LEGACY_KERAS": value}
  monkeypatch.setitem(sys.modules, "tensorflow", object())  # already imported: too late to change anything
  environ = {}
  assert not cli.tensorflow_without_keras(environ) and environ == {}
