"""One process of a 2-process jax.distributed run on localhost (test_distributed): argv PID PORT WORKDIR DATA_DIR.

A 4-step tiny run with a checkpoint every 2 steps; prints `SUMMARY <json>`. Its checkpoints store the leaves of
4 KiB or more (the conv kernels and their Adam moments) as arrays of their own and pack the others, so that both
of format 2's storage paths are written by 2 processes (with the default 1 MiB every tiny leaf is packed).
"""
import json, sys
import jax
import helpers as H
from hvaeood import checkpoints as ckpt
from hvaeood import train
ckpt.OWN_ARRAY_BYTES = 4096
pid, port, workdir, data_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
config = H.tiny_config(data_dir, num_steps=4, checkpoint_every=2)
# train_and_evaluate calls jax.distributed.initialize with these (CPU collectives: gloo, JAX's default).
config.train.distributed = True
config.train.coordinator_address = f'localhost:{port}'
config.train.num_processes = 2
config.train.process_id = pid
summary = train.train_and_evaluate(config, workdir)
assert jax.process_count() == 2 and jax.device_count() == 2 and jax.local_device_count() == 1
print('SUMMARY ' + json.dumps(summary), flush=True)
jax.distributed.shutdown()
