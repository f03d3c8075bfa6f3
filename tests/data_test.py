"""Tests for supcon_tf.data (mock TFDS data and temporary image folders)."""

import collections
import dataclasses
import logging
import os
import sys

import numpy as np
import pytest
import tensorflow as tf

import conftest

from supcon_tf import config
from supcon_tf import data

# The prepared TFDS data, where CI (`.ci/run`) and users point TFDS_DATA_DIR.
TFDS_DATA_DIR = os.environ.get("TFDS_DATA_DIR")


def _cfg(**kwargs):
  defaults = dict(dataset="cifar10", image_size=16, num_views=2,
                  shuffle_buffer=64)
  defaults.update(kwargs)
  return config.DataConfig(**defaults)


def _batches(ds, count):
  return [(x.numpy(), y.numpy()) for x, y in ds.take(count)]


def _context(pipelines, pipeline_id, replicas):
  return tf.distribute.InputContext(num_input_pipelines=pipelines,
                                    input_pipeline_id=pipeline_id,
                                    num_replicas_in_sync=replicas)


# ----------------------------------------------------------------------------
# TFDS (mocked cifar10).


def test_pretrain_shapes_dtypes_range(tmp_path):
  with conftest.mock_tfds(tmp_path):
    ds = data.pretrain_dataset(_cfg(), global_batch_size=4, seed=0)
    assert ds.element_spec[0].shape.as_list() == [4, 2, 16, 16, 3]
    (views, labels), = _batches(ds, 1)
  assert views.shape == (4, 2, 16, 16, 3) and views.dtype == np.float32
  assert labels.shape == (4,) and labels.dtype == np.int32
  assert np.all(np.isfinite(views))
  assert views.min() >= 0.0 and views.max() <= 1.0
  assert np.all((labels >= 0) & (labels < 10))


def test_skip_batches_continues_the_stream(tmp_path):
  # 12 mocked records, 3 batches per epoch: skipping 5 lands mid-epoch 2,
  # whose order and augmentation must be those of the unskipped stream.
  with conftest.mock_tfds(tmp_path):
    cfg = _cfg(shuffle_buffer=8)
    stream = _batches(data.pretrain_dataset(cfg, global_batch_size=4, seed=1),
                      8)
    resumed = _batches(data.pretrain_dataset(cfg, global_batch_size=4,
                                             seed=1, skip_batches=5), 3)
    with pytest.raises(ValueError, match="skip_batches"):
      data.pretrain_dataset(cfg, global_batch_size=4, seed=1,
                            skip_batches=-1)
  for (x1, y1), (x2, y2) in zip(stream[5:], resumed):
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)


def test_same_seed_same_batches_other_seed_differs(tmp_path):
  with conftest.mock_tfds(tmp_path):
    cfg = _cfg()
    first = _batches(data.pretrain_dataset(cfg, global_batch_size=4, seed=1),
                     4)
    again = _batches(data.pretrain_dataset(cfg, global_batch_size=4, seed=1),
                     4)
    other = _batches(data.pretrain_dataset(cfg, global_batch_size=4, seed=2),
                     4)
  for (x1, y1), (x2, y2) in zip(first, again):
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
  assert any(np.abs(x1 - x2).max() > 1e-3
             for (x1, _), (x2, _) in zip(first, other))


def test_views_of_one_image_differ_and_epochs_reaugment(tmp_path):
  with conftest.mock_tfds(tmp_path, num_examples=4):
    ds = data.pretrain_dataset(_cfg(shuffle_buffer=1), global_batch_size=4,
                               seed=0)
    (epoch1, _), (epoch2, _) = _batches(ds, 2)
  assert np.all(np.abs(epoch1[:, 0] - epoch1[:, 1]).mean(axis=(1, 2, 3))
                > 1e-3)
  # Same images in the same order (buffer 1), new augmentations.
  assert np.abs(epoch1 - epoch2).mean() > 1e-3


def test_no_augment_gives_resized_images(tmp_path):
  with conftest.mock_tfds(tmp_path, num_examples=4):
    cfg = _cfg(image_size=32, shuffle_buffer=1)
    (views, labels), = _batches(
        data.pretrain_dataset(cfg, global_batch_size=4, seed=0,
                              augment=False, repeat=False), 1)
    (images, eval_labels), = _batches(
        data.eval_dataset(cfg, "test", batch_size=4), 1)
  np.testing.assert_array_equal(views[:, 0], views[:, 1])
  np.testing.assert_array_equal(views[:, 0], images)
  np.testing.assert_array_equal(labels, eval_labels)


