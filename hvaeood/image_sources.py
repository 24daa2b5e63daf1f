"""Image sources beyond the dataset registry: folders of images, array files and any TFDS image dataset.

A source is given as a string (`parse`):

* a registry name (`datasets_info.canonical` accepts it, e.g. ``mnist``, ``svhn``): kind ``registry``, read by
  `input_pipeline.create_eval_dataset` as before (to read a folder that has a registry name, write ``./mnist``);
* ``tfds:NAME[/CONFIG][:SPLIT]``: any TFDS dataset with an image feature, read from the given data_dir (default
  split ``test``), e.g. ``tfds:emnist/letters:test``;
* a path ending in ``.npy`` or ``.npz`` (``FILE.npz:KEY`` names the array; an ``.npz`` of exactly one array needs
  no key): uint8 images [N, H, W] or [N, H, W, C];
* any other existing path, a directory: its ``.png``/``.jpg``/``.jpeg`` files (any case), subfolders included, in
  sorted order of their paths relative to it; other files are ignored.

`load` reads a non-registry source into memory as uint8 [N, H, W, C] in the model's (H, W, C), in file order,
capped at `max_examples`, and raises a one-line `DataSourceError` (a ValueError) naming the path and the fix for
any input it cannot use, before the caller has written anything. `Source.name` is the base name shown in result
tables: the registry name, a folder's basename, a file's stem, or NAME[_CONFIG] of a TFDS dataset ("/" and ":"
never occur in it, since results are keyed "<name>/<score>").

Conversion rules, applied to each image in this order:

1. Decoding (files): 1-bit and grey images give one channel (mode '1' becomes 0/255); palette images become RGB
   (their palette's colours; a grey palette gives three equal channels, the same result as grey); 16-bit or float
   images are an error.
2. Alpha is dropped: RGBA becomes RGB and grey + alpha (LA, or an array with C = 2) becomes grey; the alpha values
   are ignored, not composited. Other channel counts (arrays with C > 4) are an error.
3. Size: only with ``resize=True`` is an image of another size resized, per image, with PIL's bilinear filter to
   the model's (W, H) (in its channels after step 2). Without it, a size other than the model's, or mixed sizes in
   one folder, is an error that suggests ``--resize``.
4. Channels: same count as the model: as is. Grey to a 3-channel model: replicated. RGB to a 1-channel model:
   ITU-R BT.601 luma, round(0.299 R + 0.587 G + 0.114 B) as uint8, halves rounded up, computed exactly in
   integers (`luma`). A model with another channel count than 1 or 3 takes only images of its own count.

Importing this module does not import TensorFlow; a ``tfds:`` source imports tensorflow_datasets when loaded.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

from hvaeood import datasets_info
from hvaeood.errors import DataSourceError

KINDS = ("registry", "directory", "array", "tfds")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ARRAY_SUFFIXES = (".npy", ".npz")
DEFAULT_TFDS_SPLIT = "test"
TFDS_PREFIX = "tfds:"
_LUMA_PER_MILLE = np.array([299, 587, 114], np.int64)  # ITU-R BT.601, weights x 1000 (sum 1000)
_USAGE = ("give a folder of PNG/JPEG images, an .npy/.npz file of uint8 images, tfds:NAME[/CONFIG][:SPLIT] or a "
          "dataset name")


@dataclasses.dataclass(frozen=True)
class Source:
  """A parsed image source.

  Attributes:
    kind: one of `KINDS`.
    spec: the string it was parsed from.
    name: the base name shown in result tables (no "/" or ":").
    path: the folder or array file (kinds "directory", "array").
    key: the array's name in an .npz (None: its only array).
    tfds_name: the TFDS builder name (kind "tfds"; the registry key for kind "registry").
    config: the TFDS builder config, or None.
    split: the TFDS split (kind "tfds").
  """
  kind: str
  spec: str
  name: str
  path: str | None = None
  key: str | None = None
  tfds_name: str | None = None
  config: str | None = None
  split: str | None = None


def _one_line(text: Any, limit: int = 200) -> str:
  """`text` on one line, cut after its first sentence and at `limit` characters (TFDS lists every dataset)."""
  line = " ".join(str(text).split())
  head, dot, _ = line.partition(". ")
  line = head + dot.strip()
  return line if len(line) <= limit else line[:limit - 3] + "..."


def _base_name(text: str) -> str:
  return text.replace("/", "_").replace(":", "_").replace(os.sep, "_") or "images"


def _parse_tfds(spec: str) -> Source:
  body = spec[len(TFDS_PREFIX):]
  name_config, colon, split = body.partition(":")
  name, _, config = name_config.partition("/")
  if not name or "/" in config or (colon and not split):
    raise DataSourceError(f"{spec}: not of the form tfds:NAME[/CONFIG][:SPLIT], e.g. tfds:emnist/letters:test.")
  base = f"{name}_{config}" if config else name
  return Source("tfds", spec, _base_name(base), tfds_name=name, config=config or None,
                split=split or DEFAULT_TFDS_SPLIT)


def _parse_path(spec: str) -> Source:
  path, key = spec, None
  head, sep, tail = spec.rpartition(":")
  if sep and head.lower().endswith(".npz"):
    path, key = head, tail
    if not key:
      raise DataSourceError(f"{spec}: empty array key; write {head}:KEY, or {head} if it holds one array.")
  if not os.path.exists(path):
    if os.sep not in path and not path.lower().endswith(ARRAY_SUFFIXES):  # meant as a dataset name
      raise DataSourceError(f"Unknown dataset {path!r} (nor a file or folder of that name). Known datasets: "
                            f"{', '.join(sorted(datasets_info.DATASETS))}; or give a folder of PNG/JPEG images, an "
                            ".npy/.npz file of uint8 images or tfds:NAME[/CONFIG][:SPLIT].")
    raise DataSourceError(f"{path}: no such file or directory; {_USAGE} "
                          f"({', '.join(sorted(datasets_info.DATASETS))}).")
  stem = os.path.basename(os.path.normpath(os.path.abspath(path)))
  if path.lower().endswith(ARRAY_SUFFIXES) and os.path.isfile(path):
    return Source("array", spec, _base_name(os.path.splitext(stem)[0]), path=path, key=key)
  if os.path.isdir(path):
    return Source("directory", spec, _base_name(stem), path=path)
  raise DataSourceError(f"{path}: not a folder nor an .npy/.npz file; {_USAGE}.")


def parse(spec: str) -> Source:
  """The `Source` a string names (module docstring); DataSourceError for a path that does not exist.

  Args:
    spec: a registry name, ``tfds:NAME[/CONFIG][:SPLIT]``, an .npy/.npz path (``FILE.npz:KEY``) or a folder.

  Returns:
    The parsed source; a registry name keeps its registry key as `name` and `tfds_name`.
  """
  spec = str(spec)
  if spec.startswith(TFDS_PREFIX):
    return _parse_tfds(spec)
  try:
    key = datasets_info.canonical(spec)
  except ValueError:
    return _parse_path(spec)
  return Source("registry", spec, key, tfds_name=key)


# ---------------------------------------------------------------------------------------------------------------
# Decoding files


def _image_files(root: str) -> list[str]:
  """The image files under `root`, sorted by their path relative to it (with "/" separators)."""
  found = []
  for dirpath, dirnames, files in os.walk(root):
    dirnames.sort()
    for f in files:
      if f.lower().endswith(IMAGE_SUFFIXES):
        rel = os.path.relpath(os.path.join(dirpath, f), root)
        found.append(rel.replace(os.sep, "/"))
  return [os.path.join(root, rel) for rel in sorted(found)]


def _decode(path: str) -> np.ndarray:
  """One image file as uint8 [H, W, C], C in {1, 2, 3, 4} (rule 1); DataSourceError naming the file."""
  try:
    with Image.open(path) as img:
      img.load()
      mode = img.mode
      if mode == "1":
        img = img.convert("L")
      elif mode in ("P", "PA"):
        img = img.convert("RGBA")
      elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGB")
      elif mode not in ("L", "LA", "RGB", "RGBA"):
        raise DataSourceError(f"{path}: image mode {mode} is not 8-bit grey/RGB; save it as an 8-bit PNG or JPEG.")
      pixels = np.asarray(img, np.uint8)
  except DataSourceError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (PIL raises many types for a bad file)
    raise DataSourceError(f"{path}: cannot read the image ({type(e).__name__}: {_one_line(e)}); replace or remove "
                          "the file.") from None
  return pixels[..., None] if pixels.ndim == 2 else pixels


def _drop_alpha(image: np.ndarray, where: str) -> np.ndarray:
  """Rule 2: uint8 [..., C] with C in {1, 2, 3, 4} -> C in {1, 3}."""
  channels = image.shape[-1]
  if channels in (2, 4):
    return image[..., :channels - 1]
  if channels not in (1, 3):
    raise DataSourceError(f"{where}: {channels} channels; images need 1 (grey), 2 (grey + alpha), 3 (RGB) or "
                          "4 (RGBA) channels.")
  return image


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Rule 3: PIL bilinear resize of uint8 [H, W, C], C in {1, 3}, to [height, width, C]."""
  if image.shape[:2] == (height, width):
    return image
  grey = image.shape[-1] == 1
  pil = Image.fromarray(image[..., 0] if grey else image, "L" if grey else "RGB")
  out = np.asarray(pil.resize((width, height), Image.Resampling.BILINEAR), np.uint8)
  return out[..., None] if grey else out


