"""Computations on a device mesh: the 1-D data mesh, padded batches, host <-> global arrays, and precision.

A batch of any size runs on any device count: `padded_batch_size` rounds it up to a multiple of the devices (and
processes), the caller pads with `pad_rows` and masks the padding. Global arrays are built from each process's
local rows (`to_global`) or from host-identical values (`replicate`).

Precision of float32 matmuls and convolutions ("default", "high", "highest", as `jax.default_matmul_precision`):
applied inside the jitted functions, so the lowered program carries it whatever the backend's default (bfloat16
passes on TPU, TF32 on recent GPUs; float32 on CPU either way).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

Array = jax.Array

PRECISIONS = ("default", "high", "highest")


def check_precision(value: str, flag: str) -> str:
  """A matmul/conv precision name (see `PRECISIONS`); ValueError naming the flag otherwise."""
  if value not in PRECISIONS:
    raise ValueError(f"{flag}={value!r} is not a precision; choose one of {', '.join(PRECISIONS)}.")
  return value


def make_mesh(num_devices: Optional[int] = None) -> Mesh:
  """A 1-D 'data' mesh over every device (or the first `num_devices`, for benchmarks)."""
  devices = jax.devices()
  if num_devices is not None:
    if not 1 <= num_devices <= len(devices):
      raise ValueError(f"num_devices={num_devices} but {len(devices)} devices are available; choose 1.."
                       f"{len(devices)}.")
    devices = devices[:num_devices]
  return Mesh(np.array(devices), ("data",))


def padded_batch_size(batch: int, mesh: Mesh) -> int:
  """The smallest multiple of the mesh's devices (and of the processes) >= `batch`.

  Any batch runs on any device count: a batch is padded to this size and the padding masked, so no default asks
  for a multiple of the device count.
  """
  n = math.lcm(int(mesh.devices.size), jax.process_count())
  return -(-int(batch) // n) * n


def pad_rows(local: np.ndarray, rows: int) -> np.ndarray:
  """Zero rows appended to a host-local batch so that it has `rows` rows."""
  extra = rows - local.shape[0]
  if extra < 0:
    raise ValueError(f"A local batch of {local.shape[0]} rows does not fit in {rows}.")
  if extra == 0:
    return local
  return np.concatenate([local, np.zeros((extra,) + local.shape[1:], local.dtype)])


def to_global(local_batch: np.ndarray, sharding: NamedSharding) -> Array:
  """The global array whose rows are every process's `local_batch`, in process order."""
  return jax.make_array_from_process_local_data(sharding, local_batch)


def replicate(tree, sharding: NamedSharding):
  """Host-identical numpy values (or a tree of them) as global arrays replicated over `sharding`'s mesh.

  Works across processes: every process must pass the same values.
  """
  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
  return jax.tree_util.tree_map(put, jax.device_get(tree))


def host_local(x: Array) -> np.ndarray:
  """The value of a replicated global array on this host (no collective)."""
  return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


def all_real_rows(local: np.ndarray) -> np.ndarray:
  """Every process's local rows, concatenated in process order (identical on every host; a collective)."""
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel  (only multi-process)
  return np.asarray(multihost_utils.process_allgather(local, tiled=True))
