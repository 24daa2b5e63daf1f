"""The paper FashionMNIST model's weight-gradient convolutions timed alone: XLA:CPU (ours) or PyTorch (reference).

  python benchmarks/dw_ops.py                       # XLA:CPU, with the project's CPU defaults
  python benchmarks/dw_ops.py --onednn              # also `layers.weight_grad_onednn`, alternating with XLA's
  /tmp/refvenv/bin/python benchmarks/dw_ops.py --torch   # PyTorch's convolution_backward (oneDNN), 2 threads

Run the two back to back (ours, torch, ours): the shared machine's figures move between runs. One JSON line per
shape (batch, resolution, kernel, 64->64 channels, 'SAME' padding): median ms of `--repeats` calls and GFLOP/s.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

SHAPES = ((32, 28, 5), (128, 28, 5), (128, 14, 3), (128, 7, 3))  # (batch, height = width, kernel)
CHANNELS = 64


def _xla_ops(rng, onednn=False):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import hvaeood  # pylint: disable=import-outside-toplevel
  hvaeood.set_xla_cpu_defaults()
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jax import lax  # pylint: disable=import-outside-toplevel
  from hvaeood import layers  # pylint: disable=import-outside-toplevel

  for b, h, k in SHAPES:
    x = jnp.asarray(rng.standard_normal((b, h, h, CHANNELS), dtype="float32"))
    g = jnp.asarray(rng.standard_normal((b, h, h, CHANNELS), dtype="float32"))

    def dw(x, g, k=k):
      conv = lambda w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
      return jax.vjp(conv, jnp.zeros((k, k, CHANNELS, CHANNELS), jnp.float32))[1](g)[0]

    fns = {"xla": jax.jit(dw)}
    if onednn:
      fns["onednn"] = jax.jit(lambda x, g, k=k: layers.weight_grad_onednn(x, g, ((k // 2, k // 2),) * 2))
    yield (b, h, k), {name: lambda fn=fn, x=x, g=g: fn(x, g).block_until_ready() for name, fn in fns.items()}


def _torch_ops(rng):
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(os.cpu_count() or 1)
  for b, h, k in SHAPES:
    x = torch.from_numpy(rng.standard_normal((b, CHANNELS, h, h), dtype="float32"))
    g = torch.from_numpy(rng.standard_normal((b, CHANNELS, h, h), dtype="float32"))
    w = torch.zeros(CHANNELS, CHANNELS, k, k)
    yield (b, h, k), {"torch": lambda x=x, g=g, w=w, k=k: torch.ops.aten.convolution_backward(
        g, x, w, None, (1, 1), (k // 2, k // 2), (1, 1), False, (0, 0), 1, (False, False, True))}


def main(argv=None) -> None:
  import numpy as np  # pylint: disable=import-outside-toplevel
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--torch", action="store_true", help="time PyTorch's kernels instead of XLA's")
  ap.add_argument("--onednn", action="store_true",
                  help="also time layers.weight_grad_onednn (oneDNN forward convs), alternating with XLA's kernel")
  ap.add_argument("--repeats", type=int, default=10)
  args = ap.parse_args(argv)
  rng = np.random.default_rng(0)
  ops = _torch_ops(rng) if args.torch else _xla_ops(rng, args.onednn)
  for (b, h, k), fns in ops:
    times = {name: [] for name in fns}
    for fn in fns.values():  # warm-up (compiles)
      fn()
    for _ in range(args.repeats):  # alternating, so the machine's drift hits every implementation alike
      for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - t0)
    flops = 2 * b * h * h * CHANNELS * CHANNELS * k * k
    for name, ts in times.items():
      ms = statistics.median(ts) * 1e3
      print(json.dumps({"impl": name, "batch": b, "hw": h, "kernel": k, "ms": round(ms, 2),
                        "gflops": round(flops / ms / 1e6, 1)}), flush=True)


if __name__ == "__main__":
  main()