def luma(rgb: np.ndarray) -> np.ndarray:
  """ITU-R BT.601 luma of uint8 [..., 3]: uint8 [..., 1], round(0.299 R + 0.587 G + 0.114 B), halves up.

  Computed exactly in integers, (299 R + 587 G + 114 B + 500) // 1000, so no float rounding decides a tie.
  """
  y = (rgb.astype(np.int64) @ _LUMA_PER_MILLE + 500) // 1000
  return y.astype(np.uint8)[..., None]


def _to_channels(images: np.ndarray, channels: int, where: str) -> np.ndarray:
  """Rule 4: uint8 [N, H, W, C], C in {1, 3} -> [N, H, W, channels]."""
  have = images.shape[-1]
  if have == channels:
    return images
  if have == 1 and channels == 3:
    return np.repeat(images, 3, axis=-1)
  if have == 3 and channels == 1:
    return luma(images)
  raise DataSourceError(f"{where}: {have}-channel images do not convert to the model's {channels} channels; give "
                        f"{channels}-channel images.")


def _size_error(where: str, size: Sequence[int], target: Sequence[int]) -> DataSourceError:
  return DataSourceError(f"{where}: images are {size[0]}x{size[1]} (H x W) but the model takes "
                         f"{target[0]}x{target[1]}; pass --resize to resize them (PIL bilinear), or give images "
                         "of the model's size.")