def test_sharding_gives_disjoint_per_replica_batches(tmp_path):
  with conftest.mock_tfds(tmp_path, num_examples=12):
    cfg = _cfg(image_size=32)
    seen = []
    for pipeline_id in range(2):
      ds = data.pretrain_dataset(
          cfg, global_batch_size=4, seed=0, augment=False, repeat=False,
          input_context=_context(2, pipeline_id, 2))
      batches = _batches(ds, 10)
      assert [x.shape for x, _ in batches] == [(2, 2, 32, 32, 3)] * 3
      seen.append({x.tobytes() for views, _ in batches for x in views[:, 0]})
    everything = {x.tobytes() for x, _ in data.eval_dataset(
        cfg, "train", batch_size=12).unbatch().as_numpy_iterator()}
  assert len(seen[0]) == len(seen[1]) == 6
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == everything


def test_global_batch_not_divisible_by_replicas(tmp_path):
  with conftest.mock_tfds(tmp_path):
    with pytest.raises(ValueError, match="not divisible"):
      data.pretrain_dataset(_cfg(), global_batch_size=5, seed=0,
                            input_context=_context(1, 0, 2))
    with pytest.raises(ValueError, match="not divisible"):
      data.eval_dataset(_cfg(), "test", batch_size=3,
                        input_context=_context(2, 0, 2))


def test_distribute_datasets_from_function(tmp_path):
  strategy = conftest.make_mirrored(2)
  with conftest.mock_tfds(tmp_path):
    dist = strategy.distribute_datasets_from_function(
        lambda ctx: data.pretrain_dataset(_cfg(), global_batch_size=4,
                                          seed=0, input_context=ctx))
    views, labels = next(iter(dist))
  local = strategy.experimental_local_results(views)
  assert [v.shape for v in local] == [(2, 2, 16, 16, 3)] * 2
  assert [y.shape for y in strategy.experimental_local_results(labels)] == [
      (2,)] * 2


def test_tfds_split_sizes(tmp_path):
  with conftest.mock_tfds(tmp_path, num_train=20, num_test=10):
    info = data.dataset_info(_cfg(validation_fraction=0.1))
    assert (info.num_train, info.num_val, info.num_test) == (18, 2, 10)
    assert info.num_classes == 10 and len(info.class_names) == 10
    assert info.image_shape == (32, 32, 3)
    no_val = _cfg(validation_fraction=0.0)
    info = data.dataset_info(no_val)
    assert (info.num_train, info.num_val, info.num_test) == (20, 0, 10)
    assert data.eval_dataset(no_val, "validation", batch_size=4) is None

    subset = data.dataset_info(_cfg(validation_fraction=0.1,
                                    train_examples=5))
    assert (subset.num_train, subset.num_val, subset.num_test) == (5, 2, 10)
    more_than_there = data.dataset_info(_cfg(train_examples=1000))
    assert (more_than_there.num_train, more_than_there.num_val) == (18, 2)


def test_train_examples_must_be_positive():
  with pytest.raises(ValueError, match="train_examples must be >= 1"):
    _cfg(train_examples=0)


@pytest.mark.slow
@pytest.mark.skipif(not TFDS_DATA_DIR, reason="TFDS_DATA_DIR is not set")
def test_offline_cifar10_train_examples_are_the_first_ones():
  full = config.DataConfig(data_dir=TFDS_DATA_DIR, validation_fraction=0.998)
  subset = config.DataConfig(data_dir=TFDS_DATA_DIR, validation_fraction=0.998,
                             train_examples=40)
  info = data.dataset_info(subset)
  assert (info.num_train, info.num_val) == (40, 49900)
  train_all, _ = _collect(full, "train")  # 100 examples.
  train, labels = _collect(subset, "train")
  np.testing.assert_array_equal(train, train_all[:40])
  assert labels.shape == (40,)
  tail = config.DataConfig(data_dir=TFDS_DATA_DIR, validation_fraction=0.0002,
                           train_examples=3)
  (images, _), = _batches(data.eval_dataset(tail, "validation",
                                            batch_size=20), 1)
  full_tail = config.DataConfig(data_dir=TFDS_DATA_DIR,
                                validation_fraction=0.0002)
  (expected, _), = _batches(data.eval_dataset(full_tail, "validation",
                                              batch_size=20), 1)
  np.testing.assert_array_equal(images, expected)  # Hold-out unchanged.


