"""Tests of image sources beyond the registry (`hvaeood.image_sources`) and of the in-memory evaluation pipeline
(`input_pipeline.create_eval_dataset_from_array`, the png_bits column). Real files in tmp_path; no network."""

import fractions
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from hvaeood import image_sources
from hvaeood import input_pipeline as ip
from hvaeood.errors import DataSourceError

MNIST = (28, 28, 1)


def _png(path, pixels: np.ndarray, fmt: str = "PNG") -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(pixels[..., 0] if pixels.ndim == 3 and pixels.shape[-1] == 1 else pixels).save(path, fmt)
  return str(path)


def _random(shape, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _luma_exact(rgb: np.ndarray) -> np.ndarray:
  """round(0.299 R + 0.587 G + 0.114 B), halves up, in exact rationals (an independent path from `luma`)."""
  w = [fractions.Fraction(299, 1000), fractions.Fraction(587, 1000), fractions.Fraction(114, 1000)]
  flat = [int((w[0] * int(r) + w[1] * int(g) + w[2] * int(b) + fractions.Fraction(1, 2)) // 1)
          for r, g, b in rgb.reshape(-1, 3)]
  return np.array(flat, np.uint8).reshape(rgb.shape[:-1] + (1,))


# ---------------------------------------------------------------------------------------------------------------
# parse


def test_parse_kinds_and_table_names(tmp_path):
  folder = tmp_path / "my:set"
  folder.mkdir()
  np.save(tmp_path / "arr.npy", _random((2, 28, 28)))
  np.savez(tmp_path / "pack.npz", a=_random((2, 28, 28)))
  got = {s: image_sources.parse(s) for s in ("mnist", "svhn", "tfds:emnist/letters:test", "tfds:kmnist",
                                             str(folder) + "/", str(tmp_path / "arr.npy"),
                                             str(tmp_path / "pack.npz") + ":a")}
  assert [(g.kind, g.name) for g in got.values()] == [
      ("registry", "mnist"), ("registry", "svhn_cropped"), ("tfds", "emnist_letters"), ("tfds", "kmnist"),
      ("directory", "my_set"), ("array", "arr"), ("array", "pack")]
  t = got["tfds:emnist/letters:test"]
  assert (t.tfds_name, t.config, t.split) == ("emnist", "letters", "test")
  assert got["tfds:kmnist"].split == "test" and got[str(tmp_path / "pack.npz") + ":a"].key == "a"
  assert not any("/" in g.name or ":" in g.name for g in got.values())


# ---------------------------------------------------------------------------------------------------------------
# Loading folders and arrays


def test_folder_loads_in_sorted_path_order_with_exact_pixels(tmp_path):
  imgs = {rel: _random(MNIST, seed=i) for i, rel in enumerate(["b/2.png", "a/1.PNG", "a/sub/0.png"])}
  for rel, pixels in imgs.items():
    _png(tmp_path / rel, pixels)
  jpg = _png(tmp_path / "c.jpg", np.full(MNIST, 77, np.uint8), "JPEG")
  (tmp_path / "a" / "notes.txt").write_text("not an image")
  got = image_sources.load(str(tmp_path), MNIST)
  assert got.dtype == np.uint8 and got.shape == (4, 28, 28, 1)
  for i, rel in enumerate(["a/1.PNG", "a/sub/0.png", "b/2.png"]):
    np.testing.assert_array_equal(got[i], imgs[rel])
  np.testing.assert_array_equal(got[3, ..., 0], np.asarray(Image.open(jpg)))
  np.testing.assert_array_equal(image_sources.load(str(tmp_path), MNIST, max_examples=2), got[:2])


def test_grey_to_rgb_replicates_and_rgb_to_grey_is_bt601_luma(tmp_path):
  rgb = _random((6, 5, 3), seed=1)
  rgb[0, 0] = (0, 0, 250)  # 28.5 exactly: rounded up to 29
  grey = _random((6, 5, 1), seed=2)
  _png(tmp_path / "rgb" / "x.png", rgb)
  _png(tmp_path / "grey" / "x.png", grey)
  to_grey = image_sources.load(str(tmp_path / "rgb"), (6, 5, 1))[0]
  np.testing.assert_array_equal(to_grey, _luma_exact(rgb))
  assert to_grey[0, 0, 0] == 29
  np.testing.assert_array_equal(image_sources.load(str(tmp_path / "grey"), (6, 5, 3))[0],
                                np.concatenate([grey] * 3, axis=-1))
  np.testing.assert_array_equal(image_sources.load(str(tmp_path / "rgb"), (6, 5, 3))[0], rgb)


def test_alpha_is_dropped_and_palette_and_1bit_pngs_convert(tmp_path):
  rgba, la = _random((4, 4, 4), seed=3), _random((4, 4, 2), seed=4)
  Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
  np.testing.assert_array_equal(image_sources.load(str(tmp_path), (4, 4, 3))[0], rgba[..., :3])
  os.remove(tmp_path / "a.png")
  Image.fromarray(la, "LA").save(tmp_path / "b.png")
  np.testing.assert_array_equal(image_sources.load(str(tmp_path), (4, 4, 1))[0], la[..., :1])
  os.remove(tmp_path / "b.png")
  Image.fromarray(rgba[..., :3]).quantize(8).save(tmp_path / "p.png")
  palette = np.asarray(Image.open(tmp_path / "p.png").convert("RGB"))
  np.testing.assert_array_equal(image_sources.load(str(tmp_path), (4, 4, 3))[0], palette)
  os.remove(tmp_path / "p.png")
  Image.fromarray(rgba[..., 0] > 127).save(tmp_path / "bits.png")
  np.testing.assert_array_equal(image_sources.load(str(tmp_path), (4, 4, 1))[0, ..., 0],
                                np.where(rgba[..., 0] > 127, 255, 0))
  arr = image_sources.load(_save(tmp_path / "rgba.npy", rgba[None]), (4, 4, 1))
  np.testing.assert_array_equal(arr[0], _luma_exact(rgba[..., :3]))


def _save(path, array) -> str:
  np.save(path, array)
  return str(path)


def test_npy_and_npz_load(tmp_path):
  x = _random((5, 28, 28), seed=5)
  np.testing.assert_array_equal(image_sources.load(_save(tmp_path / "x.npy", x), MNIST), x[..., None])
  np.savez(tmp_path / "one.npz", images=x)
  np.testing.assert_array_equal(image_sources.load(str(tmp_path / "one.npz"), MNIST, max_examples=3),
                                x[:3, ..., None])
  np.savez_compressed(tmp_path / "two.npz", labels=np.arange(5), images=x[..., None])
  np.testing.assert_array_equal(image_sources.load(str(tmp_path / "two.npz") + ":images", MNIST), x[..., None])


def test_resize_is_pil_bilinear(tmp_path):
  rgb, grey = _random((40, 36, 3), seed=6), _random((20, 50), seed=7)
  _png(tmp_path / "rgb" / "a.png", rgb)
  want = np.asarray(Image.fromarray(rgb).resize((28, 32), Image.Resampling.BILINEAR))
  np.testing.assert_array_equal(image_sources.load(str(tmp_path / "rgb"), (32, 28, 3), resize=True)[0], want)
  want = np.asarray(Image.fromarray(grey).resize((28, 28), Image.Resampling.BILINEAR))
  got = image_sources.load(_save(tmp_path / "g.npy", np.stack([grey, grey[::-1]])), MNIST, resize=True)
  np.testing.assert_array_equal(got[0, ..., 0], want)
  _png(tmp_path / "rgb" / "b.png", _random((28, 28, 3), seed=8))  # mixed sizes are fine with resize
  assert image_sources.load(str(tmp_path / "rgb"), MNIST, resize=True).shape == (2, 28, 28, 1)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the path and the fix


def _bad_inputs(tmp_path) -> dict:
  """name -> (spec, load kwargs, substrings of the message)."""
  d = tmp_path
  (d / "empty").mkdir()
  (d / "empty" / "readme.txt").write_text("x")
  (d / "corrupt").mkdir()
  (d / "corrupt" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
  _png(d / "truncated" / "cut.png", _random(MNIST))
  data = (d / "truncated" / "cut.png").read_bytes()
  (d / "truncated" / "cut.png").write_bytes(data[:len(data) // 2])
  _png(d / "mixed" / "a.png", _random(MNIST))
  _png(d / "mixed" / "b.png", _random((30, 28, 1)))
  _png(d / "big" / "a.png", _random((32, 32, 3)))
  Image.fromarray(np.full((28, 28), 4000, np.uint16)).save(_dir(d / "deep") + "/w.png")
  np.savez(d / "many.npz", a=_random((2, 28, 28)), b=_random((2, 28, 28)))
  (d / "notes.txt").write_text("x")
  return {
      "missing": (str(d / "nope"), {}, [str(d / "nope"), "no such file", "tfds:NAME"]),
      "not a source": (str(d / "notes.txt"), {}, ["notes.txt", ".npy/.npz"]),
      "empty folder": (str(d / "empty"), {}, [str(d / "empty"), "no .png/.jpg/.jpeg images"]),
      "corrupt image": (str(d / "corrupt"), {}, ["bad.png", "cannot read the image", "replace or remove"]),
      "truncated image": (str(d / "truncated"), {}, ["cut.png", "cannot read the image"]),
      "16-bit image": (str(d / "deep"), {}, ["w.png", "not 8-bit"]),
      "mixed sizes": (str(d / "mixed"), {}, ["a.png is 28x28", "b.png is 30x28", "--resize"]),
      "model size": (str(d / "big"), {}, ["32x32", "28x28", "--resize"]),
      "channels": (_save(d / "c5.npy", _random((2, 28, 28, 5))), {}, ["c5.npy", "5 channels"]),
      "npz unnamed": (str(d / "many.npz"), {}, ["['a', 'b']", "FILE.npz:KEY", "many.npz:a"]),
      "npz key": (str(d / "many.npz") + ":c", {}, ["no array 'c'", "['a', 'b']", "many.npz:KEY"]),
      "dtype": (_save(d / "f.npy", np.zeros((2, 28, 28), np.float32)), {},
                ["f.npy", "float32", "(x*255).round().astype(np.uint8)"]),
      "rank": (_save(d / "r.npy", np.zeros((2, 28), np.uint8)), {}, ["r.npy", "(2, 28)", "[N, H, W]"]),
      "zero images": (_save(d / "z.npy", np.zeros((0, 28, 28), np.uint8)), {}, ["z.npy", "zero images"]),
      "tfds unknown": ("tfds:no_such_dataset_xyz", {}, ["tfds:no_such_dataset_xyz", "no dataset"]),
      "tfds not prepared": ("tfds:cifar100", {"data_dir": str(d)}, ["not prepared", "tfds build cifar100"]),
      "tfds syntax": ("tfds:a/b/c", {}, ["tfds:NAME[/CONFIG][:SPLIT]"]),
  }


def _dir(path) -> str:
  os.makedirs(path, exist_ok=True)
  return str(path)


def test_bad_inputs_raise_one_line_errors_naming_the_file(tmp_path):
  for case, (spec, kwargs, needles) in _bad_inputs(tmp_path).items():
    with pytest.raises(DataSourceError) as e:
      image_sources.load(spec, MNIST, **kwargs)
    msg = str(e.value)
    assert isinstance(e.value, ValueError) and "\n" not in msg, (case, msg)
    for needle in needles:
      assert needle in msg, (case, needle, msg)


def test_tfds_bad_split_and_no_image_feature(tfds_data_dir, tmp_path):
  with pytest.raises(DataSourceError, match=r"no split 'train'; available splits: \['test'\]") as e:
    image_sources.load("tfds:mnist:train", MNIST, data_dir=tfds_data_dir)
  assert "tfds:mnist:SPLIT" in str(e.value) and "\n" not in str(e.value)

  class HvaeoodTestNoImages(tfds.core.GeneratorBasedBuilder):  # pylint: disable=abstract-method
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"x": tf.int64}))

    def _split_generators(self, dl_manager):
      return {"test": self._generate_examples()}

    def _generate_examples(self):
      for i in range(2):
        yield i, {"x": i}

  HvaeoodTestNoImages(data_dir=str(tmp_path)).download_and_prepare()
  with pytest.raises(DataSourceError, match=r"no image feature \(features: \['x'\]\)"):
    image_sources.load("tfds:hvaeood_test_no_images", MNIST, data_dir=str(tmp_path))


def test_tfds_source_loads_the_registry_mnist_images(tfds_data_dir):
  got = image_sources.load("tfds:mnist:test", MNIST, max_examples=300, data_dir=tfds_data_dir)
  it, _ = ip.create_eval_dataset("mnist", "test", preprocessing="quantize", batch_size=300, seed=0,
                                 max_examples=300, data_dir=tfds_data_dir)
  (batch,) = list(it)
  assert got.shape == (300, 28, 28, 1)
  np.testing.assert_array_equal(got, np.round(batch["image"] * 255).astype(np.uint8))


# ---------------------------------------------------------------------------------------------------------------
# create_eval_dataset_from_array and png_bits


def _all(it) -> dict:
  batches = list(it)
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


@pytest.mark.parametrize("kind", ["binarize", "dequantize"])
def test_from_array_equals_per_example_preprocessing_and_masks_padding(kind):
  images = _random((50,) + MNIST, seed=9)
  it, n = ip.create_eval_dataset_from_array(images, "my_set", "test", preprocessing=kind, batch_size=16, seed=4)
  got = _all(it)
  assert n == 50 and got["image"].shape == (64, 28, 28, 1) and got["image"].dtype == np.float32
  want = ip.preprocess_numpy(images, kind, seed=4, name="my_set", split="test")
  np.testing.assert_array_equal(got["image"][:50], want)
  assert got["mask"][:50].all() and not got["mask"][50:].any()
  assert np.all(got["image"][50:] == 0) and np.all(got["label"] == -1) and np.all(got["png_bits"][50:] == 0)
  other = _all(ip.create_eval_dataset_from_array(images, "other", "test", preprocessing=kind, batch_size=16,
                                                 seed=4)[0])
  assert np.mean(other["image"][:50] != got["image"][:50]) > 0.1  # the name keys the noise


def test_from_array_two_processes_cover_every_example_once():
  images = _random((37,) + MNIST, seed=10)
  kw = dict(preprocessing="dequantize", batch_size=8, seed=1)
  single = _all(ip.create_eval_dataset_from_array(images, "s", "test", **kw)[0])
  hosts = [ip.create_eval_dataset_from_array(images, "s", "test", process_index=p, process_count=2, **kw)
           for p in range(2)]
  parts = [_all(it) for it, _ in hosts]
  assert [n for _, n in hosts] == [18, 19] and [len(p["mask"]) for p in parts] == [24, 24]
  real = np.concatenate([p["image"][p["mask"]] for p in parts])
  np.testing.assert_array_equal(real, single["image"][:37])


@pytest.mark.parametrize("kind", ["binarize", "dequantize", "quantize"])
def test_from_array_is_bit_identical_to_the_registry_path(tfds_data_dir, kind):
  ds = tfds.builder("mnist", data_dir=tfds_data_dir).as_dataset(split="test[:64]", shuffle_files=False)
  rows = list(ds.as_numpy_iterator())
  images = np.stack([r["image"] for r in rows])
  labels = np.array([r["label"] for r in rows])
  kw = dict(preprocessing=kind, batch_size=24, seed=7, max_examples=60)
  want = list(ip.create_eval_dataset("mnist", "test", data_dir=tfds_data_dir, **kw)[0])
  got = list(ip.create_eval_dataset_from_array(images, "mnist", "test", labels=labels, **kw)[0])
  assert len(got) == len(want) == 3
  for a, b in zip(got, want):
    assert sorted(a) == sorted(b) == ["image", "label", "mask", "png_bits"]
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
      assert a[key].dtype == b[key].dtype


def _encoded_bits(image8: np.ndarray) -> float:
  return 8.0 * len(tf.io.encode_png(tf.constant(image8), compression=9).numpy())


def test_png_bits_is_the_png_length_of_the_scored_image(tfds_data_dir):
  images = np.stack([np.full(MNIST, 200, np.uint8), _random(MNIST, seed=11), _random(MNIST, seed=12)])
  q = _all(ip.create_eval_dataset_from_array(images, "s", "test", preprocessing="quantize", batch_size=4,
                                             seed=0)[0])
  np.testing.assert_array_equal(q["png_bits"][:3], [_encoded_bits(x) for x in images])
  assert q["png_bits"].dtype == np.float32 and q["png_bits"][3] == 0
  assert q["png_bits"][0] < 0.2 * q["png_bits"][1]  # a constant image is far simpler than noise
  b = _all(ip.create_eval_dataset_from_array(images, "s", "test", preprocessing="binarize", batch_size=4,
                                             seed=0)[0])
  binary8 = (b["image"][:3] * 255).astype(np.uint8)
  np.testing.assert_array_equal(b["png_bits"][:3], [_encoded_bits(x) for x in binary8])
  assert not np.array_equal(b["png_bits"], q["png_bits"])
  (m,) = list(ip.create_eval_dataset("mnist", "test", preprocessing="quantize", batch_size=8, seed=0,
                                     max_examples=8, data_dir=tfds_data_dir)[0])
  np.testing.assert_array_equal(m["png_bits"], [_encoded_bits(np.round(x * 255).astype(np.uint8))
                                                for x in m["image"]])


def test_png_bits_of_colour_transformed_registry_sets(tmp_path):
  """cifar10_grey / cifar10_grey3 (mocked CIFAR10): png_bits encodes the luminance the model scores, at 8 bits."""
  builder = tfds.builder("cifar10", data_dir=str(tmp_path))
  os.makedirs(builder.data_dir, exist_ok=True)
  builder.info.set_splits(tfds.core.SplitDict([tfds.core.SplitInfo(name="test", shard_lengths=[6], num_bytes=0)]))
  builder.info.write_to_directory(builder.data_dir)
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=str(tmp_path)):
    for name, channels in (("cifar10", 3), ("cifar10_grey", 1), ("cifar10_grey3", 3)):
      (b,) = list(ip.create_eval_dataset(name, "test", preprocessing="quantize", batch_size=6, seed=0,
                                         max_examples=6, data_dir=str(tmp_path))[0])
      assert b["image"].shape == (6, 32, 32, channels)
      np.testing.assert_array_equal(b["png_bits"], [_encoded_bits(np.round(x * 255).astype(np.uint8))
                                                    for x in b["image"]])