def _conform(images: Iterable[np.ndarray], labels: Iterable[str], target_shape: Sequence[int],
             resize: bool, where: str) -> np.ndarray:
  """Rules 2-4 on images [H, W, C] (labels name them in errors): uint8 [N, *target_shape]."""
  height, width, channels = (int(d) for d in target_shape)
  out, first = [], None
  for image, label in zip(images, labels):
    image = _drop_alpha(image, label)
    if not resize:
      if first is None:
        first = (label, image.shape[:2])
      elif image.shape[:2] != first[1]:
        raise DataSourceError(
            f"{where}: images of different sizes ({first[0]} is {first[1][0]}x{first[1][1]}, {label} is "
            f"{image.shape[0]}x{image.shape[1]}); pass --resize to resize each to the model's {height}x{width}.")
      if image.shape[:2] != (height, width):
        raise _size_error(where, image.shape[:2], (height, width))
    image = _resize(image, height, width) if resize else image
    out.append(_to_channels(image[None], channels, label)[0])
  if not out:
    raise DataSourceError(f"{where}: zero images.")
  return np.stack(out)


# ---------------------------------------------------------------------------------------------------------------
# The three kinds of source


def _load_directory(source: Source, target_shape: Sequence[int], resize: bool,
                    max_examples: int | None) -> np.ndarray:
  files = _image_files(source.path)
  if not files:
    raise DataSourceError(f"{source.path}: no .png/.jpg/.jpeg images in this folder or its subfolders; put the "
                          "images there or give another folder.")
  files = files[:max_examples] if max_examples is not None else files
  return _conform((_decode(f) for f in files), files, target_shape, resize, source.path)


