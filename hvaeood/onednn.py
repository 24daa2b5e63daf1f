"""oneDNN convolutions on XLA:CPU, run by the compiler's own oneDNN runtime.

jaxlib's x86-64 Linux builds link oneDNN, and XLA:CPU executes a custom call named ``__onednn$convolution``
(a forward convolution whose dimension layout and window are given in its backend config) with oneDNN's JIT
kernels on XLA's intra-op thread pool. No XLA pass emits that call in the jaxlib versions measured here, so
`conv` emits it directly. On this project's 2-core AVX-512 machine oneDNN ran the model's 5x5 and 3x3
convolutions (forward, and the input gradient as a forward convolution of the cotangent) at 310-390 GFLOP/s
against 250-300 for XLA's Eigen kernels (per op, measured in isolation). A weight gradient is a forward
convolution too, with the batch contracted: written in oneDNN's canonical layout (`layers.weight_grad_onednn`:
the input's channels as the batch, the cotangent as the kernel, both transposed first) it runs on JIT kernels,
faster than XLA's on an AVX-512 CPU and slower on an AVX2 one (`cpu_has_avx512`); in strided layouts, without
the transposes, oneDNN falls back to a reference kernel. The models use it on a single float32 CPU device with
config.model.conv_impl 'auto' (the default) or 'onednn' (layers.ConvPolicy).
XLA:CPU cannot serialize a program that holds the call, so JAX's persistent compilation cache does not store
such programs (jax warns; the launchers silence that warning, `cli.UNCACHEABLE_ONEDNN_WARNING`).

The call's config format is internal to XLA and has changed between releases, so `available` enables the path
only on a jaxlib release it was verified on (`VERIFIED_JAXLIB`) and only after a numerical probe against
`lax.conv_general_dilated` passes in this process. Importing registers the primitive's CPU lowering only;
nothing is compiled or run then.
"""

from __future__ import annotations

import functools
import json
import platform
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Primitive
from jax.extend.mlir import ir
from jax.extend.mlir.dialects import stablehlo as hlo
from jax.interpreters import batching, mlir

Array = jax.Array

TARGET = "__onednn$convolution"
# jaxlib releases whose XLA:CPU reads the config as `_config` writes it (zero-based spatial dimensions, raw
# strides and pads, window dilation stored as the dilation itself; earlier releases offset each by one or two).
VERIFIED_JAXLIB = ("0.10.2",)


def _config(stride: int, pads, lhs, rhs, out) -> str:
  """The custom call's backend config (JSON of XLA:CPU's BackendConfig.onednn_conv_config).

  lhs/out: (batch_dim, feature_dim, spatial_dims) of the input/output array; rhs: (input_feature_dim,
  output_feature_dim, spatial_dims) of the kernel array.
  """
  data = lambda d: {"batch_dim": d[0], "feature_dim": d[1], "spatial_dims": list(d[2])}
  return json.dumps({"onednn_conv_config": {
      "dims": 4, "feature_groups": 1,
      "input": {"dims": 4, "data": data(lhs)},
      "kernel": {"dims": 4, "filter": {"input_feature_dim": rhs[0], "output_feature_dim": rhs[1],
                                       "spatial_dims": list(rhs[2])}},
      "output": {"dims": 4, "data": data(out)},
      "window": {"pad_left": [int(p[0]) for p in pads], "pad_right": [int(p[1]) for p in pads],
                 "strides": [int(stride)] * 2, "window_dilations": [1, 1]}}}, sort_keys=True)


_NHWC = (0, 3, (1, 2))
_HWIO = (2, 3, (0, 1))
_HWOI = (3, 2, (0, 1))

onednn_conv_p = Primitive("hvaeood_onednn_conv")


