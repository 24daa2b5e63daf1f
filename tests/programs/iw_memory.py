"""Peak RSS and bounds of S = 10 and S = 1000 importance sampling on 8 examples (test_evaluate).

argv: MAX_ROWS CHECKPOINT (a trained tiny workdir: its parameters are loaded, so this process compiles only the
two bounds programs, not the data-dependent init). Prints `RESULT <json>`.
"""
import json, resource, sys
import jax, jax.numpy as jnp, numpy as np
from hvaeood import devices, loading, scoring, state as state_lib

def peak_mb():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

loaded = loading.load_for_eval(sys.argv[2])
model, params = state_lib.model_for_config(loaded.config), loaded.params
x = jnp.asarray((np.random.default_rng(0).random((8, 28, 28, 1)) < 0.3).astype(np.float32))
mesh = devices.make_mesh()
res = {}
for s in (10, 1000):
  fn = scoring.make_bounds_fn(model, mesh, iw_samples=s, iw_samples_k=1, ks=(0, 1, 2), max_rows=int(sys.argv[1]))
  b = jax.device_get(fn(params, x, np.asarray(jax.random.PRNGKey(s))))
  res[s] = {"peak_mb": peak_mb(), "elbo": b.elbo.tolist(), "mean_single": (b.log_px - b.kl.sum(0)).tolist()}
print("RESULT " + json.dumps(res))
