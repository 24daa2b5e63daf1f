"""Model family: the paper's HVAE (bottom-up or ladder inference, `hvae.py`) and BIVA (`biva.py`).

Both return the same `Output` (`blocks.py`) from `__call__(x, n_skip, prior_sample)`, so bounds, training and
evaluation are shared.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import ml_collections

from hvaeood import layers
from hvaeood.models.biva import BIVA, biva_spec_from_config
from hvaeood.models.blocks import Output
from hvaeood.models.hvae import HVAE, HVAESpec, count_params, spec_from_config

# name -> (module class, spec builder from config.model and the image shape)
MODELS = {"hvae": (HVAE, spec_from_config), "biva": (BIVA, biva_spec_from_config)}


def build_model(model_cfg: ml_collections.ConfigDict, image_shape: Sequence[int]) -> nn.Module:
  """Builds the model named by `model_cfg.name` for images of shape (H, W, C)."""
  name = model_cfg.get("name", "hvae")
  if name not in MODELS:
    raise ValueError(f"Unknown model {name!r}; choose one of {sorted(MODELS)}.")
  module, spec_fn = MODELS[name]
  return module(spec_fn(model_cfg, image_shape))


def init_params(model: nn.Module, rng: jax.Array, init_batch: jax.Array):
  """Data-dependent initialisation on a real batch [B, H, W, C] (weight-norm g and b set from its stats).

  Every `v` is He-normal, cut from one normal draw of the params key (`layers.one_draw`: the init compiles
  without a draw and a key derivation per parameter).
  """
  param_rng, sample_rng = jax.random.split(rng)

  def init(b):
    return layers.one_draw(lambda: model.init({"params": param_rng, "sample": sample_rng}, b, 0), param_rng)

  return jax.jit(init)(init_batch)["params"]


__all__ = ["HVAE", "HVAESpec", "Output", "build_model", "count_params", "init_params", "spec_from_config"]