def test_eval_dataset_keeps_every_example(tmp_path):
  with conftest.mock_tfds(tmp_path, num_examples=7):
    batches = _batches(data.eval_dataset(_cfg(image_size=8), "test",
                                         batch_size=3), 10)
  assert [x.shape for x, _ in batches] == [(3, 8, 8, 3), (3, 8, 8, 3),
                                           (1, 8, 8, 3)]
  assert all(y.dtype == np.int32 for _, y in batches)
  assert all(x.min() >= 0 and x.max() <= 1 for x, _ in batches)


def test_supervised_dataset_single_view(tmp_path):
  with conftest.mock_tfds(tmp_path):
    (images, labels), = _batches(
        data.supervised_dataset(_cfg(augmentation="randaugment"),
                                global_batch_size=4, seed=0), 1)
  assert images.shape == (4, 16, 16, 3) and labels.shape == (4,)
  assert images.min() >= 0 and images.max() <= 1


def test_missing_tfds_data_dir(tmp_path):
  missing = str(tmp_path / "no_such_dir")
  with pytest.raises(ValueError, match="data_dir") as error:
    data.dataset_info(_cfg(data_dir=missing))
  assert missing in str(error.value) and "TFDS_DATA_DIR" in str(error.value)


def test_unknown_tfds_name():
  with pytest.raises(ValueError, match="no_such_dataset_xyz"):
    data.dataset_info(_cfg(dataset="no_such_dataset_xyz"))


def test_non_rgb_tfds_dataset(tmp_path):
  with conftest.mock_tfds(tmp_path, name="mnist"):
    with pytest.raises(ValueError, match="3-channel"):
      data.dataset_info(_cfg(dataset="mnist"))


def test_bad_split_name(tmp_path):
  with conftest.mock_tfds(tmp_path):
    with pytest.raises(ValueError, match="split"):
      data.eval_dataset(_cfg(), "val", batch_size=2)


@pytest.mark.slow
@pytest.mark.skipif(not TFDS_DATA_DIR, reason="TFDS_DATA_DIR is not set")
def test_offline_cifar10_info():
  # Set but without cifar10 is a broken set-up, not a reason to skip.
  assert os.path.isdir(os.path.join(TFDS_DATA_DIR, "cifar10")), (
      f"TFDS_DATA_DIR={TFDS_DATA_DIR} holds no cifar10/: prepare it there "
      "or unset TFDS_DATA_DIR.")
  info = data.dataset_info(config.DataConfig(data_dir=TFDS_DATA_DIR))
  assert info.num_classes == 10
  assert info.class_names[0] == "airplane"
  assert (info.num_train, info.num_val, info.num_test) == (45000, 5000, 10000)
  (images, labels), = _batches(
      data.eval_dataset(config.DataConfig(data_dir=TFDS_DATA_DIR), "test",
                        batch_size=8), 1)
  assert images.shape == (8, 32, 32, 3) and labels.dtype == np.int32


# ----------------------------------------------------------------------------
# Image folders.

CLASSES = ("bird", "cat", "dog")


def _write_folder(root, per_class=4, test_per_class=2, corrupt=True):
  """Tiny folder dataset; returns {split: {class: count}} of good files."""
  rng = np.random.RandomState(0)
  counts = collections.defaultdict(dict)
  for split, n in (("train", per_class), ("test", test_per_class)):
    for c, name in enumerate(CLASSES):
      class_dir = root / split / name
      class_dir.mkdir(parents=True)
      for i in range(n):
        image = rng.randint(0, 256, size=(10 + c, 9, 3)).astype(np.uint8)
        if i % 2:
          encoded = tf.io.encode_png(image)
          (class_dir / f"{i}.png").write_bytes(encoded.numpy())
        else:
          encoded = tf.io.encode_jpeg(image)
          (class_dir / f"{i}.JPG").write_bytes(encoded.numpy())
      counts[split][name] = n
  gray = rng.randint(0, 256, size=(8, 8, 1)).astype(np.uint8)
  (root / "train" / "cat" / "gray.png").write_bytes(
      tf.io.encode_png(gray).numpy())
  rgba = rng.randint(0, 256, size=(8, 8, 4)).astype(np.uint8)
  (root / "train" / "dog" / "rgba.png").write_bytes(
      tf.io.encode_png(rgba).numpy())
  counts["train"]["cat"] += 1
  counts["train"]["dog"] += 1
  (root / "train" / "dog" / "notes.txt").write_text("not an image")
  if corrupt:
    (root / "train" / "bird" / "broken.jpg").write_bytes(b"\xff\xd8 garbage")
  return counts


