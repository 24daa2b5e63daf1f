"""What the weight gradients cost inside the compiled training step: the step against variants without them.

  python benchmarks/grad_share.py --config configs/fashion_mnist_hvae.py [--batch_size 128] [--rounds 4]
      [--variants weight_grads | onednn_dw | onednn_dw_chunk]

Compiles the training step (as `benchmarks/throughput.py`) several times in one process: as it is, and with one
class of the fast path's weight gradients replaced by zeros (kept dependent on the inputs, so nothing upstream
is pruned): the 5x5 stride-1 convolutions at full resolution (28x28 for the paper's 28x28 models), every other
stride-1 convolution (3x3s, and the sub-pixel convolutions of the transposed ones), and the strided
convolutions. Two more variants keep the gradients exact and drop overheads around them: the `materialised`
copies of the weight gradients' inputs (`layers.materialised` as the identity) and the batch chunks
(one chunk per conv). The variants are timed alternately, two steps per round, and one JSON line per variant gives the
median step time and its difference from the full step: what that class of weight gradients costs in place,
transposes and materialised copies included. Timing an op alone (`op_profile.py`) leaves those out.

With `--variants onednn_dw` it times instead where the oneDNN path's weight gradients run (`layers.
onednn_weight_grad`: `layers.weight_grad_onednn` for stride-1 kernels of at least `layers.ONEDNN_DW_MIN_KERNEL`
on an AVX-512 CPU, XLA's otherwise): the step as it is against every stride-1 weight gradient on XLA, and on
oneDNN from 5x5, 3x3 and 1x1 kernels on any CPU; `--variants onednn_dw_chunk` against oneDNN calls of 8, 16 and
32 examples (benchmarks/README.md, change 13).

The "no dW" variants compute wrong gradients: this measures time only. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hvaeood  # noqa: E402

hvaeood.set_xla_cpu_defaults()  # before JAX starts its CPU backend

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import throughput  # noqa: E402  (config loading, synthetic batches)
from hvaeood import devices, layers  # noqa: E402
from hvaeood import state as state_lib  # noqa: E402


def _zero_grad(x, w, ct):
  """Zeros shaped as w that still read x and the cotangent (so XLA keeps their producers)."""
  return jnp.zeros_like(w) + 1e-30 * (ct[(0,) * ct.ndim] + x[(0,) * x.ndim])


@contextlib.contextmanager
def _zeroed_dw(conv, fwd, bwd, skip=lambda x, w: True):
  """The custom-VJP `conv` (forward rule `fwd`, backward rule `bwd`) with its weight gradient zeroed where
  skip(x, w); the original rule is restored on exit."""

  def zeroed(*args):
    dx, dw = bwd(*args)
    (x, w), ct = args[-2:]  # every rule's last two arguments: the residuals (x, w) and the cotangent
    return dx, (_zero_grad(x, w, ct) if skip(x, w) else dw)

  conv.defvjp(fwd, zeroed)
  try:
    yield
  finally:
    conv.defvjp(fwd, bwd)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", required=True)
  ap.add_argument("--batch_size", type=int, default=128)
  ap.add_argument("--rounds", type=int, default=4)
  ap.add_argument("--variants", choices=("weight_grads", "onednn_dw", "onednn_dw_chunk"), default="weight_grads")
  throughput.add_conv_args(ap)
  args = ap.parse_args(argv)

  config = throughput.load_config(args.config)
  config.train.batch_size = args.batch_size
  throughput.set_conv(config, args.conv_impl, args.chunk_bytes)
  model = state_lib.model_for_config(config)
  shape = model.spec.image_shape
  mesh = devices.make_mesh(None)
  x_host = throughput.synthetic_batch(np.random.default_rng(0), args.batch_size, shape,
                                      config.model.likelihood == "bernoulli")
  x = devices.to_global(x_host, NamedSharding(mesh, P("data")))
  state0 = state_lib.init_state(config, model, x_host, mesh)
  full_res = shape[0]
  full_res_5x5 = lambda x, w: x.shape[1] == full_res and w.shape[0] == 5
  # pylint: disable=protected-access
  s1 = (layers.conv_s1, layers._conv_s1_fwd, layers._conv_s1_bwd)
  strided = (layers.conv_strided_fastgrad, layers._conv_strided_fastgrad_fwd, layers._conv_strided_fastgrad_bwd)
  # pylint: enable=protected-access
  patched = lambda **kw: lambda: mock.patch.multiple(layers, **kw)
  onednn_dw = {
      "full step": contextlib.nullcontext,
      "dW on XLA for every kernel": patched(ONEDNN_DW_MIN_KERNEL=1 << 30),
      "dW on oneDNN from 5x5": patched(ONEDNN_DW_MIN_KERNEL=5, ONEDNN_DW_NEEDS_AVX512=False),
      "dW on oneDNN from 3x3": patched(ONEDNN_DW_MIN_KERNEL=3, ONEDNN_DW_NEEDS_AVX512=False),
      "dW on oneDNN from 1x1": patched(ONEDNN_DW_MIN_KERNEL=1, ONEDNN_DW_NEEDS_AVX512=False),
  }
  onednn_dw_chunk = {
      "full step": contextlib.nullcontext,
      "oneDNN dW from 5x5, 8 examples per call": patched(ONEDNN_DW_CHUNK=8, ONEDNN_DW_NEEDS_AVX512=False),
      "oneDNN dW from 5x5, 16 examples per call": patched(ONEDNN_DW_CHUNK=16, ONEDNN_DW_NEEDS_AVX512=False),
      "oneDNN dW from 5x5, 32 examples per call": patched(ONEDNN_DW_CHUNK=32, ONEDNN_DW_NEEDS_AVX512=False),
  }
  weight_grads = {
      "full step": contextlib.nullcontext,
      f"no dW: 5x5 stride-1 at {full_res}x{full_res}": lambda: _zeroed_dw(*s1, full_res_5x5),
      "no dW: other stride-1 (3x3, sub-pixel)": lambda: _zeroed_dw(*s1, lambda x, w: not full_res_5x5(x, w)),
      "no dW: strided": lambda: _zeroed_dw(*strided),
      "exact, no materialised copies": lambda: mock.patch.object(layers, "materialised", lambda x: x),
      "exact, no batch chunks": lambda: mock.patch.object(layers, "_num_chunks", lambda *args: 1),
  }
  variants = {"weight_grads": weight_grads, "onednn_dw": onednn_dw, "onednn_dw_chunk": onednn_dw_chunk}[args.variants]
  compiled = {}
  for name, rule in variants.items():
    with rule():
      compiled[name] = state_lib.jit_train_step(config, model, steps_per_epoch=1000, mesh=mesh).lower(
          state0, x).compile()
  states = {name: jax.tree.map(jnp.copy, state0) for name in compiled}  # each step donates its state
  for name, fn in compiled.items():  # warm-up
    states[name], metrics = fn(states[name], x)
    jax.block_until_ready(metrics)
  times = {name: [] for name in compiled}
  for _ in range(args.rounds):
    for name, fn in compiled.items():
      t0 = time.perf_counter()
      for _ in range(2):
        states[name], metrics = fn(states[name], x)
      jax.block_until_ready(metrics)
      times[name].append((time.perf_counter() - t0) / 2)
  base = statistics.median(times["full step"])
  for name, ts in times.items():
    step = statistics.median(ts)
    print(json.dumps({"variant": name, "step_ms": round(step * 1e3, 1), "img_per_s": round(args.batch_size / step, 2),
                      "saved_ms": round((base - step) * 1e3, 1), "rounds_ms": [round(t * 1e3) for t in ts]}),
          flush=True)


if __name__ == "__main__":
  main()
