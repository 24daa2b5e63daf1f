"""Side by side with the PyTorch reference (hvae-oodd) on this machine: reference, ours, reference, in one run.

  python benchmarks/compare_reference.py [--ref_dir /tmp/ref] [--ref_python /tmp/refvenv/bin/python]
      [--ref_time ../shared/reference/ref_time.py] [--channels 64] [--batch_size 128] [--eval_batch_size 500]

Prints the JSON line of each of the three runs and a last JSON line with the ratios (ours / the mean of the two
reference runs): training images/s at `--batch_size`, and the evaluation of every bound (ours: ELBO + every
L^{>k} in one jitted call, S = 1; the reference: L>0, L>1, L>2, one forward pass each, as its OOD script). The
absolute figures of this shared machine move by 10-20% between runs; the ratios measured in one run hold.
Where the reference checkout, its Python (torch) or the timing script is missing, it says so and exits 0 without
timing anything (see ../shared/reference/README.md for the setup). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _last_json(text: str) -> dict:
  for line in reversed(text.strip().splitlines()):
    if line.startswith("{"):
      return json.loads(line)
  raise RuntimeError(f"no JSON line in the output:\n{text[-2000:]}")


def _run(cmd: list[str], env: dict) -> dict:
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  result = _last_json(proc.stdout)
  print(json.dumps(result), flush=True)
  return result


def _missing(args) -> list[str]:
  missing = [f"{what} {path}" for what, path in (("reference checkout", os.path.join(args.ref_dir, "oodd")),
                                                  ("reference timing script", args.ref_time),
                                                  ("reference Python", args.ref_python)) if not os.path.exists(path)]
  if not missing:
    probe = subprocess.run([args.ref_python, "-c", "import torch"], capture_output=True, check=False)
    if probe.returncode != 0:
      missing.append(f"torch in {args.ref_python}")
  return missing


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ref_dir", default=os.environ.get("REF_DIR", "/tmp/ref"))
  parser.add_argument("--ref_python", default="/tmp/refvenv/bin/python")
  parser.add_argument("--ref_time", default=os.path.join(REPO, "..", "shared", "reference", "ref_time.py"))
  parser.add_argument("--config", default=os.path.join(REPO, "configs", "fashion_mnist_hvae.py"))
  parser.add_argument("--channels", type=int, default=64)
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--eval_batch_size", type=int, default=500)
  args = parser.parse_args()
  missing = _missing(args)
  if missing:
    print(f"skipped: missing {', '.join(missing)} (set them up as ../shared/reference/README.md says)")
    return
  env = dict(os.environ, REF_DIR=args.ref_dir, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  ref_cmd = [args.ref_python, args.ref_time, str(args.channels), str(args.batch_size)]
  ours_cmd = [sys.executable, os.path.join(REPO, "benchmarks", "throughput.py"), "--config", args.config,
              "--batch_size", str(args.batch_size), "--eval_batch_size", str(args.eval_batch_size)]
  ref_a = _run(ref_cmd, env)
  ours = _run(ours_cmd, env)
  ref_b = _run(ref_cmd, env)
  ref_train = (ref_a["train_img_per_s"] + ref_b["train_img_per_s"]) / 2
  ref_eval = (ref_a["eval_all3k_img_per_s"] + ref_b["eval_all3k_img_per_s"]) / 2
  print(json.dumps({"ratio_train": round(ours["train_img_per_s"] / ref_train, 3),
                    "ratio_eval": round(ours["eval_img_per_s"] / ref_eval, 3),
                    "ours_train_img_per_s": ours["train_img_per_s"], "ref_train_img_per_s": round(ref_train, 1),
                    "ours_eval_img_per_s": ours["eval_img_per_s"], "ref_eval_img_per_s": round(ref_eval, 1),
                    "targets": {"train": 1.0, "eval": 2.0}}), flush=True)


if __name__ == "__main__":
  main()
