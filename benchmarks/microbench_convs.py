"""Microbenchmark of WNConv's convolutions on this machine: plain lax path against the fast (stride-1) paths.

  python benchmarks/microbench_convs.py [--batch 128] [--channels 64] [--repeats 5] [--ops conv5s2,convT5s2]
      [--dtype float32|bfloat16] [--paths plain,fast] [--chunk_bytes 0]
  python benchmarks/microbench_convs.py --train_step configs/fashion_mnist_hvae.py [--batch 128] [--repeats 3]
      [--conv_impl plain] [--chunk_bytes 0]

For every op (the FashionMNIST HVAE's conv shapes) and path it prints the median time of the forward pass and
of the gradient (both dx and dw of <y, ct>, one jitted call) in ms of wall time, and GFLOP/s counted as the
op's *useful* multiply-adds (2 * N * H_in * W_in * k^2 * C * F for a transposed conv, 2 * N * H_out * W_out *
k^2 * C * F otherwise; the gradient counts twice that), so GFLOP/s compare paths directly. The last two
columns are the process CPU time (all threads) of the same calls, the steadier figure when other jobs share the
cores. The fast path splits large batches into chunks of about `--chunk_bytes` (0: no chunking; default
`layers.DEFAULT_CONV_CHUNK_BYTES`). XLA_FLAGS in the environment apply (set them before running, e.g.
XLA_FLAGS=--xla_cpu_use_onednn=true), plus `hvaeood.set_xla_cpu_defaults()` unless HVAEOOD_XLA_CPU_DEFAULTS=0.

`--train_step CONFIG` instead times the whole jitted training step of CONFIG on a synthetic batch (the conv
path of `--conv_impl` and `--chunk_bytes`, i.e. config.model.conv_impl and conv_chunk_bytes; default: the
config's) and prints one JSON line with the median wall and process-CPU seconds per step, images per second and
images per CPU-second; on a shared machine the CPU figure tracks the work.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hvaeood  # noqa: E402

hvaeood.set_xla_cpu_defaults()  # before JAX starts its CPU backend

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from hvaeood import layers  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import throughput  # noqa: E402  pylint: disable=wrong-import-position  (its config and batch helpers)

# name: (kernel, stride, transpose, input spatial size)
OPS = {
    "conv5s1": (5, 1, False, 28),
    "conv5s2": (5, 2, False, 28),
    "convT5s2": (5, 2, True, 14),
    "conv3s1": (3, 1, False, 14),
    "conv3s2": (3, 2, False, 14),
    "convT3s2": (3, 2, True, 7),
    "conv1s1": (1, 1, False, 28),
}


def _s2d(x, w, s, transpose, chunk_bytes=None):  # pylint: disable=unused-argument
  pads = (layers.same_pads(x.shape[1], w.shape[0], s), layers.same_pads(x.shape[2], w.shape[0], s))
  return layers.conv_strided_s2d(x, w, s, pads)


PATHS = {
    "plain": lambda x, w, s, transpose, chunk_bytes=None: layers.conv2d(x, w, s, transpose, fast=False),
    "fast": lambda x, w, s, transpose, chunk_bytes=None: layers.conv2d(x, w, s, transpose, fast=True,
                                                                       chunk_bytes=chunk_bytes),
    # rejected alternative for strided convs: space-to-depth + one stride-1 conv (values and gradients)
    "s2d": _s2d,
}


def useful_flops(n, c, f, k, s, transpose, size):
  out = size if transpose else -(-size // s)
  return 2.0 * n * out * out * k * k * c * f


def bench(fn, args, repeats):
  jax.block_until_ready(fn(*args))  # compile + warm-up
  jax.block_until_ready(fn(*args))
  times, cpu = [], []
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  return statistics.median(times), statistics.median(cpu)


def train_step_bench(config_path: str, batch: int, repeats: int, conv_impl=None, chunk_bytes=None) -> dict:
  from hvaeood import state as state_lib  # pylint: disable=import-outside-toplevel
  config = throughput.load_config(config_path)
  config.train.batch_size = batch
  throughput.set_conv(config, conv_impl, chunk_bytes)
  model = state_lib.model_for_config(config)
  x = throughput.synthetic_batch(np.random.default_rng(0), batch, model.spec.image_shape,
                                 config.model.likelihood == "bernoulli")
  state = jax.jit(lambda b: state_lib.create_train_state(config, model, b))(x)
  step = jax.jit(state_lib.make_train_step(config, model, steps_per_epoch=1000), donate_argnums=(0,))
  t0 = time.perf_counter()
  compiled = step.lower(state, x).compile()
  compile_s = time.perf_counter() - t0
  state, m = compiled(state, x)
  jax.block_until_ready(m)
  walls, cpus = [], []
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    state, m = compiled(state, x)
    jax.block_until_ready(m)
    walls.append(time.perf_counter() - t0)
    cpus.append(time.process_time() - c0)
  wall, cpu = statistics.median(walls), statistics.median(cpus)
  return {"config": config_path, "batch_size": batch, **throughput.conv_settings(config, model),
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "compile_s": round(compile_s, 1), "step_wall_s": round(wall, 3), "step_cpu_s": round(cpu, 3),
          "img_per_s": round(batch / wall, 2), "img_per_cpu_s": round(batch / cpu, 2),
          "walls": [round(v, 2) for v in walls], "cpus": [round(v, 2) for v in cpus],
          "loadavg": os.getloadavg()[0]}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--channels", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--ops", default=",".join(OPS))
  ap.add_argument("--paths", default="plain,fast", help="comma list of plain, fast, s2d (strided convs only)")
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--no_grad", action="store_true")
  ap.add_argument("--json", action="store_true", help="also print one JSON line per measurement")
  ap.add_argument("--train_step", default=None, help="config file: time its whole training step instead")
  throughput.add_conv_args(ap)  # --conv_impl (with --train_step), --chunk_bytes
  args = ap.parse_args(argv)
  if args.train_step:
    print(json.dumps(train_step_bench(args.train_step, args.batch, args.repeats, args.conv_impl, args.chunk_bytes)))
    return
  if args.conv_impl is not None:
    ap.error("--conv_impl applies to --train_step; the per-op benchmark runs every path of --paths.")
  dtype = jnp.dtype(args.dtype)
  n, c = args.batch, args.channels
  rng = np.random.default_rng(0)
  chunk = layers.DEFAULT_CONV_CHUNK_BYTES if args.chunk_bytes is None else args.chunk_bytes
  print(f"batch {n}, {c}->{c} channels, {dtype.name}, fast-path chunk bytes {chunk}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  print(f"{'op':10s} {'path':6s} {'fwd ms':>9s} {'GFLOP/s':>8s} {'grad ms':>9s} {'GFLOP/s':>8s}"
        f" {'fwd cpu':>9s} {'grad cpu':>9s}")
  for name in args.ops.split(","):
    k, s, transpose, size = OPS[name]
    x = jnp.asarray(rng.standard_normal((n, size, size, c)), dtype)
    w = jnp.asarray(rng.standard_normal((k, k, c, c)) / (k * np.sqrt(c)), dtype)
    out_shape = jax.eval_shape(lambda x, w: layers.conv2d(x, w, s, transpose, fast=False), x, w).shape
    ct = jnp.asarray(rng.standard_normal(out_shape), dtype)
    fl = useful_flops(n, c, c, k, s, transpose, size)
    for path in args.paths.split(","):
      if path == "s2d" and (transpose or s == 1):
        continue
      conv = functools.partial(PATHS[path], s=s, transpose=transpose, chunk_bytes=args.chunk_bytes)
      fwd = jax.jit(conv)
      grad = jax.jit(jax.grad(lambda x, w, ct: jnp.vdot(conv(x, w).astype(jnp.float32), ct.astype(jnp.float32)),
                              argnums=(0, 1)))
      t_f, c_f = bench(fwd, (x, w), args.repeats)
      t_g, c_g = (float("nan"),) * 2 if args.no_grad else bench(grad, (x, w, ct), args.repeats)
      print(f"{name:10s} {path:6s} {t_f * 1e3:9.1f} {fl / t_f / 1e9:8.1f} {t_g * 1e3:9.1f}"
            f" {2 * fl / t_g / 1e9:8.1f}"
            f" {c_f * 1e3:9.1f} {c_g * 1e3:9.1f}", flush=True)
      if args.json:
        print(json.dumps({"op": name, "path": path, "fwd_ms": round(t_f * 1e3, 2), "grad_ms": round(t_g * 1e3, 2),
                          "fwd_gflops": round(fl / t_f / 1e9, 1), "grad_gflops": round(2 * fl / t_g / 1e9, 1)}))


if __name__ == "__main__":
  main()