def _npz_array(source: Source, where: str) -> np.ndarray:
  with np.load(source.path, allow_pickle=False) as archive:
    keys = list(archive.files)
    if source.key is not None:
      if source.key not in keys:
        raise DataSourceError(f"{where}: no array {source.key!r} in {source.path} (it holds {keys}); write "
                              f"{source.path}:KEY with one of them.")
      return archive[source.key]
    if len(keys) != 1:
      example = f"{source.path}:{keys[0]}" if keys else f"{source.path}:KEY"
      raise DataSourceError(f"{where}: holds {len(keys)} arrays {keys} and none is named; write FILE.npz:KEY, "
                            f"e.g. {example}.")
    return archive[keys[0]]


def _read_array(source: Source) -> np.ndarray:
  where = source.spec
  try:
    if source.path.lower().endswith(".npz"):
      array = _npz_array(source, where)
    else:
      array = np.load(source.path, mmap_mode="r", allow_pickle=False)
  except DataSourceError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (numpy raises ValueError, OSError, zipfile errors...)
    raise DataSourceError(f"{where}: cannot read the array file ({type(e).__name__}: {_one_line(e)}); save it "
                          "with np.save or np.savez.") from None
  if not isinstance(array, np.ndarray):
    raise DataSourceError(f"{where}: not a numpy array file; save it with np.save or np.savez.")
  return array


def conform_array(array: np.ndarray, target_shape: Sequence[int], *, resize: bool = False,
                  where: str = "images") -> np.ndarray:
  """Rules 2-4 on an in-memory uint8 array [N, H, W] or [N, H, W, C]: uint8 [N, *target_shape]; a one-line
  DataSourceError naming `where` for an array it cannot use (rank, dtype, no images, size, channels)."""
  array = np.asarray(array)
  if array.ndim not in (3, 4):
    raise DataSourceError(f"{where}: shape {tuple(array.shape)} is not [N, H, W] or [N, H, W, C] images.")
  if array.dtype != np.uint8:
    raise DataSourceError(f"{where}: dtype {array.dtype}, but images must be uint8 pixels 0..255; convert with "
                          "(x*255).round().astype(np.uint8) for values in [0, 1] (or x.astype(np.uint8)).")
  if len(array) == 0:
    raise DataSourceError(f"{where}: zero images (shape {tuple(array.shape)}).")
  array = _drop_alpha(array[..., None] if array.ndim == 3 else array, where)
  height, width, channels = (int(d) for d in target_shape)
  if array.shape[1:3] != (height, width):
    if not resize:
      raise _size_error(where, array.shape[1:3], target_shape)
    array = np.stack([_resize(image, height, width) for image in array])
  return _to_channels(array, channels, where)


def _load_array(source: Source, target_shape: Sequence[int], resize: bool,
                max_examples: int | None) -> np.ndarray:
  array = _read_array(source)
  if array.ndim in (3, 4) and max_examples is not None:
    array = array[:max_examples]
  return conform_array(array, target_shape, resize=resize, where=source.spec)


