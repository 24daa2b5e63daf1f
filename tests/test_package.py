"""`import hvaeood` changes no process-wide state; `hvaeood.set_xla_cpu_defaults()` sets its one XLA:CPU default,
only where asked and known to be safe."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAG = "--xla_cpu_experimental_ynn_fusion_type"

_AFTER = ("import os, sys, logging, hvaeood{imports}{call}; "
          "print(repr((os.environ.get('XLA_FLAGS'), sys.excepthook is sys.__excepthook__, "
          "sys.unraisablehook is sys.__unraisablehook__, len(logging.getLogger('asyncio').filters))))")
MODULES = ("bounds", "checkpoints", "cli", "devices", "distributions", "evaluate", "integrity", "io_utils", "layers",
           "loading", "logging_utils", "models", "ood_metrics", "plots", "run_control", "schedules", "scoring", "state",
           "train", "workdir_lock")


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
  assert _after(call=True)[0] == f"{FLAG}="
  assert _after(call=True, XLA_FLAGS="--xla_force_host_platform_device_count=2")[0] == (
      f"--xla_force_host_platform_device_count=2 {FLAG}=")


def test_opt_out_and_explicit_setting_are_respected():
  assert _after(call=True, HVAEOOD_XLA_CPU_DEFAULTS="0")[0] is None
  assert _after(call=True, HVAEOOD_XLA_CPU_DEFAULTS="0", XLA_FLAGS="--a=1")[0] == "--a=1"
  assert _after(call=True, XLA_FLAGS=f"{FLAG}=ynn")[0] == f"{FLAG}=ynn"
