"""train.py with NaN pixels in the batches of some steps (test_reliability); the arguments are train.py's.

$HVAEOOD_TEST_NAN_STEPS (comma-separated) lists the steps whose batches get NaN pixels, and every step from
$HVAEOOD_TEST_NAN_FROM on gets them too.
"""
import os
import pathlib
import runpy
import sys

import numpy as np

from hvaeood import input_pipeline

NAN_STEPS = {int(s) for s in os.environ["HVAEOOD_TEST_NAN_STEPS"].split(",")}
NAN_FROM = int(os.environ["HVAEOOD_TEST_NAN_FROM"])
TRAIN = str(pathlib.Path(__file__).resolve().parents[2] / "train.py")

_orig = input_pipeline.create_train_iterator


def create_train_iterator(config, *args, start_step=0, **kwargs):
  it = _orig(config, *args, start_step=start_step, **kwargs)

  def gen():
    for i, batch in enumerate(it):
      step = start_step + i + 1  # the step whose update uses this batch
      if step in NAN_STEPS or step >= NAN_FROM:
        batch = dict(batch)
        image = np.array(batch["image"], copy=True)
        image[:, :4, :4, :] = np.nan
        batch["image"] = image
      yield batch
  return gen()


input_pipeline.create_train_iterator = create_train_iterator
sys.argv[0] = TRAIN
runpy.run_path(TRAIN, run_name="__main__")
