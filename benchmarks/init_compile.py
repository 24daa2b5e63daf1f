"""First-call cost of a config's jitted data-dependent init: `init_params` (every `v` cut from one normal draw,
`layers.one_draw`) against `model.init` alone (flax's draw per parameter, with a key of its own).

  python benchmarks/init_compile.py [--config configs/fashion_mnist_hvae.py:tiny] [--batch_size 16]
      [--conv_impl fast] [--repeats 2]

Each way runs in a fresh process (no persistent compilation cache), the two alternating, --repeats times; a
process jits the init, calls it once on a synthetic batch and reports that call's CPU and wall seconds (trace,
compile, run) and the backend compile seconds JAX reports. One JSON line per process, then one with the medians.
TF-free.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hvaeood  # noqa: E402

hvaeood.set_xla_cpu_defaults()  # before JAX starts its CPU backend

WAYS = ("one_draw", "per_parameter")


def first_call(args) -> dict:
  """This process: one way's init, jitted and called once."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import throughput  # pylint: disable=import-outside-toplevel
  from hvaeood import datasets_info, models  # pylint: disable=import-outside-toplevel
  from hvaeood import state as state_lib  # pylint: disable=import-outside-toplevel

  compile_s = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda name, secs, **kw: compile_s.append(secs) if name == "/jax/core/compile/backend_compile_duration"
      else None)
  config = throughput.load_config(args.config)
  throughput.set_conv(config, args.conv_impl)
  model = state_lib.model_for_config(config)
  batch = throughput.synthetic_batch(np.random.default_rng(0), args.batch_size,
                                     datasets_info.image_shape(config.data.name),
                                     config.model.likelihood == "bernoulli")
  rng = jax.random.PRNGKey(config.seed)
  if args.way == "one_draw":
    init = lambda b: models.init_params(model, rng, b)  # noqa: E731
  else:
    param_rng, sample_rng = jax.random.split(rng)  # as init_params splits it
    init = jax.jit(lambda b: model.init({"params": param_rng, "sample": sample_rng}, b, 0)["params"])
  w, c = time.perf_counter(), time.process_time()
  params = jax.block_until_ready(init(batch))
  cpu, wall = time.process_time() - c, time.perf_counter() - w
  return {"way": args.way, "config": args.config, "batch_size": args.batch_size,
          "leaves": len(jax.tree_util.tree_leaves(params)), "first_call_cpu_s": round(cpu, 2),
          "first_call_wall_s": round(wall, 2), "backend_compile_s": round(sum(compile_s), 2)}


def main(argv=None) -> dict:
  import throughput  # pylint: disable=import-outside-toplevel
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  throughput.add_first_call_args(ap)
  ap.add_argument("--way", choices=WAYS, help=argparse.SUPPRESS)  # set in the child processes
  args = ap.parse_args(argv)
  if args.way:
    row = first_call(args)
    print(json.dumps(row), flush=True)
    return row
  rows = throughput.alternate_fresh_processes(
      [sys.executable, os.path.abspath(__file__), "--config", args.config, "--batch_size", str(args.batch_size),
       "--conv_impl", args.conv_impl], "--way", WAYS, args.repeats)
  summary = {"config": args.config, "batch_size": args.batch_size, "repeats": args.repeats}
  for way in WAYS:
    for key in ("first_call_cpu_s", "backend_compile_s"):
      summary[f"{way}_{key}"] = round(statistics.median(r[key] for r in rows[way]), 2)
  print(json.dumps(summary), flush=True)
  return summary


if __name__ == "__main__":
  main()
