"""Where examples come from: TFDS datasets or image folders, and their splits.

`source(config)` gives a `Source`: the `DatasetInfo` of `DataConfig.dataset`
and its splits as fixed-order `(raw, label)` records with the decoder of
`raw`. `supcon_tf.data` builds the input pipelines on it.

Sources:
  * TFDS: `DataConfig.dataset` is a TFDS name read from `DataConfig.data_dir`
    (or `TFDS_DATA_DIR`) with `shuffle_files=False`; nothing is downloaded.
  * Image folders: `DataConfig.dataset = "folder:<path>"` with
    `<path>/<split>/<class_name>/*.{jpg,jpeg,png}`; the split directories are
    `DataConfig.train_split` and `DataConfig.eval_split` (`train`, `test` by
    default). Class names are the sorted sub-directories of the train split.
    Every file is decoded once per process to find undecodable ones.

Splits: "train" is `train_split` minus its last `validation_fraction`,
"validation" is that held-out tail (folders: the tail of a fixed seed-0
permutation of the files, so it mixes classes), "test" is `eval_split`.
`DataConfig.train_examples` keeps only the first examples of "train".
"""

import dataclasses
import os
from typing import Callable, Dict, Optional, Tuple

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from supcon_tf import config as config_lib

FOLDER_PREFIX = "folder:"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
SPLITS = ("train", "validation", "test")
_AUTOTUNE = tf.data.AUTOTUNE
# Folder validation split: fixed permutation seed, independent of run seeds.
_FOLDER_SPLIT_SEED = 0


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a model needs to know about a dataset.

  Attributes:
    num_classes: number of labels.
    class_names: label names in label order, or None when unknown.
    image_shape: stored image shape `(height, width, channels)`; height and
      width are None when images differ in size.
    num_train: examples in the "train" split (validation removed).
    num_val: examples in the "validation" split (0 when none is held out).
    num_test: examples in the "test" split.
    num_skipped: undecodable files skipped (folders with `skip_corrupt`).
  """
  num_classes: int
  class_names: Optional[Tuple[str, ...]]
  image_shape: Tuple[Optional[int], Optional[int], int]
  num_train: int
  num_val: int
  num_test: int
  num_skipped: int = 0

  def num_examples(self, split: str) -> int:
    return {"train": self.num_train, "validation": self.num_val,
            "test": self.num_test}[check_split(split)]


@dataclasses.dataclass(frozen=True)
class Source:
  """A dataset as `(raw, label)` records plus the decoder of `raw`.

  `read(split)` gives a finite, fixed-order `tf.data.Dataset` of
  `(raw, label)`; `decode(raw)` gives a uint8 image `[height, width, 3]`.
  """
  info: DatasetInfo
  read: Callable[[str], tf.data.Dataset]
  decode: Callable[[tf.Tensor], tf.Tensor]


def check_split(split: str) -> str:
  """Returns `split`; raises ValueError unless it is one of `SPLITS`."""
  if split not in SPLITS:
    raise ValueError(f"split={split!r} is not one of {list(SPLITS)}.")
  return split


def _num_train(available: int, config: config_lib.DataConfig) -> int:
  """Training examples used: all `available`, or `config.train_examples`."""
  if config.train_examples is None:
    return available
  return min(available, config.train_examples)


def _num_validation(num_examples: int, fraction: float, where: str) -> int:
  """Examples held out from `num_examples` for validation."""
  if fraction == 0:
    return 0
  num_val = min(max(int(round(num_examples * fraction)), 1), num_examples)
  if num_val >= num_examples:
    raise ValueError(
        f"validation_fraction={fraction} leaves no training examples out of "
        f"{num_examples} in {where}; lower validation_fraction.")
  return num_val


# ----------------------------------------------------------------------------
# TFDS.


def _tfds_source(config: config_lib.DataConfig) -> Source:
  """A TFDS dataset already prepared under `config.data_dir`."""
  name = config.dataset
  try:
    builder = tfds.builder(name, data_dir=config.data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(
        f"Unknown TFDS dataset {name!r}. Use a TFDS name such as 'cifar10' "
        f"or 'folder:<path>' for an image folder.") from None
  except AssertionError as e:  # Raised by TFDS for e.g. unknown versions.
    raise ValueError(f"Cannot load TFDS dataset {name!r}: {e}") from None
  if not builder.is_prepared():
    searched = config.data_dir or os.environ.get("TFDS_DATA_DIR") or (
        "the TFDS default data_dir")
    raise ValueError(
        f"TFDS dataset {name!r} is not prepared in data_dir={searched!r} "
        f"(looked for {builder.data_dir}). Nothing is downloaded: set "
        "DataConfig.data_dir (or the TFDS_DATA_DIR environment variable) to "
        "a directory holding a prepared copy, e.g. one written by "
        f"`tfds build {name.split(':')[0]} --data_dir=<dir>`.")

  info = builder.info
  keys = info.supervised_keys
  image_key, label_key = (keys if isinstance(keys, tuple) and len(keys) == 2
                          and all(isinstance(k, str) for k in keys)
                          else ("image", "label"))
  features = info.features
  if image_key not in features or label_key not in features:
    raise ValueError(
        f"TFDS dataset {name!r} has no {image_key!r}/{label_key!r} features "
        f"(features: {list(features.keys())}); an image classification "
        "dataset is needed.")
  image_feature = features[image_key]
  if (not isinstance(image_feature, tfds.features.Image) or
      image_feature.shape[-1] != 3):
    raise ValueError(
        f"TFDS dataset {name!r} feature {image_key!r} has shape "
        f"{image_feature.shape}; only 3-channel (RGB) images are supported. "
        "Convert it to RGB, e.g. as a 'folder:<path>' dataset.")
  label_feature = features[label_key]
  if not isinstance(label_feature, tfds.features.ClassLabel):
    raise ValueError(f"TFDS dataset {name!r} feature {label_key!r} is not a "
                     "ClassLabel.")

  def num_examples(split: str) -> int:
    try:
      return info.splits[split].num_examples
    except (KeyError, ValueError, AssertionError) as e:
      raise ValueError(
          f"TFDS dataset {name!r} has no split {split!r} (splits: "
          f"{list(info.splits.keys())}); fix DataConfig.train_split / "
          f"eval_split.") from e

  num_all_train = num_examples(config.train_split)
  num_val = _num_validation(num_all_train, config.validation_fraction,
                            f"{name} {config.train_split}")
  held_out = num_all_train - num_val  # Where the validation tail starts.
  num_train = _num_train(held_out, config)
  num_test = num_examples(config.eval_split)
  # Plain split names can be sliced by TFDS (only the needed records are
  # read); split expressions are cut with take/skip instead.
  plain = config.train_split.isidentifier()

  def read(split: str) -> tf.data.Dataset:
    if split == "test":
      tfds_split, cut = config.eval_split, None
    elif plain:
      tfds_split = (f"{config.train_split}[:{num_train}]" if split == "train"
                    else f"{config.train_split}[{held_out}:]")
      cut = None
    else:
      tfds_split, cut = config.train_split, split
    ds = builder.as_dataset(
        split=tfds_split, shuffle_files=False,
        decoders={image_key: tfds.decode.SkipDecoding()},
        # No auto-cache: evaluation reads prefixes of splits, which a cache
        # discards with a warning; the records are cheap to re-read.
        read_config=tfds.ReadConfig(add_tfds_id=False, try_autocache=False))
    if cut == "train":
      ds = ds.take(num_train)
    elif cut == "validation":
      ds = ds.skip(held_out)
    return ds.map(lambda ex: (ex[image_key], ex[label_key]))

  def decode(raw: tf.Tensor) -> tf.Tensor:
    return image_feature.decode_example(raw)

  return Source(
      info=DatasetInfo(
          num_classes=label_feature.num_classes,
          class_names=tuple(label_feature.names) or None,
          image_shape=tuple(image_feature.shape),
          num_train=num_train, num_val=num_val, num_test=num_test),
      read=read, decode=decode)


# ----------------------------------------------------------------------------
# Image folders.

# Per-process cache of folder scans: split directory -> _FolderSplit.
_FOLDER_SCANS: Dict[str, "_FolderSplit"] = {}


@dataclasses.dataclass(frozen=True)
class _FolderSplit:
  """Files of one split directory, in sorted (class, file) order."""
  files: Tuple[str, ...]
  class_names: Tuple[str, ...]  # Per file.
  corrupt: Tuple[str, ...]
  shapes: Tuple[Tuple[int, int, int], ...]  # Decoded shapes of good files.


def _decode_file(path: tf.Tensor) -> tf.Tensor:
  """Reads and decodes a jpeg/png file to uint8 `[height, width, 3]`."""
  # channels=3 turns grayscale and RGBA images into RGB.
  image = tf.io.decode_image(tf.io.read_file(path), channels=3,
                             dtype=tf.uint8, expand_animations=False)
  return tf.ensure_shape(image, [None, None, 3])


def _scan_split_dir(split_dir: str) -> _FolderSplit:
  """Lists and decodes every image file under `split_dir/<class>/`."""
  split_dir = os.path.abspath(split_dir)
  if split_dir in _FOLDER_SCANS:
    return _FOLDER_SCANS[split_dir]
  files, classes = [], []
  for class_name in sorted(tf.io.gfile.listdir(split_dir)):
    class_name = class_name.rstrip("/")
    class_dir = os.path.join(split_dir, class_name)
    if not tf.io.gfile.isdir(class_dir):
      continue
    for file_name in sorted(tf.io.gfile.listdir(class_dir)):
      if file_name.lower().endswith(IMAGE_EXTENSIONS):
        files.append(os.path.join(class_dir, file_name))
        classes.append(class_name)
  shapes = {}
  if files:
    # Decode errors are dropped by ignore_errors; the surviving indices tell
    # which files are good, in parallel and without a Python decode loop.
    check = tf.data.Dataset.from_tensor_slices(files).enumerate().map(
        lambda i, path: (i, tf.shape(_decode_file(path))),
        num_parallel_calls=_AUTOTUNE).ignore_errors()
    shapes = {int(i): tuple(int(d) for d in shape)
              for i, shape in check.as_numpy_iterator()}
  good = [i for i in range(len(files)) if i in shapes]
  scan = _FolderSplit(
      files=tuple(files[i] for i in good),
      class_names=tuple(classes[i] for i in good),
      corrupt=tuple(f for i, f in enumerate(files) if i not in shapes),
      shapes=tuple(shapes[i] for i in good))
  _FOLDER_SCANS[split_dir] = scan
  return scan


def _folder_source(config: config_lib.DataConfig) -> Source:
  """An image folder `<path>/<split>/<class_name>/*.{jpg,jpeg,png}`."""
  root = config.dataset[len(FOLDER_PREFIX):]
  train_dir = os.path.join(root, config.train_split)
  test_dir = os.path.join(root, config.eval_split)
  if not root or not tf.io.gfile.isdir(train_dir):
    raise ValueError(
        f"Image folder dataset {config.dataset!r}: {train_dir!r} is not a "
        "directory. Expected <path>/<split>/<class_name>/*.{jpg,jpeg,png} "
        f"with split directories {config.train_split!r} and "
        f"{config.eval_split!r} (DataConfig.train_split / eval_split).")
  train = _scan_split_dir(train_dir)
  test = (_scan_split_dir(test_dir) if tf.io.gfile.isdir(test_dir)
          else _FolderSplit((), (), (), ()))
  class_names = tuple(sorted(set(train.class_names)))
  if not class_names:
    raise ValueError(f"No decodable .jpg/.jpeg/.png files found under "
                     f"{train_dir}/<class_name>/.")
  unknown = sorted(set(test.class_names) - set(class_names))
  if unknown:
    raise ValueError(f"Classes {unknown} of {test_dir} have no images in "
                     f"{train_dir}; every class needs training images.")

  corrupt = train.corrupt + test.corrupt
  if corrupt and not config.skip_corrupt:
    shown = ", ".join(corrupt[:5]) + (" ..." if len(corrupt) > 5 else "")
    raise ValueError(
        f"{len(corrupt)} image file(s) of {config.dataset!r} cannot be "
        f"decoded: {shown}. Remove or fix them, or set "
        "DataConfig.skip_corrupt=True to skip them.")
  if corrupt:
    logging.warning("Skipping %d undecodable image file(s) of %s, e.g. %s.",
                    len(corrupt), config.dataset, corrupt[0])

  label_of = {name: i for i, name in enumerate(class_names)}
  order = np.random.RandomState(_FOLDER_SPLIT_SEED).permutation(
      len(train.files))
  num_val = _num_validation(len(order), config.validation_fraction, train_dir)
  held_out = len(order) - num_val  # Where the validation tail starts.
  num_train = _num_train(held_out, config)
  split_files = {
      "train": [train.files[i] for i in order[:num_train]],
      "validation": [train.files[i] for i in order[held_out:]],
      "test": list(test.files),
  }
  split_labels = {
      "train": [label_of[train.class_names[i]] for i in order[:num_train]],
      "validation": [label_of[train.class_names[i]]
                     for i in order[held_out:]],
      "test": [label_of[name] for name in test.class_names],
  }
  shapes = set(train.shapes + test.shapes)
  height, width, _ = shapes.pop() if len(shapes) == 1 else (None, None, 3)

  def read(split: str) -> tf.data.Dataset:
    if split == "test" and not split_files["test"]:
      raise ValueError(f"Image folder dataset {config.dataset!r} has no test "
                       f"images: {test_dir} is missing or empty.")
    return tf.data.Dataset.from_tensor_slices(
        (tf.constant(split_files[split], tf.string),
         tf.constant(split_labels[split], tf.int64)))

  return Source(
      info=DatasetInfo(
          num_classes=len(class_names), class_names=class_names,
          image_shape=(height, width, 3), num_train=num_train,
          num_val=num_val, num_test=len(split_files["test"]),
          num_skipped=len(corrupt)),
      read=read, decode=_decode_file)


def source(config: config_lib.DataConfig) -> Source:
  """The TFDS or image-folder source that `config.dataset` names."""
  if config.dataset.startswith(FOLDER_PREFIX):
    return _folder_source(config)
  return _tfds_source(config)
