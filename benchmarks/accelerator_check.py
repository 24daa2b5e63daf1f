"""One-call accelerator check: training and all-k evaluation speed of the paper HVAEs, and the effect of the
backend's default matmul/conv precision on the numbers users compare with the paper.

  python benchmarks/accelerator_check.py [--out DIR] [--configs configs/fashion_mnist_hvae.py,configs/cifar10_hvae.py]
      [--batch_sizes 128,512] [--steps 20] [--eval_batch_size 500]
      [--conv_impl auto|fast|plain] [--chunk_bytes N]
  python benchmarks/accelerator_check.py --smoke          # CPU smoke test: tiny variants, 1 step, small batches

For each config it prints (and writes to DIR/accelerator_check.jsonl) one JSON line with:
* `train`: per batch size, training images/s at `config.train.precision` (median of 3 windows of `--steps` steps,
  blocking on the result), compile seconds, XLA's FLOPs per image and the achieved TFLOP/s;
* `eval`: images/s of the ELBO and every L^{>k} (S = S_k = 1) of a batch at precision "highest" and "default";
* `precision_effect`: for one fixed synthetic batch, fixed parameters (the data-dependent init on the first
  training batch) and fixed latent keys, the mean and largest per-example |difference| of the ELBO and of
  LLR^{>1} between "default" and "highest", in nats, and the relative difference of the ELBO;
* the backend, device kind and count, and the convolution path: `conv_impl` (config.model.conv_impl, or
  `--conv_impl`), `fast_conv_paths` (whether the CPU-tuned conv rewrites are on: `layers.resolve_fast`; "auto"
  turns them on on the CPU backend only) and `conv_chunk_bytes` (their batch-chunk budget, or `--chunk_bytes`).

Synthetic batches only (binarised uniform noise, or uniform [0, 1) data for the logistic mixture): it imports no
TensorFlow or tensorflow-datasets, so it runs on accelerator images without them (ml_collections, a pure-Python
package, must be importable for the configs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hvaeood  # noqa: E402

hvaeood.set_xla_cpu_defaults()  # before JAX starts its CPU backend

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import throughput  # noqa: E402  (benchmarks/throughput.py: config loading, synthetic data, timing, FLOPs)

DEFAULT_CONFIGS = "configs/fashion_mnist_hvae.py,configs/cifar10_hvae.py"


def _train_speed(config, model, mesh, batch_size: int, steps: int, rng) -> tuple[dict, object]:
  from hvaeood import devices  # pylint: disable=import-outside-toplevel
  from hvaeood import state as state_lib  # pylint: disable=import-outside-toplevel
  config.train.batch_size = batch_size
  bs = devices.padded_batch_size(batch_size, mesh)
  binary = config.model.likelihood == "bernoulli"
  x_host = throughput.synthetic_batch(rng, bs, model.spec.image_shape, binary)
  x = devices.to_global(x_host, NamedSharding(mesh, P("data")))
  state = state_lib.init_state(config, model, x_host, mesh)
  init_params = jax.device_get(state.params)  # fixed parameters for the precision comparison (the state is donated)
  step = state_lib.jit_train_step(config, model, steps_per_epoch=1000, mesh=mesh)
  t0 = time.perf_counter()
  compiled = step.lower(state, x).compile()
  compile_s = time.perf_counter() - t0
  flops = throughput.cost_flops(compiled) * mesh.devices.size
  holder = {"state": state}

  def one():
    holder["state"], m = compiled(holder["state"], x)
    return m["loss"]

  jax.block_until_ready(one())
  step_s = statistics.median(throughput.timed(one, steps, 3))
  return {"batch_size": batch_size, "img_per_s": bs / step_s, "step_s": step_s, "compile_s": compile_s,
          "flops_per_image": flops / bs, "tflops": flops / step_s / 1e12,
          "precision": config.train.precision}, init_params


def _eval(model, mesh, params, x, precision: str, steps: int) -> tuple[dict, object]:
  from hvaeood import scoring  # pylint: disable=import-outside-toplevel
  ks = tuple(range(model.spec.num_layers))
  fn = scoring.make_bounds_fn(model, mesh, iw_samples=1, iw_samples_k=1, ks=ks, max_rows=None, precision=precision)
  key = np.asarray(jax.random.PRNGKey(0))
  out = jax.device_get(fn(params, x, key))  # compile + the fixed-key values
  t = statistics.median(throughput.timed(lambda: fn(params, x, key).elbo, steps, 3))
  return {"img_per_s": x.shape[0] / t, "precision": precision}, out


def check(spec: str, batch_sizes: list[int], steps: int, eval_batch: int, rng, conv_impl=None,
          chunk_bytes=None) -> dict:
  from hvaeood import devices  # pylint: disable=import-outside-toplevel
  from hvaeood import state as state_lib  # pylint: disable=import-outside-toplevel
  config = throughput.load_config(spec)
  throughput.set_conv(config, conv_impl, chunk_bytes)
  model = state_lib.model_for_config(config)
  mesh = devices.make_mesh()
  conv = throughput.conv_settings(config, model)
  result = {"config": spec, "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "device_count": mesh.devices.size, "conv_impl": conv["conv_impl"], "fast_conv_paths": conv["fast_conv"],
            "conv_chunk_bytes": conv["conv_chunk_bytes"], "train": []}
  params = None
  for bs in batch_sizes:
    speed, init_params = _train_speed(config, model, mesh, bs, steps, rng)
    params = init_params if params is None else params  # the data-dependent init of the first batch size
    result["train"].append(speed)
  binary = config.model.likelihood == "bernoulli"
  eb = devices.padded_batch_size(eval_batch, mesh)
  x = jax.device_put(throughput.synthetic_batch(rng, eb, model.spec.image_shape, binary),
                     NamedSharding(mesh, P("data")))
  params = devices.replicate(params, NamedSharding(mesh, P()))
  result["eval"], outs = [], {}
  for precision in ("highest", "default"):
    speed, outs[precision] = _eval(model, mesh, params, x, precision, max(1, steps // 4))
    result["eval"].append(speed)
  hi, lo = outs["highest"], outs["default"]
  d_elbo = np.abs(np.asarray(lo.elbo, np.float64) - np.asarray(hi.elbo, np.float64))
  d_llr = np.abs(np.asarray(lo.llr[1], np.float64) - np.asarray(hi.llr[1], np.float64))
  result["precision_effect"] = {
      "elbo_highest_mean": float(np.mean(hi.elbo)), "elbo_default_mean": float(np.mean(lo.elbo)),
      "elbo_abs_diff_mean": float(d_elbo.mean()), "elbo_abs_diff_max": float(d_elbo.max()),
      "elbo_rel_diff_max": float(np.max(d_elbo / np.abs(np.asarray(hi.elbo, np.float64)))),
      "llr1_abs_diff_mean": float(d_llr.mean()), "llr1_abs_diff_max": float(d_llr.max()), "examples": int(eb)}
  return result


def main(argv=None) -> list[dict]:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated config[:variant] files")
  ap.add_argument("--batch_sizes", default="128", help="comma-separated training batch sizes")
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--eval_batch_size", type=int, default=500)
  ap.add_argument("--out", default=os.environ.get("OUT"), help="directory for accelerator_check.jsonl")
  ap.add_argument("--smoke", action="store_true", help="tiny variants, batch 8, 1 step (a CPU smoke test)")
  throughput.add_conv_args(ap)  # --conv_impl, --chunk_bytes
  args = ap.parse_args(argv)
  if args.smoke:
    args.configs = ",".join(f"{c}:tiny" for c in DEFAULT_CONFIGS.split(","))
    args.batch_sizes, args.steps, args.eval_batch_size = "8", 1, 8
  rng = np.random.default_rng(0)
  results = []
  for spec in args.configs.split(","):
    r = check(spec, [int(b) for b in args.batch_sizes.split(",")], args.steps, args.eval_batch_size, rng,
              args.conv_impl, args.chunk_bytes)
    line = json.dumps(r, default=lambda v: round(v, 6) if isinstance(v, float) and math.isfinite(v) else str(v))
    print(line, flush=True)
    if args.out:
      os.makedirs(args.out, exist_ok=True)
      with open(os.path.join(args.out, "accelerator_check.jsonl"), "a", encoding="utf-8") as f:
        f.write(line + "\n")
    results.append(r)
  return results


if __name__ == "__main__":
  main()
