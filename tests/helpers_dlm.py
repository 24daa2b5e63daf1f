"""Shared check of the discretised logistic mixture's normalisation (used by test_distributions and
test_input_pipeline): the probabilities of all 256^3 colours of one pixel, evaluated at given input values."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import helpers as H
from hvaeood import distributions as D


def coupled_params() -> np.ndarray:
  """One component's 10 parameters: wide enough log-scales that the pdf fallback is not the main mass, and
  non-zero colour coefficients (tanh = 0.66, -0.80, 0.54), so the colours are coupled."""
  rs = np.random.RandomState(7)
  means = rs.uniform(-1.1, 1.1, 3)
  log_s = np.array([-2.0, -3.5, -1.5])
  coef = np.array([0.8, -1.1, 0.6])
  return np.concatenate([[0.0], np.stack([means, log_s, coef], axis=-1).reshape(-1)]).astype(np.float32)


def grid_total(params_px: np.ndarray, nr_mix: int, values: np.ndarray) -> float:
  """Sum of exp(log p) over all 256^3 colours (R, G, B) whose channels take the 256 `values` (the model inputs
  of pixel levels 0..255), for ONE pixel's parameters; chunked over R. 1 when the values sit on the bins."""
  values = np.asarray(values, np.float32).reshape(256)
  gb = np.stack(np.meshgrid(values, values, indexing="ij"), axis=-1)  # [256 G, 256 B, 2]
  p = jnp.broadcast_to(jnp.asarray(params_px), (16, 256, 256, params_px.shape[-1]))

  # 16.8M evaluations: the run, not the compile, dominates, so this is compiled at XLA's default code generation
  # level (at the suite's level 0 the tests that call it took 2-5x longer; see helpers.set_test_xla_flags).
  @functools.partial(jax.jit, compiler_options=H.DEFAULT_CODEGEN)
  def chunk_sum(r_vals):
    r = jnp.broadcast_to(r_vals[:, None, None, None], (16, 256, 256, 1))
    x = jnp.concatenate([r, jnp.broadcast_to(jnp.asarray(gb), (16, 256, 256, 2))], axis=-1)
    return jnp.sum(jnp.exp(D.dlm_log_prob(x, p, nr_mix, per_pixel=True)), axis=(1, 2))

  return sum(float(np.sum(np.asarray(chunk_sum(jnp.asarray(values[i:i + 16])), np.float64)))
             for i in range(0, 256, 16))
