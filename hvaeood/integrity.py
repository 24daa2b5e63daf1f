"""Integrity of checkpoints: a file manifest, a checksum of the arrays, a shape pre-check and a finiteness check.

Every checkpoint carries two checksums. The file manifest (`hvaeood_files.json` in the step directory: size and
CRC-32 of every file, written after orbax's commit) is checked before orbax reads anything, so truncated or garbled
files get a clear message instead of a failed read. The state checksums in the meta item (a CRC-32 of each packed
array, computed on the host where `checkpoints.pack_state` puts them, and position-weighted sums of the bits of each
array stored on its own, computed on its devices) are checked after a restore: they catch garbling the manifest
cannot see (a checkpoint killed between orbax's commit and the manifest has none). Neither is meant to resist
tampering, only corruption: a CRC-32 detects every burst error up to 32 bits, the sums every single-bit flip.
Checkpoints of earlier versions are verified as written (format 1's `state_checksum` over every leaf, SHA-256
manifests, `state_sha256`).

A kill -9 needs neither: orbax writes each step into a temporary directory and renames it when complete, so a
killed save leaves no directory that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from hvaeood import io_utils
from hvaeood.errors import CheckpointError, CheckpointMismatchError

FILES_MANIFEST = "hvaeood_files.json"  # in each step directory
_CHUNK = 8 << 20


# ---------------------------------------------------------------------------------------------------------------
# The file manifest


def _crc32_file(path: str) -> str:
  crc = 0
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(_CHUNK), b""):
      crc = zlib.crc32(chunk, crc)
  return f"{crc:08x}"


def _sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(_CHUNK), b""):
      h.update(chunk)
  return h.hexdigest()


_FILE_HASHES = {"crc32": _crc32_file, "sha256": _sha256_file}


def _files(step_dir: str) -> list[str]:
  out = []
  for root, _, files in os.walk(step_dir):
    for name in files:
      rel = os.path.relpath(os.path.join(root, name), step_dir)
      if not rel.startswith(FILES_MANIFEST):
        out.append(rel)
  return sorted(out)


def write_manifest(step_dir: str) -> None:
  """Records size and CRC-32 of every file of a finished checkpoint (atomically, after orbax's commit)."""
  files = {rel: [os.path.getsize(os.path.join(step_dir, rel)), _crc32_file(os.path.join(step_dir, rel))]
           for rel in _files(step_dir)}
  io_utils.write_text(os.path.join(step_dir, FILES_MANIFEST), json.dumps({"algorithm": "crc32", "files": files},
                                                                          sort_keys=True), fsync=True)


def verify_files(step_dir: str) -> bool:
  """Checks a checkpoint's files against its manifest before orbax reads them (a clear reason, no read noise).

  Returns:
    True if verified, False if the checkpoint has no manifest (older, or killed just before writing it).
  Raises:
    CheckpointError: a file is missing, truncated or does not match its checksum.
  """
  path = os.path.join(step_dir, FILES_MANIFEST)
  if not os.path.exists(path):
    return False
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"its file manifest {FILES_MANIFEST} is unreadable ({type(e).__name__})") from None
  if "files" in manifest:
    algorithm, expected = manifest.get("algorithm", "crc32"), manifest["files"]
  else:  # the first format: {file: [size, sha256]}
    algorithm, expected = "sha256", manifest
  hash_file = _FILE_HASHES.get(algorithm)
  if hash_file is None:
    raise CheckpointError(f"its file manifest uses an unknown checksum {algorithm!r}")
  for rel, (size, _) in sorted(expected.items()):
    full = os.path.join(step_dir, rel)
    if not os.path.exists(full):
      raise CheckpointError(f"file {rel} is missing")
    got = os.path.getsize(full)
    if got != size:
      raise CheckpointError(f"file {rel} is truncated or overwritten ({got} bytes, {size} when saved)")
  for rel, (_, digest) in sorted(expected.items()):
    if hash_file(os.path.join(step_dir, rel)) != digest:
      raise CheckpointError(f"file {rel} does not match its checksum")
  return True


# ---------------------------------------------------------------------------------------------------------------
# The checksum of the arrays


def _bits(x: jax.Array) -> jax.Array:
  """The bit pattern of every element as uint32 (floats and ints of 8, 16 or 32 bits; bool as 0/1)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  width = x.dtype.itemsize * 8
  unsigned = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}[width]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)


@jax.jit
def _leaf_checksum(x: jax.Array) -> jax.Array:
  """[2] uint32: two position-weighted sums (mod 2^32) of a leaf's bit patterns. The weights are odd, so flipping
  any one bit changes both sums; a sum over another leaf's order or shape changes them too.

  Jitted per leaf, not over the whole state: a state has few distinct leaf shapes (48 for the paper's BIVA among
  3197 leaves), so this compiles a few small programs once, where one program over every leaf took far longer to
  compile than the save it checks (benchmarks/README.md, checkpoint save).
  """
  b = _bits(x)
  i = jnp.arange(b.shape[0], dtype=jnp.uint32)
  w1 = i * jnp.uint32(0x9E3779B1) | jnp.uint32(1)
  w2 = (i ^ jnp.uint32(0x85EBCA6B)) * jnp.uint32(0xC2B2AE35) | jnp.uint32(1)
  return jnp.stack([jnp.sum(b * w1, dtype=jnp.uint32), jnp.sum(b * w2, dtype=jnp.uint32)])


def state_checksum(state: Any) -> str:
  """A checksum of every leaf's path, dtype, shape and bit pattern, computed where the arrays are (a small
  reduction per leaf; only 8 bytes per leaf leave the devices). Every process gets the same value."""
  flat = [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]]
  sums = jax.device_get([_leaf_checksum(x) for _, x in flat])
  h = hashlib.sha256()
  for (path, x), row in zip(flat, np.asarray(sums)):
    h.update(f"{jax.tree_util.keystr(path)}|{jnp.dtype(x.dtype)}|{tuple(x.shape)}|{int(row[0])}|{int(row[1])}"
             .encode())
  return h.hexdigest()


def host_value(x) -> Optional[np.ndarray]:
  if isinstance(x, jax.Array):
    if x.is_fully_addressable:
      return np.asarray(x)
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return None
  return np.asarray(x)


def _legacy_sha256(state: Any) -> Optional[str]:
  """The first format's checksum (`state_sha256`): SHA-256 over the leaves' bytes on the host."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    value = host_value(leaf)
    if value is None:
      return None
    value = np.ascontiguousarray(value)
    h.update(f"{jax.tree_util.keystr(path)}|{value.dtype}|{value.shape}|".encode())
    h.update(value.tobytes())
  return h.hexdigest()


