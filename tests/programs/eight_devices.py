"""The tiny config on 8 fake devices through two evaluations (test_distributed): argv WORKDIR DATA_DIR.

Prints `SUMMARY <json>`.
"""
import json, sys
import jax
import helpers as H
from hvaeood import train
assert jax.device_count() == 8
config = H.tiny_config(sys.argv[2], num_steps=4)
config.train.batch_size = 20  # padded to 24 rows (4 masked)
config.train.eval_every_steps = 2  # two evaluations of 50 examples: batches padded to 56 rows
summary = train.train_and_evaluate(config, sys.argv[1])
print('SUMMARY ' + json.dumps(summary), flush=True)
