"""Training and evaluation throughput on synthetic batches; prints one JSON line.

  python benchmarks/throughput.py --config configs/fashion_mnist_hvae.py [--batch_size 128] [--steps 10]
      [--iw_samples 1] [--eval_batch_size 500] [--compute_dtype float32] [--conv_impl plain] [--chunk_bytes 0]

Imports no TensorFlow (runs on accelerator images without it). Figures: `train_img_per_s` (median of
`--repeats` timed windows of `--steps` steps after warm-up, blocking on the result), `eval_img_per_s` (the
ELBO and every L^{>k} of a batch, S samples, one jitted call), `compile_s` (training step), `peak_rss_mb`,
`flops_per_train_image` (XLA cost analysis of the compiled step; where the convs run on oneDNN, whose custom
calls XLA does not count, of the same step compiled with XLA's kernels), `achieved_gflops`, device kind and count, and
the convolution path (`conv_impl`: config.model.conv_impl or `--conv_impl`; `fast_conv`: whether it resolves to
the stride-1 rewrites on this backend; `onednn_conv`: whether their convs run on oneDNN; `conv_chunk_bytes`:
their batch-chunk budget, 0 = no chunking).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hvaeood  # noqa: E402

hvaeood.set_xla_cpu_defaults()  # before JAX starts its CPU backend

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402


def load_config(spec: str):
  path, _, variant = spec.partition(":")
  mod_spec = importlib.util.spec_from_file_location("bench_config", path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  return mod.get_config(variant) if variant else mod.get_config()


def set_conv(config, conv_impl=None, chunk_bytes=None) -> None:
  """Sets config.model.conv_impl / conv_chunk_bytes where given (None keeps the config's value)."""
  with config.unlocked():
    if conv_impl is not None:
      config.model.conv_impl = conv_impl
    if chunk_bytes is not None:
      config.model.conv_chunk_bytes = chunk_bytes


def conv_settings(config, model) -> dict:
  """The convolution path `model` runs on this backend (its `layers.ConvPolicy`, resolved)."""
  from hvaeood import layers  # pylint: disable=import-outside-toplevel
  policy = model.spec.conv
  chunk = layers.DEFAULT_CONV_CHUNK_BYTES if policy.chunk_bytes is None else policy.chunk_bytes
  fast = layers.resolve_fast(policy.fast)
  dtype = config.model.get("compute_dtype", "float32")
  return {"conv_impl": config.model.get("conv_impl", "auto"), "fast_conv": fast,
          "onednn_conv": layers.resolve_onednn(policy.onednn, fast, dtype), "conv_chunk_bytes": chunk}


def add_conv_args(ap: argparse.ArgumentParser) -> None:
  """--conv_impl and --chunk_bytes (config.model.conv_impl / conv_chunk_bytes)."""
  from hvaeood import layers  # pylint: disable=import-outside-toplevel
  ap.add_argument("--conv_impl", choices=layers.CONV_IMPLS, default=None,
                  help="set config.model.conv_impl: auto (the stride-1 rewrites on CPU only, on oneDNN's kernels "
                       "on one float32 CPU device), onednn (oneDNN required), fast (the rewrites on XLA's "
                       "kernels) or plain (plain lax convolutions; default: the config's)")
  ap.add_argument("--chunk_bytes", type=int, default=None,
                  help="set config.model.conv_chunk_bytes, the fast path's batch-chunk budget (0: no chunking; "
                       f"default: the config's, None = {layers.DEFAULT_CONV_CHUNK_BYTES})")


def add_first_call_args(ap: argparse.ArgumentParser) -> None:
  """--config, --batch_size, --conv_impl, --repeats of the fresh-process benchmarks (init_compile, codegen_level)."""
  ap.add_argument("--config", default="configs/fashion_mnist_hvae.py:tiny")
  ap.add_argument("--batch_size", type=int, default=16)
  ap.add_argument("--conv_impl", default="fast", help="config.model.conv_impl (default fast: XLA's kernels)")
  ap.add_argument("--repeats", type=int, default=2)


def no_cache_env() -> dict:
  """This environment without a persistent compilation cache: a fresh process compiles everything."""
  return {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}


def alternate_fresh_processes(argv: list, flag: str, variants, repeats: int) -> dict:
  """Runs `argv + [flag, variant]` for each variant in turn, `repeats` rounds, each in a fresh process without a
  persistent compilation cache; prints each process's last stdout line (a JSON row) and returns the rows by
  variant."""
  rows = {v: [] for v in variants}
  for _ in range(repeats):
    for v in variants:
      res = subprocess.run(list(argv) + [flag, v], capture_output=True, text=True, env=no_cache_env(), check=True)
      row = json.loads(res.stdout.strip().splitlines()[-1])
      print(json.dumps(row), flush=True)
      rows[v].append(row)
  return rows


def synthetic_batch(rng: np.random.Generator, n: int, shape, binary: bool) -> np.ndarray:
  x = rng.random((n,) + tuple(shape), dtype=np.float32)
  return (x < 0.3).astype(np.float32) if binary else x


def cost_flops(compiled) -> float:
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0]
    return float(cost.get("flops", float("nan")))
  except Exception:  # pylint: disable=broad-except
    return float("nan")


