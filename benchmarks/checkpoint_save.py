"""Checkpoint save time of a config's full training state, with and without the integrity checks.

  python benchmarks/checkpoint_save.py [--config configs/cifar10_biva.py] [--ema_decay 0.999] [--repeats 2]
      [--dir /tmp/ckpt_bench]

Builds the config's TrainState with random float32 values (no model init: the save cost does not depend on
the values), then times `hvaeood.checkpoints.save` (orbax save plus the integrity work) and a bare orbax save of
the same state, and prints one JSON line: state bytes, seconds of each (median of --repeats), and the parts of
the integrity work (`hvaeood.integrity`) measured on their own: the state checksum and the file manifest that a
save adds, and the file verification that a restore adds. TF-free.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hvaeood  # noqa: E402

hvaeood.set_xla_cpu_defaults()  # before JAX starts its CPU backend

import jax  # noqa: E402
import numpy as np  # noqa: E402

import throughput  # noqa: E402


def random_state(config):
  from hvaeood import state as state_lib  # pylint: disable=import-outside-toplevel
  abstract = state_lib.abstract_train_state(config)
  rng = np.random.default_rng(0)

  def fill(leaf):
    if np.issubdtype(leaf.dtype, np.floating):
      return jax.device_put(rng.standard_normal(leaf.shape, dtype=np.float32).astype(leaf.dtype))
    return jax.device_put(np.zeros(leaf.shape, leaf.dtype))
  return jax.tree_util.tree_map(fill, abstract)


def integrity_parts(state, step_dir: str, repeats: int) -> dict:
  """Seconds (median of `repeats`) of each part of the integrity work, on a saved checkpoint's `step_dir`."""
  from hvaeood import integrity  # pylint: disable=import-outside-toplevel
  parts = {"state_checksum_s": lambda: integrity.state_checksum(state),
           "write_manifest_s": lambda: integrity.write_manifest(step_dir),
           "verify_files_s": lambda: integrity.verify_files(step_dir)}
  out = {}
  for name, fn in parts.items():
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t0)
    out[name] = statistics.median(times)
  return out


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default="configs/cifar10_biva.py")
  ap.add_argument("--ema_decay", type=float, default=0.999, help="keep an EMA (part of the saved state)")
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--dir", default="/tmp/hvaeood_ckpt_bench")
  args = ap.parse_args(argv)
  from hvaeood import checkpoints as ckpt  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  config = throughput.load_config(args.config)
  config.optim.ema_decay = args.ema_decay
  state = random_state(config)
  nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))
  result = {"config": args.config, "ema": args.ema_decay > 0, "state_gb": nbytes / 1e9,
            "leaves": len(jax.tree_util.tree_leaves(state))}
  shutil.rmtree(args.dir, ignore_errors=True)
  meta = {"format_version": ckpt.FORMAT_VERSION, "config": "{}", "step": 0}
  with_checks, bare, step = [], [], 0
  for _ in range(args.repeats):
    step += 1
    m = ckpt.make_manager(os.path.join(args.dir, "checked"), keep=1)
    t0 = time.perf_counter()
    ckpt.save(m, step, state, dict(meta, step=step))
    m.wait_until_finished()
    with_checks.append(time.perf_counter() - t0)
    m = ckpt.make_manager(os.path.join(args.dir, "bare"), keep=1)
    t0 = time.perf_counter()
    m.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
           force=True)
    m.wait_until_finished()
    bare.append(time.perf_counter() - t0)
  result["save_with_integrity_s"] = statistics.median(with_checks)
  result["save_orbax_only_s"] = statistics.median(bare)
  # The save already ran the checksum's computation once (compiled), so these time the work, not compiling it.
  result.update(integrity_parts(state, os.path.join(args.dir, "checked", str(step)), args.repeats))
  shutil.rmtree(args.dir, ignore_errors=True)
  print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}), flush=True)
  return result


if __name__ == "__main__":
  main()