def _collect(cfg, split):
  ds = data.eval_dataset(cfg, split, batch_size=5)
  images, labels = zip(*ds.as_numpy_iterator())
  return np.concatenate(images), np.concatenate(labels)


def test_folder_corrupt_file_fails_naming_it(tmp_path):
  _write_folder(tmp_path)
  cfg = _cfg(dataset=f"folder:{tmp_path}")
  with pytest.raises(ValueError, match="broken.jpg") as error:
    data.dataset_info(cfg)
  assert "skip_corrupt" in str(error.value)


def test_folder_skip_corrupt_loads_the_rest(tmp_path, caplog):
  counts = _write_folder(tmp_path)
  cfg = _cfg(dataset=f"folder:{tmp_path}", skip_corrupt=True,
             validation_fraction=0.25, image_size=8)
  with caplog.at_level(logging.WARNING):
    info = data.dataset_info(cfg)
  assert "Skipping 1 undecodable" in caplog.text
  assert info.num_skipped == 1
  assert info.class_names == CLASSES and info.num_classes == 3
  num_train_files = sum(counts["train"].values())  # 14
  assert (info.num_train, info.num_val, info.num_test) == (
      num_train_files - 4, 4, 6)
  assert info.image_shape == (None, None, 3)  # Sizes differ.

  train_x, train_y = _collect(cfg, "train")
  val_x, val_y = _collect(cfg, "validation")
  test_x, test_y = _collect(cfg, "test")
  assert train_x.shape == (10, 8, 8, 3) and val_x.shape == (4, 8, 8, 3)
  assert test_x.shape == (6, 8, 8, 3)
  assert all(x.min() >= 0 and x.max() <= 1 for x in (train_x, val_x, test_x))
  label_counts = collections.Counter(np.concatenate([train_y, val_y]))
  assert label_counts == {i: counts["train"][name]
                          for i, name in enumerate(CLASSES)}
  assert collections.Counter(test_y) == {0: 2, 1: 2, 2: 2}
  # No example is both in train and validation.
  assert not ({x.tobytes() for x in train_x} & {x.tobytes() for x in val_x})

  (views, labels), = _batches(
      data.pretrain_dataset(cfg, global_batch_size=4, seed=0), 1)
  assert views.shape == (4, 2, 8, 8, 3) and labels.dtype == np.int32

  # The first 3 training examples; the validation hold-out is unchanged.
  subset = dataclasses.replace(cfg, train_examples=3)
  assert data.dataset_info(subset).num_train == 3
  sub_x, sub_y = _collect(subset, "train")
  np.testing.assert_array_equal(sub_x, train_x[:3])
  np.testing.assert_array_equal(sub_y, train_y[:3])
  np.testing.assert_array_equal(_collect(subset, "validation")[0], val_x)


def test_folder_pretrain_deterministic(tmp_path):
  _write_folder(tmp_path, corrupt=False)
  cfg = _cfg(dataset=f"folder:{tmp_path}", augmentation="autoaugment",
             image_size=8)
  first = _batches(data.pretrain_dataset(cfg, global_batch_size=4, seed=3), 3)
  again = _batches(data.pretrain_dataset(cfg, global_batch_size=4, seed=3), 3)
  for (x1, y1), (x2, y2) in zip(first, again):
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)


def test_folder_missing_train_dir(tmp_path):
  with pytest.raises(ValueError, match="not a directory"):
    data.dataset_info(_cfg(dataset=f"folder:{tmp_path / 'nothing'}"))


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
