"""`import hvaeood` sets its one XLA:CPU default, and only where asked and known to be safe."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def _flags_after_import(**env_over) -> str:
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "HVAEOOD_XLA_CPU_DEFAULTS")}
  env.update(env_over)
  out = subprocess.run([sys.executable, "-c", "import os, hvaeood; print(repr(os.environ.get('XLA_FLAGS')))"],
                       cwd=ROOT, env=env, capture_output=True, text=True, check=True)
  return eval(out.stdout.strip())  # pylint: disable=eval-used


def _checked_jaxlib() -> bool:
  import hvaeood  # pylint: disable=import-outside-toplevel
  return hvaeood._jaxlib_version() in hvaeood._CHECKED_JAXLIB  # pylint: disable=protected-access


@pytest.mark.skipif(not _checked_jaxlib(), reason="the default is only set for jaxlib releases known to have the flag")
def test_default_added_and_other_flags_kept():
  assert _flags_after_import() == f"{FLAG}="
  assert _flags_after_import(XLA_FLAGS="--xla_force_host_platform_device_count=2") == (
      f"--xla_force_host_platform_device_count=2 {FLAG}=")


def test_opt_out_and_explicit_setting_are_respected():
  assert _flags_after_import(HVAEOOD_XLA_CPU_DEFAULTS="0") is None
  assert _flags_after_import(HVAEOOD_XLA_CPU_DEFAULTS="0", XLA_FLAGS="--a=1") == "--a=1"
  assert _flags_after_import(XLA_FLAGS=f"{FLAG}=ynn") == f"{FLAG}=ynn"
