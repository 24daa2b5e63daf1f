"""One process of a 2-process run with wall-clock checkpoints (test_distributed), argv PID PORT WORKDIR
DATA_DIR NUM_STEPS; SIGTERM to either process stops both. Prints `SUMMARY <json>`.
"""
import json, sys
import jax
import helpers as H
from hvaeood import train
pid, port, workdir, data_dir, num_steps = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
config = H.tiny_config(data_dir, num_steps=num_steps, checkpoint_every=10**6)
config.checkpoint.every_minutes = 0.004  # a timed save every ~0.25 s of process 0's clock
config.checkpoint.keep = 1000
config.train.eval_every_steps = 10**6  # evaluate only at the end of a completed run
config.train.sync_every_steps = 2
config.train.distributed = True
config.train.coordinator_address = f'localhost:{port}'
config.train.num_processes = 2
config.train.process_id = pid
summary = train.train_and_evaluate(config, workdir)
print('SUMMARY ' + json.dumps(summary), flush=True)
jax.distributed.shutdown()