def packed_crc32(packed: dict) -> dict:
  """{dtype: CRC-32 (hex) of the bytes of each packed array} (checkpoint format 2: one numpy array per dtype)."""
  return {dtype: f"{zlib.crc32(np.ascontiguousarray(x).reshape(-1).view(np.uint8)):08x}"
          for dtype, x in packed.items()}


def item_checksums(item: dict) -> dict:
  """The meta entries that checksum a format 2 state item: `state_crc32` of the packed arrays (on the host, where
  they are) and `state_checksum` of the arrays stored on their own (on their devices, as `state_checksum`)."""
  return {"state_crc32": packed_crc32(item.get("packed", {})),
          "state_checksum": state_checksum(item["own"]) if item.get("own") else None}


def check_item(item: dict, meta: dict) -> None:
  """Verifies a restored format 2 state item against the checksums saved with it (`item_checksums`)."""
  if item_checksums(item) != {"state_crc32": meta.get("state_crc32"), "state_checksum": meta.get("state_checksum")}:
    raise CheckpointError("its arrays do not match the checksum saved with them (corrupted or truncated files)")


def check_state(state: Any, meta: dict) -> None:
  """Verifies restored arrays of a format 1 checkpoint (the state's tree) against the checksum saved with them
  (either of its checksums); no checksum: nothing to do."""
  if not isinstance(meta, dict):
    return
  if meta.get("state_checksum") is not None:
    ok = state_checksum(state) == meta["state_checksum"]
  elif meta.get("state_sha256") is not None:
    got = _legacy_sha256(state)
    ok = got is None or got == meta["state_sha256"]
  else:
    return
  if not ok:
    raise CheckpointError("its arrays do not match the checksum saved with them (corrupted or truncated files)")


# ---------------------------------------------------------------------------------------------------------------
# Shapes and values


def leaf_name(path) -> str:
  """A leaf's tree path as orbax names its arrays: keys, attribute names and indices joined by dots."""
  parts = []
  for k in path:
    for attr in ("name", "key", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return ".".join(parts)


def compare_shapes(stored: dict, wanted: dict) -> None:
  """Compares a checkpoint's arrays ({name: shape}) with the ones a config builds, in `wanted`'s order.

  Raises:
    CheckpointMismatchError: naming the first array with another shape, or missing on either side.
  """
  for name, shape in wanted.items():  # tree order: parameters before optimiser state
    if name in stored and stored[name] != shape:
      raise CheckpointMismatchError(f"array {name} is stored with shape {stored[name]} but the config builds "
                                    f"{shape}")
  missing = [name for name in wanted if name not in stored]
  if missing:
    raise CheckpointMismatchError(f"the config builds array {missing[0]}, which the checkpoint does not hold"
                                  + (f" ({len(missing)} such arrays)" if len(missing) > 1 else ""))
  extra = sorted(set(stored) - set(wanted))
  if extra:
    raise CheckpointMismatchError(f"the checkpoint holds array {extra[0]}, which the config does not build"
                                  + (f" ({len(extra)} such arrays)" if len(extra) > 1 else ""))


def check_shapes(step_dir: str, abstract_state: Any) -> None:
  """Format 1 checkpoints (the state item as a tree): compares the stored arrays' names and shapes (orbax
  metadata, no data read) with `abstract_state`, before orbax starts reading (see `compare_shapes`).

  A mismatch means the checkpoint belongs to another model (a changed config, or code that builds the model
  differently).
  """
  try:
    md = ocp.StandardCheckpointer().metadata(os.path.join(step_dir, "state"))
    tree = getattr(md, "item_metadata", md)
    tree = getattr(tree, "tree", tree)
    stored = {leaf.name: tuple(leaf.shape) for _, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
              if hasattr(leaf, "shape") and hasattr(leaf, "name")}
  except Exception:  # pylint: disable=broad-except
    return  # unreadable metadata: the restore itself reports the problem
  wanted = {leaf_name(p): tuple(leaf.shape) for p, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
  if not stored or not set(stored) & set(wanted):
    return  # names in a layout we do not know: leave the check to orbax
  compare_shapes(stored, wanted)


def check_finite(state: Any) -> None:
  """Rejects restored trees with non-finite parameters (a checkpoint that 'loads' but holds garbage)."""
  leaves = jax.tree_util.tree_leaves(getattr(state, "params", state))
  if not all(bool(jnp.all(jnp.isfinite(x))) for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)):
    raise CheckpointError("restored parameters contain non-finite values")