def _tfds_builder(source: Source, data_dir: str | None):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel  (TensorFlow: only when needed)
  full = source.tfds_name + (f"/{source.config}" if source.config else "")
  where = datasets_info.data_dir_description(data_dir)
  try:
    builder = tfds.builder(full, data_dir=data_dir)
    prepared = builder.is_prepared()
  except Exception as e:  # pylint: disable=broad-except  (tfds raises its own types for unknown names/configs)
    raise DataSourceError(f"{source.spec}: TFDS has no dataset {full!r} ({type(e).__name__}: {_one_line(e)}); "
                          "check the name and config (tfds.list_builders() lists the names).") from None
  if not prepared:
    target = data_dir or "~/tensorflow_datasets"
    raise DataSourceError(f"{source.spec}: {full!r} is not prepared in {where}; on a machine with network run "
                          f"tfds build {full} --data_dir {target}, then copy {target}/{source.tfds_name} to the same "
                          "place on this machine.")
  return builder


def _tfds_image_key(source: Source, builder) -> str:
  """The 'image' feature if there is one, else the first image feature."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  features = builder.info.features
  images = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
  if not images:
    raise DataSourceError(f"{source.spec}: no image feature (features: {sorted(features.keys())}); give a TFDS "
                          "dataset with an Image feature.")
  return "image" if "image" in images else images[0]


def _load_tfds(source: Source, target_shape: Sequence[int], resize: bool, max_examples: int | None,
               data_dir: str | None) -> np.ndarray:
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  builder = _tfds_builder(source, data_dir)
  key = _tfds_image_key(source, builder)
  splits = sorted(builder.info.splits.keys())
  if source.split.split("[")[0] not in splits:
    raise DataSourceError(f"{source.spec}: no split {source.split!r}; available splits: {splits}. Write "
                          f"tfds:{source.spec[len(TFDS_PREFIX):].split(':')[0]}:SPLIT.")
  ds = builder.as_dataset(split=source.split, shuffle_files=False, read_config=tfds.ReadConfig(try_autocache=False))
  ds = ds.map(lambda ex: ex[key])
  ds = ds.take(max_examples) if max_examples is not None else ds
  images = list(ds.as_numpy_iterator())
  if images and images[0].dtype != np.uint8:
    raise DataSourceError(f"{source.spec}: image feature {key!r} has dtype {images[0].dtype}, not uint8.")
  labels = (f"{source.spec} example {i}" for i in range(len(images)))
  return _conform((im if im.ndim == 3 else im[..., None] for im in images), labels, target_shape, resize,
                  source.spec)


def load(source: Source | str, target_shape: Sequence[int], *, resize: bool = False,
         max_examples: int | None = None, data_dir: str | None = None) -> np.ndarray:
  """Reads a folder, array or tfds source into memory, in the model's shape (the module docstring's rules).

  Args:
    source: a `Source` or a string for `parse` (not of kind "registry": `input_pipeline.create_eval_dataset`
      reads those).
    target_shape: the model's (H, W, C).
    resize: resize images of another size (PIL bilinear) instead of raising.
    max_examples: read only the first N images in file order (None: all).
    data_dir: the TFDS data_dir of a tfds source (None: TFDS's default).

  Returns:
    uint8 [N, H, W, C], N >= 1, in file order; N = len(result) is the number of examples.

  Raises:
    DataSourceError: a one-line message naming the path and the fix.
  """
  source = parse(source) if isinstance(source, str) else source
  if max_examples is not None and int(max_examples) <= 0:
    raise DataSourceError(f"{source.spec}: max_examples={max_examples} leaves zero images.")
  if source.kind == "directory":
    return _load_directory(source, target_shape, resize, max_examples)
  if source.kind == "array":
    return _load_array(source, target_shape, resize, max_examples)
  if source.kind == "tfds":
    return _load_tfds(source, target_shape, resize, max_examples, data_dir)
  raise ValueError(f"{source.spec}: a {source.kind} source; read it with input_pipeline.create_eval_dataset.")
