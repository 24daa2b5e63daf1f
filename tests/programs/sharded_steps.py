"""The train step on 4 fake devices (test_distributed): argv IN.pkl OUT.pkl.

Reads the initial state and batches from IN, runs the sharded step on each batch and on an 18-row batch padded
to 20 rows (2 masked), and pickles the states and metrics to OUT.
"""
import os, pickle, sys
import jax, numpy as np
import helpers as H
from hvaeood import devices as hdev
from hvaeood import state as state_lib
inp, out = sys.argv[1], sys.argv[2]
with open(inp, 'rb') as f:
  d = pickle.load(f)
assert jax.device_count() == d['devices'], jax.devices()
config = H.tiny_config(d['data_dir'])
model = state_lib.model_for_config(config)
rep, data = H.shardings(jax.devices())
step = H.jit_step(config, model, d['spe'], jax.devices())
state = jax.device_put(d['state'], rep)
results = []
for batch in d['batches']:
  x = hdev.to_global(batch, data)
  assert len(x.sharding.device_set) == d['devices']
  state, metrics = step(state, x)
  results.append((H.state_to_host(state), H.state_to_host(metrics)))
# An 18-row batch on 4 devices: padded to 20 rows, the 2 padding rows masked.
padded = state_lib.check_batch(18, rep.mesh)
x18 = d['odd_batch']
mask = hdev.to_global(np.arange(padded) < 18, data)
pstep = jax.jit(state_lib.make_train_step(config, model, d['spe']), in_shardings=(rep, data, data),
                out_shardings=(rep, rep))
pstate, pmetrics = pstep(jax.device_put(d['state'], rep), hdev.to_global(hdev.pad_rows(x18, padded), data), mask)
results.append((padded, H.state_to_host(pstate), H.state_to_host(pmetrics)))
with open(out, 'wb') as f:
  pickle.dump(results, f)