def _out_shape(x_shape, w_shape, stride, pads, kernel_transposed) -> tuple[int, ...]:
  out = [(x_shape[a] + lo + hi - w_shape[a - 1]) // stride + 1 for a, (lo, hi) in zip((1, 2), pads)]
  return (x_shape[0], *out, w_shape[2] if kernel_transposed else w_shape[3])


def _abstract_eval(x, w, *, stride, pads, kernel_transposed):
  return jax.core.ShapedArray(_out_shape(x.shape, w.shape, stride, pads, kernel_transposed), x.dtype)


def _lower(ctx, x, w, *, stride, pads, kernel_transposed):
  (out_aval,) = ctx.avals_out
  layout = lambda: ir.DenseIntElementsAttr.get(np.array([3, 2, 1, 0], np.int64), type=ir.IndexType.get())
  cfg = _config(stride, pads, _NHWC, _HWOI if kernel_transposed else _HWIO, _NHWC)
  op = hlo.CustomCallOp(
      [mlir.aval_to_ir_type(ctx.module_context, out_aval)], [x, w], ir.StringAttr.get(TARGET),
      has_side_effect=ir.BoolAttr.get(False), backend_config=ir.StringAttr.get(cfg),
      api_version=ir.IntegerAttr.get(ir.IntegerType.get_signless(32), 1),
      called_computations=ir.ArrayAttr.get([]),
      operand_layouts=ir.ArrayAttr.get([layout(), layout()]), result_layouts=ir.ArrayAttr.get([layout()]))
  return op.results


@functools.partial(jax.jit, static_argnames=("stride", "pads", "kernel_transposed"))
def _impl(x, w, *, stride, pads, kernel_transposed):
  """Eager evaluation: the call compiled on its own (one executable per shape and window)."""
  return onednn_conv_p.bind(x, w, stride=stride, pads=pads, kernel_transposed=kernel_transposed)


def _batch(args, dims, **params):
  """vmap: a batched input folds into the conv's batch; a batched kernel maps the conv over its batch axis."""
  x, w = args
  bx, bw = dims
  if bw is None:  # not mapped
    x = jnp.moveaxis(x, bx, 0)
    out = onednn_conv_p.bind(x.reshape((-1,) + x.shape[2:]), w, **params)
    return out.reshape(x.shape[:2] + out.shape[1:]), 0
  w = jnp.moveaxis(w, bw, 0)
  if bx is None:
    return lax.map(lambda wi: onednn_conv_p.bind(x, wi, **params), w), 0
  x = jnp.moveaxis(x, bx, 0)
  return lax.map(lambda xw: onednn_conv_p.bind(*xw, **params), (x, w)), 0


onednn_conv_p.def_impl(_impl)
onednn_conv_p.def_abstract_eval(_abstract_eval)
mlir.register_lowering(onednn_conv_p, _lower, platform="cpu")
batching.primitive_batchers[onednn_conv_p] = _batch


def conv(x: Array, w: Array, stride: int, pads: Sequence[tuple[int, int]], kernel_transposed: bool = False) -> Array:
  """lax.conv_general_dilated(x, w, (stride, stride), pads) for NHWC float32 x and an HWIO kernel, by oneDNN.

  With `kernel_transposed` the kernel is HWOI (w[..., o, i]), which is how the input gradient of a stride-1
  conv reads the (spatially flipped) forward kernel without a transpose. Forward only: callers give it a VJP
  (layers.conv_s1). Only for the CPU backend where `available()`.
  """
  if x.dtype != jnp.float32 or w.dtype != jnp.float32 or x.ndim != 4 or w.ndim != 4:
    raise ValueError(f"onednn.conv takes float32 NHWC inputs and 4-D kernels, got {x.dtype}{x.shape} and "
                     f"{w.dtype}{w.shape}; use lax.conv_general_dilated for other cases.")
  pads = tuple((int(lo), int(hi)) for lo, hi in pads)
  if min(min(p) for p in pads) < 0:
    raise ValueError(f"onednn.conv takes non-negative pads, got {pads}.")
  return onednn_conv_p.bind(x, w, stride=int(stride), pads=pads, kernel_transposed=bool(kernel_transposed))


def _probe() -> bool:
  """Whether the custom call computes lax's convolution here (a stride-2 conv with uneven pads and a
  transposed-kernel conv on random inputs, to float32 rounding)."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 7, 6, 3)).astype(np.float32)
  w = rng.standard_normal((3, 3, 3, 4)).astype(np.float32)
  pads = ((1, 0), (0, 2))
  dn = ("NHWC", "HWIO", "NHWC")
  cpu = jax.devices("cpu")[0]
  ours = lambda x, w: (conv(x, w, 2, pads), conv(x, w.swapaxes(2, 3), 1, pads, True))
  ref = lambda x, w: (lax.conv_general_dilated(x, w, (2, 2), pads, dimension_numbers=dn),
                      lax.conv_general_dilated(x, w, (1, 1), pads, dimension_numbers=dn))
  try:
    # compiled and run on their own even when called while a model is being traced
    with jax.ensure_compile_time_eval(), jax.default_device(cpu):
      x, w = jax.device_put(x, cpu), jax.device_put(w, cpu)
      got, want = (jax.jit(f).lower(x, w).compile()(x, w) for f in (ours, ref))
  except Exception:  # pylint: disable=broad-except  (no oneDNN runtime in this jaxlib: the path stays off)
    return False
  return all(g.shape == v.shape and np.allclose(np.asarray(g), np.asarray(v), rtol=1e-4, atol=1e-4)
             for g, v in zip(got, want))


@functools.cache
def cpu_has_avx512() -> bool:
  """Whether this CPU reports AVX-512 (`avx512f` among /proc/cpuinfo's flags; False where that cannot be read).

  oneDNN's JIT kernels differ by instruction set: the weight gradient as a forward convolution
  (`layers.weight_grad_onednn`) ran faster than XLA's kernel on an AVX-512 CPU and slower on an AVX2-only one
  (benchmarks/README.md, change 13), so the layers use it only where this is True.
  """
  try:
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
      for line in f:
        if line.startswith("flags"):
          return "avx512f" in line.split()
  except OSError:
    pass
  return False


@functools.cache
def available() -> bool:
  """Whether `conv` runs here: jaxlib on x86-64 Linux, a `VERIFIED_JAXLIB` release, and the probe passes."""
  import jaxlib  # pylint: disable=import-outside-toplevel
  if sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64"):
    return False
  if getattr(jaxlib, "__version__", None) not in VERIFIED_JAXLIB:
    return False
  try:
    jax.devices("cpu")
  except RuntimeError:
    return False
  return _probe()