def timed(fn, steps: int, repeats: int) -> list[float]:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(steps):
      out = fn()
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / steps)
  return times


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", required=True)
  ap.add_argument("--batch_size", type=int, default=None)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--iw_samples", type=int, default=1)
  ap.add_argument("--eval_batch_size", type=int, default=None)
  ap.add_argument("--eval_steps", type=int, default=2)
  ap.add_argument("--max_rows", type=int, default=None)
  ap.add_argument("--compute_dtype", default=None)
  ap.add_argument("--skip_train", action="store_true")
  ap.add_argument("--num_devices", type=int, default=None, help="use the first N devices (default: all)")
  ap.add_argument("--skip_eval", action="store_true")
  ap.add_argument("--eval_compile_only", action="store_true",
                  help="compile the evaluation and report XLA's memory analysis without running it")
  add_conv_args(ap)
  args = ap.parse_args(argv)

  from hvaeood import bounds, devices  # pylint: disable=import-outside-toplevel
  from hvaeood import state as state_lib  # pylint: disable=import-outside-toplevel
  config = load_config(args.config)
  if args.batch_size:
    config.train.batch_size = args.batch_size
  if args.compute_dtype:
    config.model.compute_dtype = args.compute_dtype
  set_conv(config, args.conv_impl, args.chunk_bytes)
  model = state_lib.model_for_config(config)
  shape = model.spec.image_shape
  binary = config.model.likelihood == "bernoulli"
  rng = np.random.default_rng(0)
  mesh = devices.make_mesh(args.num_devices)
  n_dev = mesh.devices.size
  bs = state_lib.check_batch(config.train.batch_size, mesh)  # padded to a multiple of the devices
  sharded = NamedSharding(mesh, P("data"))
  result = {"config": args.config, "batch_size": bs, "device_kind": jax.devices()[0].device_kind,
            "device_count": n_dev, "backend": jax.default_backend(), "compute_dtype": config.model.compute_dtype,
            **conv_settings(config, model), "xla_flags": os.environ.get("XLA_FLAGS", "")}

  # XLA's cost analysis counts no FLOPs in oneDNN's custom calls: count them in the same program on XLA's kernels.
  counted = model
  if result["onednn_conv"]:
    counted_config = config.copy_and_resolve_references()
    set_conv(counted_config, "fast")
    counted = state_lib.model_for_config(counted_config)

  x_host = synthetic_batch(rng, bs, shape, binary)
  x = devices.to_global(x_host, sharded)
  state = state_lib.init_state(config, model, x_host, mesh)

  if not args.skip_train:
    step_fn = state_lib.jit_train_step(config, model, steps_per_epoch=1000, mesh=mesh)
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, x).compile()
    result["compile_s"] = time.perf_counter() - t0
    compiled_counted = compiled if counted is model else state_lib.jit_train_step(
        config, counted, steps_per_epoch=1000, mesh=mesh).lower(state, x).compile()
    flops = cost_flops(compiled_counted) * n_dev  # XLA's cost analysis counts one device's share of the program.
    holder = {"state": state}

    def one_step():
      holder["state"], m = compiled(holder["state"], x)
      return m["loss"]

    jax.block_until_ready(one_step())  # warm-up
    times = timed(one_step, args.steps, args.repeats)
    step_s = statistics.median(times)
    result["train_step_s"] = step_s
    result["train_img_per_s"] = bs / step_s
    result["flops_per_train_image"] = flops / bs
    result["achieved_gflops"] = flops / step_s / 1e9
    state = holder["state"]

  if not args.skip_eval:
    eb = devices.padded_batch_size(args.eval_batch_size or min(500, bs), mesh)
    xe = jax.device_put(synthetic_batch(rng, eb, shape, binary), sharded)
    ks = tuple(range(model.spec.num_layers))
    kwargs = dict(iw_samples=args.iw_samples, ks=ks)
    if args.max_rows:
      kwargs["max_rows"] = args.max_rows
    ev_for = lambda m: jax.jit(lambda p, xb, r: bounds.compute_bounds(m, p, xb, r, **kwargs))
    ev = ev_for(model)
    t0 = time.perf_counter()
    ev_c = ev.lower(state.params, xe, jax.random.PRNGKey(0)).compile()
    result["eval_compile_s"] = time.perf_counter() - t0
    result["eval_batch_size"] = eb
    result["iw_samples"] = args.iw_samples
    mem = ev_c.memory_analysis()
    if mem is not None:  # per device: XLA's planned peak of temporaries, and the arguments and outputs
      result["eval_xla_temp_mb"] = mem.temp_size_in_bytes / 2**20
      result["eval_xla_args_out_mb"] = (mem.argument_size_in_bytes + mem.output_size_in_bytes) / 2**20
    if args.eval_compile_only:
      args.eval_steps = 0
  if not args.skip_eval and args.eval_steps > 0:
    jax.block_until_ready(ev_c(state.params, xe, jax.random.PRNGKey(0)))
    times = timed(lambda: ev_c(state.params, xe, jax.random.PRNGKey(1)).elbo, args.eval_steps, args.repeats)
    result["eval_img_per_s"] = eb / statistics.median(times)
    replicas = args.iw_samples + len(ks)  # S rows for the ELBO, one per L^{>k} (S_k = 1)
    if replicas <= max(1, (args.max_rows or bounds.DEFAULT_MAX_ROWS) // eb):
      # Chunked importance sampling runs a loop, whose body XLA's cost analysis counts once: no figure then.
      ev_counted = ev_c if counted is model else ev_for(counted).lower(state.params, xe,
                                                                     jax.random.PRNGKey(0)).compile()
      result["eval_flops_per_image"] = cost_flops(ev_counted) * n_dev / eb

  result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
  print(json.dumps({k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v)
                    for k, v in result.items()}))
  return result


if __name__ == "__main__":
  main()
