"""XLA:CPU's backend (LLVM) optimisation level: first-call cost, step time and float32 accuracy, level 0 against
XLA's default (the test suite runs at level 0: tests/helpers.py, `set_test_xla_flags`).

  python benchmarks/codegen_level.py [--config configs/fashion_mnist_hvae.py:tiny] [--batch_size 16]
      [--conv_impl fast] [--steps 20] [--repeats 2]

One process writes the initial parameters and a synthetic batch; then, each in a fresh process without a
persistent compilation cache, the levels alternate --repeats times. A process reports the CPU seconds of the
jitted init's first call and of the train step's first call (trace, compile, one run), the wall seconds of
--steps further steps, and the forward pass on the saved parameters (one latent draw, a fixed key) against the
same pass in float64 (`jax_enable_x64`, parameters and batch cast): the largest relative error of log p(x|z) and
of each layer's KL per example. One JSON line per process, then one with the medians. TF-free.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LEVELS = ("default", "0")


def _setup(args):
  """Config, model and the JAX modules, after the XLA flags of this process's level."""
  flags = os.environ.get("XLA_FLAGS", "")
  if args.level not in (None, "default"):
    os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level={int(args.level)}".strip()
  import hvaeood  # pylint: disable=import-outside-toplevel
  hvaeood.set_xla_cpu_defaults()
  import jax  # pylint: disable=import-outside-toplevel
  if args.role == "f64":
    jax.config.update("jax_enable_x64", True)
  import throughput  # pylint: disable=import-outside-toplevel
  from hvaeood import state as state_lib  # pylint: disable=import-outside-toplevel
  config = throughput.load_config(args.config)
  throughput.set_conv(config, args.conv_impl)
  return jax, config, state_lib.model_for_config(config)


def _forward(jax, model, params, x):
  import numpy as np  # pylint: disable=import-outside-toplevel
  out = jax.jit(lambda p, a: model.apply({"params": p}, a, 0, rngs={"sample": jax.random.PRNGKey(5)}))(params, x)
  kls = [np.asarray(k, np.float64).reshape(k.shape[1], -1).sum(-1) for k in out.kl_elem]
  return np.asarray(out.log_px[0], np.float64), kls


def _load(jax, model, path, dtype):
  import numpy as np  # pylint: disable=import-outside-toplevel
  d = np.load(path)
  x = d["x"]
  shapes = jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0), "sample": jax.random.PRNGKey(1)},
                                             x, 0))["params"]
  tree = jax.tree_util.tree_structure(shapes)
  params = jax.tree_util.tree_unflatten(tree, [d[f"p{i}"].astype(dtype) for i in range(tree.num_leaves)])
  return params, x.astype(dtype)


def child(args) -> dict:
  jax, config, model = _setup(args)
  import numpy as np  # pylint: disable=import-outside-toplevel
  import throughput  # pylint: disable=import-outside-toplevel
  from hvaeood import datasets_info, models  # pylint: disable=import-outside-toplevel
  if args.role == "params":
    x = throughput.synthetic_batch(np.random.default_rng(0), args.batch_size,
                                   datasets_info.image_shape(config.data.name), config.model.likelihood == "bernoulli")
    params = models.init_params(model, jax.random.PRNGKey(config.seed), x)
    leaves = jax.tree_util.tree_leaves(params)
    np.savez(args.work, x=np.asarray(x), **{f"p{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)})
    return {}
  if args.role == "f64":
    params, x = _load(jax, model, args.work, np.float64)
    log_px, kls = _forward(jax, model, params, x)
    np.savez(args.work + ".f64.npz", log_px=log_px, **{f"kl{i}": k for i, k in enumerate(kls)})
    return {}
  from hvaeood import devices as hdev  # pylint: disable=import-outside-toplevel
  from hvaeood import state as state_lib  # pylint: disable=import-outside-toplevel
  from jax.sharding import Mesh, NamedSharding, PartitionSpec  # pylint: disable=import-outside-toplevel
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  params32, x = _load(jax, model, args.work, np.float32)
  c = time.process_time()
  state = jax.block_until_ready(state_lib.init_state(config, model, x, mesh))
  init_cpu = time.process_time() - c
  step = state_lib.jit_train_step(config, model, 1000, mesh)
  batch = hdev.to_global(x, NamedSharding(mesh, PartitionSpec("data")))
  c = time.process_time()
  state, m = step(state, batch)
  jax.block_until_ready(m)
  step_cpu = time.process_time() - c
  w = time.perf_counter()
  for _ in range(args.steps):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  steps_wall = time.perf_counter() - w
  log_px, kls = _forward(jax, model, params32, x)
  ref = np.load(args.work + ".f64.npz")
  rel = lambda a, r: float(np.max(np.abs(a - r) / np.maximum(np.abs(r), 1.0)))  # noqa: E731
  return {"level": args.level, "config": args.config, "batch_size": args.batch_size,
          "init_first_call_cpu_s": round(init_cpu, 2), "step_first_call_cpu_s": round(step_cpu, 2),
          f"{args.steps}_steps_wall_s": round(steps_wall, 3),
          "log_px_max_rel_err_vs_f64": float(f"{rel(log_px, ref['log_px']):.2e}"),
          "kl_max_rel_err_vs_f64": [float(f"{rel(k, ref[f'kl{i}']):.2e}") for i, k in enumerate(kls)]}


def main(argv=None) -> dict:
  import throughput  # pylint: disable=import-outside-toplevel
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  throughput.add_first_call_args(ap)
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--role", choices=("params", "f64", "run"), help=argparse.SUPPRESS)  # the child processes
  ap.add_argument("--level", help=argparse.SUPPRESS)
  ap.add_argument("--work", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.role:
    row = child(args)
    print(json.dumps(row), flush=True)
    return row
  common = [sys.executable, os.path.abspath(__file__), "--config", args.config, "--batch_size", str(args.batch_size),
            "--conv_impl", args.conv_impl, "--steps", str(args.steps)]
  with tempfile.TemporaryDirectory() as tmp:
    work = os.path.join(tmp, "params.npz")
    for role in ("params", "f64"):
      subprocess.run(common + ["--role", role, "--level", "default", "--work", work], env=throughput.no_cache_env(),
                     check=True, capture_output=True, text=True)
    rows = throughput.alternate_fresh_processes(common + ["--role", "run", "--work", work], "--level", LEVELS,
                                                args.repeats)
  summary = {"config": args.config, "batch_size": args.batch_size, "repeats": args.repeats}
  for level in LEVELS:
    for key in ("init_first_call_cpu_s", "step_first_call_cpu_s", f"{args.steps}_steps_wall_s"):
      summary[f"level_{level}_{key}"] = round(statistics.median(r[key] for r in rows[level]), 3)
  print(json.dumps(summary), flush=True)
  return summary


if __name__ == "__main__":
  main()
