"""FLOPs per training image of the PyTorch reference (torch's FlopCounterMode around one step of the model that
../shared/reference/ref_time.py times), to set beside XLA's count for ours (`throughput.py`'s
flops_per_train_image). Run with the reference's Python:

  REF_DIR=/tmp/ref /tmp/refvenv/bin/python benchmarks/ref_flops.py [--ref_time ../shared/reference/ref_time.py]
"""

import argparse
import json
import os
import sys
import types

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--ref_time", default=os.path.join(REPO, "..", "shared", "reference", "ref_time.py"))
  args = ap.parse_args()
  datasets = types.ModuleType("oodd.datasets")
  datasets.DataModule = object
  sys.modules["oodd.datasets"] = datasets  # the data loaders are not needed
  with open(args.ref_time, encoding="utf-8") as f:
    setup = f.read().split("step()\nn = 4")[0]  # the model, optimiser and step() of the timing script
  scope = {"__name__": "ref_time"}
  exec(compile(setup, args.ref_time, "exec"), scope)  # pylint: disable=exec-used
  with FlopCounterMode(display=False) as counter:
    scope["step"]()
  batch = scope["B"]
  print(json.dumps({"impl": f"hvae-oodd (PyTorch {torch.__version__})", "batch": batch,
                    "ref_flops_per_train_image": counter.get_total_flops() / batch}))


if __name__ == "__main__":
  main()
