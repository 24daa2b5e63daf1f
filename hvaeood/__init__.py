"""hvaeood: hierarchical VAEs for likelihood-based out-of-distribution detection, in JAX/Flax.

Importing the package (and its model and bound modules) does not import TensorFlow; only
`hvaeood.input_pipeline` and `hvaeood.data_import` do.
"""

__version__ = "0.1.0"
