"""Tests for supcon_tf.sources: TFDS datasets and image folders as records."""

import sys

import numpy as np
import pytest
import tensorflow as tf

import conftest
from supcon_tf import config
from supcon_tf import sources


def _records(dataset):
  return [(raw, int(label)) for raw, label in dataset.as_numpy_iterator()]


# ----------------------------------------------------------------------------
# TFDS (mocked cifar10).


def test_tfds_records_are_raw_bytes_with_their_decoder(tmp_path):
  with conftest.mock_tfds(tmp_path, num_examples=6, num_train=20,
                          num_test=10):
    source = sources.source(config.DataConfig(validation_fraction=0.2))
    info = source.info
    assert (info.num_train, info.num_val, info.num_test) == (16, 4, 10)
    assert [info.num_examples(s) for s in sources.SPLITS] == [16, 4, 10]
    assert len(info.class_names) == 10
    assert (info.num_classes, info.image_shape) == (10, (32, 32, 3))
    for split in sources.SPLITS:
      dataset = source.read(split)
      assert dataset.element_spec[0].dtype == tf.string
      assert dataset.element_spec[1].dtype == tf.int64
      records = _records(dataset)
      assert records, split
      assert _records(source.read(split)) == records  # Fixed order.
      image = source.decode(tf.constant(records[0][0]))
      assert image.dtype == tf.uint8 and tuple(image.shape) == (32, 32, 3)
      assert all(0 <= label < 10 for _, label in records)


def test_tfds_validation_that_leaves_nothing_to_train_on(tmp_path):
  with conftest.mock_tfds(tmp_path, num_train=20):
    with pytest.raises(ValueError, match="validation_fraction=0.99 leaves "
                       "no training examples out of 20"):
      sources.source(config.DataConfig(validation_fraction=0.99))
    # A tiny fraction still holds one example out.
    info = sources.source(config.DataConfig(validation_fraction=0.001)).info
    assert (info.num_train, info.num_val) == (19, 1)


def test_unknown_split_names_the_choices():
  assert sources.check_split("validation") == "validation"
  with pytest.raises(ValueError, match=r"split='val' is not one of \['train'"):
    sources.check_split("val")


def test_tfds_split_missing_from_the_dataset(tmp_path):
  with conftest.mock_tfds(tmp_path):
    with pytest.raises(ValueError, match="no split 'extra'") as error:
      sources.source(config.DataConfig(eval_split="extra"))
  assert "eval_split" in str(error.value)


# ----------------------------------------------------------------------------
# Image folders.

# Class directories in an unsorted creation order: labels follow the names.
FOLDER_CLASSES = ("dog", "cat")


def _write_png(path, image):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(tf.io.encode_png(np.asarray(image, np.uint8)).numpy())


def _write_folder(root, per_class=4, with_test=True):
  """Constant-colour 5x4 images; returns {path: (label, colour)} of train."""
  written = {}
  for c, name in enumerate(FOLDER_CLASSES):
    label = sorted(FOLDER_CLASSES).index(name)
    for i in range(per_class):
      colour = (10 * c + i, 100 + i, 200 - c)
      path = root / "train" / name / f"{i}.png"
      _write_png(path, np.broadcast_to(colour, (5, 4, 3)))
      written[str(path)] = (label, colour)
    if with_test:
      _write_png(root / "test" / name / "0.png", np.zeros((5, 4, 3)))
  return written


def test_folder_records_are_paths_labelled_by_sorted_class(tmp_path):
  written = _write_folder(tmp_path)
  source = sources.source(config.DataConfig(
      dataset=f"folder:{tmp_path}", validation_fraction=0.25))
  info = source.info
  assert info.class_names == ("cat", "dog") and info.num_classes == 2
  assert (info.num_train, info.num_val, info.num_test) == (6, 2, 2)
  assert info.image_shape == (5, 4, 3)  # Every image has the same size.
  train = _records(source.read("train"))
  validation = _records(source.read("validation"))
  # Files sorted by (class, name), permuted with the fixed seed 0; the
  # validation split is the permutation's tail, so it mixes classes.
  files = sorted(written, key=lambda p: (p.split("/")[-2], p))
  order = np.random.RandomState(0).permutation(len(files))
  assert [p.decode() for p, _ in train] == [files[i] for i in order[:6]]
  assert [p.decode() for p, _ in validation] == [files[i] for i in order[6:]]
  for path, label in train + validation:
    want_label, colour = written[path.decode()]
    assert label == want_label
    image = source.decode(tf.constant(path)).numpy()
    assert image.shape == (5, 4, 3)
    np.testing.assert_array_equal(image, np.broadcast_to(colour, (5, 4, 3)))


def test_folder_grayscale_and_alpha_images_decode_to_rgb(tmp_path):
  _write_png(tmp_path / "train" / "a" / "gray.png", np.full((3, 3, 1), 77))
  _write_png(tmp_path / "train" / "a" / "rgba.png",
             np.broadcast_to((1, 2, 3, 4), (2, 6, 4)))
  source = sources.source(config.DataConfig(
      dataset=f"folder:{tmp_path}", validation_fraction=0.0))
  assert source.info.image_shape == (None, None, 3)  # Sizes differ.
  images = {p.decode().split("/")[-1]: source.decode(tf.constant(p)).numpy()
            for p, _ in _records(source.read("train"))}
  np.testing.assert_array_equal(images["gray.png"], np.full((3, 3, 3), 77))
  np.testing.assert_array_equal(images["rgba.png"],
                                np.broadcast_to((1, 2, 3), (2, 6, 3)))


def test_folder_without_test_images(tmp_path):
  _write_folder(tmp_path, with_test=False)
  source = sources.source(config.DataConfig(dataset=f"folder:{tmp_path}",
                                            validation_fraction=0.0))
  assert (source.info.num_train, source.info.num_test) == (8, 0)
  with pytest.raises(ValueError, match="has no test images"):
    source.read("test")


def test_folder_test_class_without_training_images(tmp_path):
  _write_folder(tmp_path)
  _write_png(tmp_path / "test" / "zebra" / "0.png", np.zeros((5, 4, 3)))
  with pytest.raises(ValueError, match=r"Classes \['zebra'\]"):
    sources.source(config.DataConfig(dataset=f"folder:{tmp_path}"))


def test_folder_without_images(tmp_path):
  (tmp_path / "train" / "cat").mkdir(parents=True)
  (tmp_path / "train" / "cat" / "notes.txt").write_text("no image")
  with pytest.raises(ValueError, match="No decodable"):
    sources.source(config.DataConfig(dataset=f"folder:{tmp_path}"))


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
