"""Where the training step's time goes: every convolution and dot of the compiled step, timed on its own.

  python benchmarks/op_profile.py --config configs/fashion_mnist_hvae.py [--batch_size 128] [--gflops 240]

Compiles the training step (as `benchmarks/throughput.py`), reads the convolutions and dots out of XLA's
optimised HLO, and times each distinct one as a jitted `lax.conv_general_dilated` / `lax.dot_general` with the
same shapes, window, dilations, groups and layouts on random inputs. Prints one JSON line per op kind (count in
the step, ms each, GFLOP/s, and the ms lost against `--gflops`, the sgemm rate of this machine), sorted by ms
lost, and a last JSON line: the step's time, the sum over the timed ops, and the remainder (the elementwise,
reduction and data-movement work around them, which this cannot split further). Timing ops alone leaves out
fusion with their neighbours, so the sum is an estimate of their share, not an exact split.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hvaeood  # noqa: E402

hvaeood.set_xla_cpu_defaults()  # before JAX starts its CPU backend

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

import throughput  # noqa: E402  (benchmarks/throughput.py: config loading, synthetic batches, timing)

_DEF = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = f32\[([\d,]*)\]")
_OP = re.compile(r"= f32\[([\d,]*)\][^ ]* (convolution|dot)\(%([\w.\-]+), %([\w.\-]+)\), (.*)")


def _dims(text: str) -> tuple[int, ...]:
  return tuple(int(d) for d in text.split(",") if d)


def _window(attrs: str) -> dict:
  """size, stride, pad, lhs_dilate, rhs_dilate of an HLO `window={...}` (defaults for missing fields)."""
  m = re.search(r"window=\{([^}]*)\}", attrs)
  fields = dict(f.split("=") for f in m.group(1).split()) if m else {}
  size = [int(v) for v in fields.get("size", "").split("x") if v]
  n = len(size)
  ints = lambda key: [int(v) for v in fields[key].split("x")] if key in fields else [1] * n
  pads = [tuple(int(v) for v in p.split("_")) for p in fields["pad"].split("x")] if "pad" in fields else [(0, 0)] * n
  return {"size": size, "stride": ints("stride"), "pad": pads, "lhs_dilate": ints("lhs_dilate"),
          "rhs_dilate": ints("rhs_dilate")}


def _conv_spec(labels: str) -> tuple[str, str, str]:
  """HLO dim_labels (e.g. b01f_01io->b01f) -> lax dimension-number strings (NHWC, HWIO, NHWC)."""
  lhs, rest = labels.split("_")
  rhs, out = rest.split("->")
  act = {"b": "N", "f": "C", "0": "H", "1": "W"}
  ker = {"i": "I", "o": "O", "0": "H", "1": "W"}
  return "".join(act[c] for c in lhs), "".join(ker[c] for c in rhs), "".join(act[c] for c in out)


def hlo_ops(hlo: str) -> collections.Counter:
  """(kind, description) -> count in the step, for every float32 convolution and dot (operand shapes from the
  instructions that define them)."""
  shapes = {m.group(1): _dims(m.group(2)) for m in map(_DEF.match, hlo.splitlines()) if m}
  ops = collections.Counter()
  for line in hlo.splitlines():
    m = _OP.search(line)
    if not m or m.group(3) not in shapes or m.group(4) not in shapes:
      continue
    out, kind, attrs = _dims(m.group(1)), m.group(2), m.group(5)
    d = {"lhs": shapes[m.group(3)], "rhs": shapes[m.group(4)], "out": out}
    if kind == "convolution":
      d["labels"] = re.search(r"dim_labels=([\w>\-]+)", attrs).group(1)
      groups = re.search(r"feature_group_count=(\d+)", attrs)
      d["groups"] = int(groups.group(1)) if groups else 1
      d.update(_window(attrs))
      ops[("conv", json.dumps(d))] += 1
    else:
      for key in ("lhs_contracting_dims", "rhs_contracting_dims", "lhs_batch_dims", "rhs_batch_dims"):
        found = re.search(key + r"=\{([\d,]*)\}", attrs)
        d[key] = [int(v) for v in found.group(1).split(",") if v] if found else []
      ops[("dot", json.dumps(d))] += 1
  return ops


def _conv_fn(d: dict):
  spec = _conv_spec(d["labels"])
  pads = [tuple(p) for p in d["pad"]]
  return lambda a, b: lax.conv_general_dilated(
      a, b, window_strides=d["stride"], padding=pads, lhs_dilation=d["lhs_dilate"], rhs_dilation=d["rhs_dilate"],
      dimension_numbers=spec, feature_group_count=d["groups"], precision=lax.Precision.HIGHEST)


def _dot_fn(d: dict):
  dn = ((d["lhs_contracting_dims"], d["rhs_contracting_dims"]), (d["lhs_batch_dims"], d["rhs_batch_dims"]))
  return lambda a, b: lax.dot_general(a, b, dn, precision=lax.Precision.HIGHEST)


def time_op(kind: str, d: dict, steps: int, repeats: int) -> tuple[float, float]:
  """(seconds per call, FLOPs per call) of one op on random float32 inputs."""
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.normal(size=d["lhs"]).astype(np.float32))
  b = jnp.asarray(rng.normal(size=d["rhs"]).astype(np.float32))
  fn = jax.jit(_conv_fn(d) if kind == "conv" else _dot_fn(d))
  compiled = fn.lower(a, b).compile()
  got = compiled(a, b)
  if tuple(got.shape) != tuple(d["out"]):
    raise ValueError(f"rebuilt {kind} gives {got.shape}, the step's has {d['out']}: {d}")
  jax.block_until_ready(got)
  seconds = statistics.median(throughput.timed(lambda: compiled(a, b), steps, repeats))
  return seconds, throughput.cost_flops(compiled)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", required=True)
  ap.add_argument("--batch_size", type=int, default=128)
  ap.add_argument("--gflops", type=float, default=240.0, help="the rate an op is compared with (sgemm here)")
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--repeats", type=int, default=3)
  throughput.add_conv_args(ap)
  args = ap.parse_args()
  from hvaeood import devices  # pylint: disable=import-outside-toplevel
  from hvaeood import state as state_lib  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel
  config = throughput.load_config(args.config)
  config.train.batch_size = args.batch_size
  throughput.set_conv(config, args.conv_impl, args.chunk_bytes)
  model = state_lib.model_for_config(config)
  mesh = devices.make_mesh(1)
  x_host = throughput.synthetic_batch(np.random.default_rng(0), args.batch_size, model.spec.image_shape,
                                      config.model.likelihood == "bernoulli")
  x = devices.to_global(x_host, NamedSharding(mesh, P("data")))
  state = state_lib.init_state(config, model, x_host, mesh)
  compiled = state_lib.jit_train_step(config, model, steps_per_epoch=1000, mesh=mesh).lower(state, x).compile()
  holder = {"state": state}

  def one_step():
    holder["state"], m = compiled(holder["state"], x)
    return m["loss"]

  jax.block_until_ready(one_step())
  step_s = statistics.median(throughput.timed(one_step, args.steps, args.repeats))
  rows, timed_s = [], 0.0
  for (kind, desc), count in hlo_ops(compiled.as_text()).items():
    d = json.loads(desc)
    seconds, flops = time_op(kind, d, args.steps, args.repeats)
    ideal = flops / (args.gflops * 1e9)
    timed_s += count * seconds
    rows.append({"op": kind, "count": count, "ms": round(1e3 * seconds, 3), "gflops": round(flops / seconds / 1e9, 1),
                 "ms_lost": round(1e3 * count * (seconds - ideal), 2), **{k: d[k] for k in ("lhs", "rhs", "out")},
                 **({"window": d["size"], "stride": d["stride"], "lhs_dilate": d["lhs_dilate"],
                     "labels": d["labels"]} if kind == "conv" else {})})
  for row in sorted(rows, key=lambda r: -r["ms_lost"]):
    print(json.dumps(row))
  print(json.dumps({"config": args.config, "batch_size": args.batch_size, "step_ms": round(1e3 * step_s, 1),
                    "timed_ops_ms": round(1e3 * timed_s, 1), "rest_ms": round(1e3 * (step_s - timed_s), 1),
                    "n_op_kinds": len(rows), "n_ops": sum(r["count"] for r in rows),
                    "lost_vs_gflops_ms": round(sum(r["ms_lost"] for r in rows), 1), "gflops_ref": args.gflops}))


if __name__ == "__main__":
  main()
