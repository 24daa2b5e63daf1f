"""Effect of bfloat16 compute on the bounds of a trained model: float32 vs bfloat16 on the same data and samples.

  python benchmarks/bf16_effect.py --checkpoint runs/fmnist_cpu --data_dir ~/.cache/hvaeood/tfds \
      [--max_examples 1000] [--batch_size 250]

Loads the checkpoint once and builds its model twice, with `compute_dtype` float32 and bfloat16 (convolutions
and dense layers in bfloat16; weight norm, likelihoods and KLs in float32), then computes the ELBO and every
L^{>k} of the same test examples with the same keys. Prints one JSON line: mean ELBO (nats and bits/dim) for
both dtypes, the mean and largest absolute per-example difference, and the LLR^{>k} AUROC change is left to
evaluate.py (this only measures the bounds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hvaeood  # noqa: E402

hvaeood.set_xla_cpu_defaults()  # before JAX starts its CPU backend

import jax  # noqa: E402
import numpy as np  # noqa: E402

from hvaeood import bounds, input_pipeline, loading  # noqa: E402
from hvaeood.datasets_info import get_dataset_info  # noqa: E402
from hvaeood.models import build_model  # noqa: E402


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--checkpoint", required=True)
  ap.add_argument("--data_dir", default=None)
  ap.add_argument("--max_examples", type=int, default=1000)
  ap.add_argument("--batch_size", type=int, default=250)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)

  ckpt = loading.load_for_eval(args.checkpoint)
  cfg = ckpt.config
  info = get_dataset_info(cfg.data.name)
  ks = tuple(range(len(cfg.model.latent_dims)))
  out = {"checkpoint": ckpt.path, "step": ckpt.step, "dataset": cfg.data.name, "ks": list(ks)}
  results = {}
  for dtype in ("float32", "bfloat16"):
    mcfg = cfg.model.copy_and_resolve_references()
    mcfg.compute_dtype = dtype
    model = build_model(mcfg, info.shape)
    fn = jax.jit(lambda p, x, key, model=model: bounds.compute_bounds(model, p, x, key, ks=ks))
    it, n = input_pipeline.create_eval_dataset(cfg.data.name, "test", preprocessing=cfg.data.preprocessing,
                                               batch_size=args.batch_size, seed=args.seed,
                                               max_examples=args.max_examples, data_dir=args.data_dir,
                                               target_shape=info.shape)
    elbo, lk = [], []
    for i, batch in enumerate(it):
      b = fn(ckpt.params, batch["image"], jax.random.fold_in(jax.random.PRNGKey(args.seed), i))
      m = batch["mask"]
      elbo.append(np.asarray(b.elbo)[m])
      lk.append(np.asarray(b.lk)[:, m])
    results[dtype] = (np.concatenate(elbo).astype(np.float64), np.concatenate(lk, axis=1).astype(np.float64))
  dims = int(np.prod(info.shape))
  (e32, l32), (e16, l16) = results["float32"], results["bfloat16"]
  out.update({
      "n_examples": int(e32.size),
      "elbo_float32": float(e32.mean()), "elbo_bfloat16": float(e16.mean()),
      "bpd_float32": float(-e32.mean() / (dims * np.log(2))), "bpd_bfloat16": float(-e16.mean() / (dims * np.log(2))),
      "elbo_mean_abs_diff": float(np.abs(e32 - e16).mean()), "elbo_max_abs_diff": float(np.abs(e32 - e16).max()),
      "lk_mean_float32": [float(v) for v in l32.mean(axis=1)],
      "lk_mean_bfloat16": [float(v) for v in l16.mean(axis=1)],
      "lk_mean_abs_diff": [float(v) for v in np.abs(l32 - l16).mean(axis=1)],
  })
  print(json.dumps(out))


if __name__ == "__main__":
  main()
