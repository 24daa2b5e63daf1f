"""The checkpoint format: the packed state (format 2) against numpy, save/restore round trips of both formats,
and the errors of a checkpoint that belongs to another model or whose arrays were garbled.

In-process and small (random trees, no model): the runs that save and resume real TrainStates are in
test_train.py, test_reliability.py and test_distributed.py.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from hvaeood import checkpoints as ckpt
from hvaeood import integrity
from hvaeood.errors import CheckpointError, CheckpointMismatchError


def random_tree(seed: int = 0, scale: int = 1, empty: bool = True) -> dict:
  """A state-like tree of mixed dtypes and shapes: scalars, several leaves per dtype, zero-size leaves (one
  float32 among others, and a dtype with no element at all) unless `empty` is off."""
  rng = np.random.default_rng(seed)
  tree = {
      "step": np.int32(rng.integers(0, 10**6)),
      "params": {
          "conv": {"v": rng.standard_normal((3, 3, 2, 4 * scale)).astype(np.float32),
                   "g": rng.standard_normal((4 * scale,)).astype(np.float32),
                   "b": rng.standard_normal((4 * scale,)).astype(np.float32)},
          "dense": {"w": rng.standard_normal((5, 7)).astype(np.float32)},
      },
      "opt": [rng.standard_normal((6,)).astype(np.float32), np.int32(rng.integers(-5, 5))],
      "rng": rng.integers(0, 2**32, size=(2,), dtype=np.uint32),
      "flags": rng.integers(0, 2, size=(3,)).astype(bool),
  }
  if empty:
    tree["params"]["dense"]["empty"] = np.zeros((0, 3), np.float32)
    tree["counts"] = np.zeros((2, 0), np.int16)
  return tree


def on_device(tree):
  return jax.tree_util.tree_map(jnp.asarray, tree)


def abstract(tree):
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype,
                                                               sharding=sharding), tree)


def assert_bitwise_equal(got, want):
  got_flat, got_def = jax.tree_util.tree_flatten(got)
  want_flat, want_def = jax.tree_util.tree_flatten(want)
  assert got_def == want_def
  for g, w in zip(got_flat, want_flat):
    g, w = np.asarray(g), np.asarray(w)
    assert g.dtype == w.dtype and g.shape == w.shape
    np.testing.assert_array_equal(g.reshape(-1).view(np.uint8), w.reshape(-1).view(np.uint8))


@pytest.fixture(params=["all-packed", "some-own"])
def own_bytes(request, monkeypatch):
  """OWN_ARRAY_BYTES as shipped (every leaf of these trees is packed), or 64 bytes (the larger leaves are stored
  as arrays of their own)."""
  if request.param == "some-own":
    monkeypatch.setattr(ckpt, "OWN_ARRAY_BYTES", 64)
  return ckpt.OWN_ARRAY_BYTES


def test_pack_concatenates_each_dtype_in_tree_order_and_unpack_inverts_it(own_bytes):
  tree = random_tree(1)
  item, layout, own = ckpt.pack_state(on_device(tree))
  leaves = jax.tree_util.tree_leaves(tree)
  # Independently: which leaves are large, then numpy's ravel + concatenate over the others of each dtype.
  big = [i for i, x in enumerate(leaves) if np.asarray(x).nbytes >= own_bytes]
  assert own == big and (own_bytes > 1000 or len(big) == 2)
  small = [np.asarray(x) for i, x in enumerate(leaves) if i not in big]
  dtypes = sorted({x.dtype.name for x in small if x.size})  # int16 has no element
  assert sorted(item.get("packed", {})) == dtypes
  for name in dtypes:
    want = np.concatenate([np.ravel(x) for x in small if x.dtype.name == name])
    np.testing.assert_array_equal(np.asarray(item["packed"][name]), want)
  assert sorted(item.get("own", {})) == sorted(str(i) for i in big)
  for i in big:
    np.testing.assert_array_equal(np.asarray(item["own"][str(i)]), np.asarray(leaves[i]))
  assert [shape for _, _, shape in layout] == [list(np.shape(x)) for x in leaves]
  assert len({name for name, _, _ in layout}) == len(leaves)  # names are unique
  assert_bitwise_equal(ckpt.unpack_state(item, layout, abstract(tree)), tree)


def test_unpack_casts_to_the_wanted_dtype():
  tree = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.float32(-2.5)}
  item, layout, own = ckpt.pack_state(on_device(tree))
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  # b wanted as bfloat16 (as orbax casts to the abstract dtype on restore).
  wanted = {"b": jax.ShapeDtypeStruct((), jnp.bfloat16, sharding=sharding),
            "a": jax.ShapeDtypeStruct((2, 3), jnp.float32, sharding=sharding)}
  got = ckpt.unpack_state(item, layout, wanted)
  assert got["b"].dtype == jnp.bfloat16 and float(got["b"]) == -2.5
  np.testing.assert_array_equal(np.asarray(got["a"]), tree["a"])


def test_save_restore_round_trip_is_bitwise_with_one_stored_array_per_dtype(tmp_path, own_bytes):
  tree = random_tree(2)
  manager = ckpt.make_manager(str(tmp_path / "ckpts"), keep=3)
  ckpt.save(manager, 7, on_device(tree), {"config": "{}", "step": 7})
  state, meta = ckpt.restore(ckpt.make_manager(str(tmp_path / "ckpts"), keep=3, read_only=True), 7,
                             abstract(tree))
  assert_bitwise_equal(state, tree)
  assert meta["format_version"] == ckpt.FORMAT_VERSION == 2 and meta["step"] == 7
  stored = ocp.StandardCheckpointer().metadata(str(tmp_path / "ckpts" / "7" / "state"))
  stored = getattr(getattr(stored, "item_metadata", stored), "tree", stored)
  leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]
  small = [x for x in leaves if x.nbytes < own_bytes]
  assert sorted(stored.get("packed", {})) == sorted({x.dtype.name for x in small if x.size})
  assert len(stored.get("own", {})) == len(leaves) - len(small) == len(meta["own_arrays"])
  assert integrity.verify_files(str(tmp_path / "ckpts" / "7"))


def test_format_1_checkpoints_still_restore(tmp_path):
  """A checkpoint as format 1 wrote it: the state item is the tree itself, the checksum over its leaves (orbax
  saves no zero-size array as a tree leaf, so none here)."""
  tree = on_device(random_tree(3, empty=False))
  manager = ckpt.make_manager(str(tmp_path / "v1"), keep=3)
  meta = {"format_version": 1, "config": "{}", "step": 5, "state_checksum": integrity.state_checksum(tree)}
  manager.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)))
  integrity.write_manifest(str(tmp_path / "v1" / "5"))
  state, got_meta = ckpt.restore(manager, 5, abstract(random_tree(3, empty=False)))
  assert_bitwise_equal(state, random_tree(3, empty=False))
  assert got_meta["format_version"] == 1
  with pytest.raises(CheckpointMismatchError, match=r"array params\.conv\.b is stored with shape"):
    ckpt.restore(manager, 5, abstract(random_tree(3, scale=2, empty=False)))


@pytest.mark.parametrize("change, message", [
    ("shape", r"array params\.conv\.b is stored with shape \(4,\) but the config builds \(8,\)"),
    ("missing", r"the config builds array params\.extra, which the checkpoint does not hold"),
    ("extra", r"the checkpoint holds array params\.dense\.w, which the config does not build"),
])
def test_a_checkpoint_of_another_model_is_refused_naming_the_array(tmp_path, change, message, own_bytes):
  tree = random_tree(4)
  manager = ckpt.make_manager(str(tmp_path / "ckpts"), keep=3)
  ckpt.save(manager, 1, on_device(tree), {"step": 1})
  other = random_tree(4, scale=2 if change == "shape" else 1)
  if change == "missing":
    other["params"]["extra"] = np.zeros((2,), np.float32)
  if change == "extra":
    del other["params"]["dense"]["w"]
  with pytest.raises(CheckpointMismatchError, match=message):
    ckpt.restore(manager, 1, abstract(other))


def _data_files(step_dir):
  out = []
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    if os.path.basename(root) == "d":
      out += [os.path.join(root, f) for f in files]
  return sorted(out, key=os.path.getsize, reverse=True)


@pytest.mark.parametrize("where", ["packed", "own"])
def test_garbled_data_is_refused_by_the_manifest_and_without_it_by_the_checksums(tmp_path, monkeypatch, where):
  """Flip bits in the middle of the stored data (the packed float32 array, or with every leaf of 4 KiB or more
  stored on its own, one of those): refused by the file manifest, and without it by the meta item's checksums."""
  tree = random_tree(5, scale=64)  # the conv kernel: 3 x 3 x 2 x 256 float32 = 18 KiB
  if where == "own":
    monkeypatch.setattr(ckpt, "OWN_ARRAY_BYTES", 4096)
  manager = ckpt.make_manager(str(tmp_path / "ckpts"), keep=3)
  ckpt.save(manager, 3, on_device(tree), {"step": 3})
  meta = ckpt.read_meta(manager, 3)
  assert bool(meta["own_arrays"]) == (where == "own")
  step_dir = str(tmp_path / "ckpts" / "3")
  path = _data_files(step_dir)[0]
  data = bytearray(open(path, "rb").read())
  for i in range(len(data) // 2, len(data) // 2 + 4):
    data[i] ^= 0x10
  with open(path, "wb") as f:
    f.write(bytes(data))
  with pytest.raises(CheckpointError, match="does not match its checksum"):
    ckpt.restore(manager, 3, abstract(tree))
  os.remove(os.path.join(step_dir, ckpt.FILES_MANIFEST))
  garbled, _ = ckpt.restore(manager, 3, abstract(tree), verify=False)  # what orbax alone returns
  assert any(not np.array_equal(np.asarray(a), b) for a, b in zip(jax.tree_util.tree_leaves(garbled),
                                                                   jax.tree_util.tree_leaves(tree)))
  with pytest.raises(CheckpointError, match="arrays do not match the checksum"):
    ckpt.restore(manager, 3, abstract(tree))


def test_layout_is_stored_in_the_meta_item_as_json(tmp_path):
  tree = random_tree(6)
  manager = ckpt.make_manager(str(tmp_path / "ckpts"), keep=3)
  ckpt.save(manager, 2, on_device(tree), {"step": 2})
  meta = json.loads((tmp_path / "ckpts" / "2" / "meta" / "metadata").read_text())
  by_name = {name: (dtype, shape) for name, dtype, shape in meta["layout"]}
  assert by_name["params.conv.v"] == ("float32", [3, 3, 2, 4])
  assert by_name["rng"] == ("uint32", [2])
  assert by_name["step"] == ("int32", [])
  assert by_name["opt.1"] == ("int32", [])
