"""Checkpoint save and restore time of a config's full training state: ours (format 2, the small leaves packed into
one array per dtype, with the integrity checks) against orbax alone on the state's tree of arrays (format 1's
layout, without checks).

  python benchmarks/checkpoint_save.py [--config configs/cifar10_biva.py] [--ema_decay 0.999] [--repeats 2]
      [--dir /tmp/ckpt_bench]

Builds the config's TrainState with random float32 values (no model init: the cost does not depend on the
values), then times `hvaeood.checkpoints.save` and `restore` and a bare orbax save and restore of the tree, and
prints one JSON line: state bytes and leaves, wall and CPU seconds of each (median of --repeats; the first
repeat includes any compilation), and the integrity parts on their own: the state item's checksums and the file
manifest that a save adds, and the file verification that a restore adds. TF-free.
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


def timed(fn) -> tuple:
  """(wall, CPU) seconds of fn()."""
  w, c = time.perf_counter(), time.process_time()
  fn()
  return time.perf_counter() - w, time.process_time() - c


def integrity_parts(item, step_dir: str, repeats: int) -> dict:
  """Wall seconds (median of `repeats`) of each part of the integrity work, on a saved checkpoint's `step_dir`."""
  from hvaeood import integrity  # pylint: disable=import-outside-toplevel
  parts = {"state_checksums_s": lambda: integrity.item_checksums(item),
           "write_manifest_s": lambda: integrity.write_manifest(step_dir),
           "verify_files_s": lambda: integrity.verify_files(step_dir)}
  return {name: statistics.median(timed(fn)[0] for _ in range(repeats)) for name, fn in parts.items()}


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default="configs/cifar10_biva.py")
  ap.add_argument("--ema_decay", type=float, default=0.999, help="keep an EMA (part of the saved state)")
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--dir", default="/tmp/hvaeood_ckpt_bench")
  args = ap.parse_args(argv)
  from hvaeood import checkpoints as ckpt  # pylint: disable=import-outside-toplevel
  from hvaeood import state as state_lib  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  config = throughput.load_config(args.config)
  config.optim.ema_decay = args.ema_decay
  state = random_state(config)
  abstract = state_lib.abstract_train_state(config)
  nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))
  result = {"config": args.config, "ema": args.ema_decay > 0, "state_gb": nbytes / 1e9,
            "leaves": len(jax.tree_util.tree_leaves(state))}
  shutil.rmtree(args.dir, ignore_errors=True)
  meta = {"config": "{}", "step": 0}
  ours, tree = os.path.join(args.dir, "ours"), os.path.join(args.dir, "tree")
  times: dict = {k: [] for k in ("save", "save_tree_orbax_only", "restore", "restore_tree_orbax_only")}
  for step in range(1, args.repeats + 1):
    m = ckpt.make_manager(ours, keep=1)
    times["save"].append(timed(lambda: ckpt.save(m, step, state, dict(meta, step=step))))
    times["restore"].append(timed(lambda: jax.block_until_ready(ckpt.restore(m, step, abstract)[0])))
    m = ckpt.make_manager(tree, keep=1)
    tree_save = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    tree_restore = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
    times["save_tree_orbax_only"].append(timed(lambda: m.save(step, args=tree_save, force=True)))
    times["restore_tree_orbax_only"].append(
        timed(lambda: jax.block_until_ready(m.restore(step, args=tree_restore)["state"])))
  for name, pairs in times.items():
    result[f"{name}_s"] = statistics.median(w for w, _ in pairs)
    result[f"{name}_cpu_s"] = statistics.median(c for _, c in pairs)
  item, _, own = ckpt.pack_state(state)
  result["own_arrays"] = len(own)
  result.update(integrity_parts(item, os.path.join(ours, str(args.repeats)), args.repeats))
  shutil.rmtree(args.dir, ignore_errors=True)
  print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}), flush=True)
  return result


if __name__ == "__main__":
  main()
