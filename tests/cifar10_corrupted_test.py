"""Tests for supcon_tf.cifar10_corrupted: CIFAR-10-C from a TFDS data dir.

A real (tiny) CIFAR-10-C is prepared by TFDS's own builder in a temporary
data dir; the robustness report reads it when present and falls back to the
built-in corruptions otherwise.
"""

import json
import os
import re
import sys
from unittest import mock

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.image_classification import (
    cifar10_corrupted as tfds_cifar10_c)

import conftest
from supcon_tf import cifar10_corrupted
from supcon_tf import config as config_lib
from supcon_tf import plots
from supcon_tf import robustness


NUM_SETS_IMAGES = 6
# Wrong images in the set of each (corruption, severity) written below: fog
# gets worse with severity, gaussian_noise better; snow has severity 1 only.
WRONG = {("fog", s): s - 1 for s in cifar10_corrupted.SEVERITIES}
WRONG.update({("gaussian_noise", s): 5 - s
              for s in cifar10_corrupted.SEVERITIES})
WRONG[("snow", 1)] = 2


def bucket_image(label):
  """A flat 32x32 uint8 image that `brightness_classifier` calls `label`."""
  return np.full([32, 32, 3], round((label + 0.5) / 10 * 255), np.uint8)


def brightness_classifier():
  """Logits whose argmax is floor(10 * mean pixel) for images in [0, 1].

  Logit k is 2 c_k m - c_k^2 (= m^2 - (m - c_k)^2) for the mean m and the
  bucket centre c_k = (k + 0.5) / 10: the nearest centre wins.
  """
  centres = (np.arange(10) + 0.5) / 10
  return keras.Sequential([
      keras.Input((32, 32, 3)),
      keras.layers.GlobalAveragePooling2D(),
      keras.layers.Dense(1, use_bias=False, kernel_initializer=(
          keras.initializers.Constant(1 / 3))),
      keras.layers.Dense(10, kernel_initializer=keras.initializers.Constant(
          2 * centres[None, :]), bias_initializer=keras.initializers.Constant(
              -centres ** 2))])


def prepare_cifar10_corrupted(root):
  """Builds the `WRONG` sets of cifar10_corrupted in `root`/data with TFDS.

  Writes the release's layout (one `.npy` a corruption, its severities
  stacked, and `labels.npy`) and lets TFDS's own builder prepare each
  config from it, its download pointed there.

  Returns:
    `(data_dir, labels [n], {(corruption, severity): uint8 images [n, 32,
    32, 3]})`.
  """
  labels = np.arange(NUM_SETS_IMAGES) % 10
  sets = {}
  for (corruption, severity), wrong in WRONG.items():
    # The first `wrong` images look like the next class.
    sets[corruption, severity] = np.stack(
        [bucket_image((label + (i < wrong)) % 10)
         for i, label in enumerate(labels)])
  release = root / "download" / "CIFAR-10-C"
  os.makedirs(release)
  np.save(release / "labels.npy", np.tile(labels, 5))
  for corruption in {c for c, _ in sets}:
    stacked = [sets.get((corruption, s), np.zeros_like(sets[next(iter(sets))]))
               for s in cifar10_corrupted.SEVERITIES]
    # pylint: disable-next=protected-access
    filename = tfds_cifar10_c._CORRUPTIONS_TO_FILENAMES[corruption]
    np.save(release / filename, np.concatenate(stacked))
  data_dir = str(root / "data")
  with mock.patch.object(tfds.download.DownloadManager,
                         "download_and_extract",
                         lambda self, url: str(root / "download")):
    for corruption, severity in sets:
      tfds.builder(f"cifar10_corrupted/{corruption}_{severity}",
                   data_dir=data_dir).download_and_prepare()
  return data_dir, labels, sets


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  return prepare_cifar10_corrupted(tmp_path_factory.mktemp("cifar10_c"))


def clean_dataset(labels):
  images = np.stack([bucket_image(label) for label in labels])
  return tf.data.Dataset.from_tensor_slices(
      (images.astype(np.float32) / 255, labels.astype(np.int32))).batch(4)


def test_families_cover_every_tfds_corruption_once():
  in_families = [c for names in cifar10_corrupted.FAMILIES.values()
                 for c in names]
  assert len(in_families) == len(set(in_families))
  configs = cifar10_corrupted.all_configs()
  assert set(in_families) == {c for c, _ in configs}
  assert len(configs) == len(in_families) * len(cifar10_corrupted.SEVERITIES)


def test_cifar10_corrupted_scores_every_complete_prepared_corruption(
    prepared, tmp_path):
  data_dir, labels, sets = prepared
  data_config = config_lib.DataConfig(dataset="cifar10", data_dir=data_dir)
  classifier = brightness_classifier()
  clean = clean_dataset(labels)
  assert robustness.choose_corruptions("auto", data_config)[0] == (
      "cifar10_corrupted")
  used = 4  # Of the NUM_SETS_IMAGES images of every set.
  result = robustness.evaluate_robustness(
      classifier, clean, data_config, max_examples=used, batch_size=3)
  # TFDS stores every set in one shuffled order; the labels are distinct,
  # so the stored labels give it.
  order = [int(label) for _, label in tfds.as_numpy(tfds.builder(
      "cifar10_corrupted/fog_1", data_dir=data_dir).as_dataset(
          split="test", as_supervised=True))]
  assert sorted(order) == list(labels)

  def expected_top1(images):
    first = np.array(order[:used])
    predicted = np.floor(images[first].mean(axis=(1, 2, 3)) / 255 * 10)
    return float(np.mean(predicted == labels[first]))

  assert result["corruptions"] == "cifar10_corrupted"
  assert result["description"].startswith("CIFAR-10-C: 2 corruptions")
  assert result["clean_top1"] == 1.0  # Perfect on clean images.
  assert result["num_examples"] == used
  # snow lacks severities 2-5: left out, and listed as missing.
  assert list(result["top1"]) == ["fog", "gaussian_noise"]
  for corruption, values in result["top1"].items():
    assert values == pytest.approx(
        [expected_top1(sets[corruption, s])
         for s in cifar10_corrupted.SEVERITIES])
  assert result["top1"]["fog"][0] == 1.0
  assert result["top1"]["gaussian_noise"][-1] == 1.0
  assert min(min(values) for values in result["top1"].values()) < 1.0
  assert "snow_2" in result["missing"] and "snow_1" not in result["missing"]
  assert len(result["missing"]) == len(cifar10_corrupted.all_configs()) - 11
  means = {c: np.mean(v) for c, v in result["top1"].items()}
  assert result["mean_top1"] == pytest.approx(means)
  mean = np.mean(list(result["top1"].values()))
  assert result["mean_corrupted_top1"] == pytest.approx(mean)
  assert result["relative_corrupted_top1"] == pytest.approx(mean)
  assert result["family_mean_top1"]["weather"] == pytest.approx(means["fog"])
  assert result["family_mean_top1"]["blur"] is None
  assert result["benchmark_mean_top1"] is None
  assert json.loads(json.dumps(result)) == result
  out = str(tmp_path / "robustness.png")
  plots.plot_robustness({"run": robustness.plotted(result)}, out)
  conftest.assert_png(out)

  # The built-in corruptions when asked for, or for another dataset.
  builtin = robustness.evaluate_robustness(
      classifier, clean, data_config, corruptions="builtin")
  assert builtin["corruptions"] == "builtin"
  assert set(builtin["top1"]) == set(robustness.CORRUPTIONS)
  assert "corruptions=builtin" in builtin["description"]
  source, description = robustness.choose_corruptions(
      "auto", config_lib.DataConfig(dataset="cifar100", data_dir=data_dir))
  assert source == "builtin" and "not cifar100" in description
  with pytest.raises(ValueError, match="needs dataset 'cifar10'"):
    robustness.choose_corruptions("cifar10_corrupted", config_lib.DataConfig(
        dataset="cifar100", data_dir=data_dir))


def test_without_cifar10_corrupted_auto_falls_back_to_builtin(tmp_path):
  data_dir = str(tmp_path / "empty")
  data_config = config_lib.DataConfig(dataset="cifar10", data_dir=data_dir)
  labels = np.arange(4)
  result = robustness.evaluate_robustness(
      brightness_classifier(), clean_dataset(labels), data_config)
  assert result["corruptions"] == "builtin"
  assert result["description"] == (
      f"built-in corruptions (CIFAR-10-C not found in {data_dir})")
  assert result["clean_top1"] == 1.0
  assert result["relative_corrupted_top1"] == pytest.approx(
      result["mean_corrupted_top1"])
  with pytest.raises(ValueError, match=re.escape(
      f"`tfds build cifar10_corrupted --data_dir={data_dir}`")):
    robustness.evaluate_robustness(
        brightness_classifier(), clean_dataset(labels), data_config,
        corruptions="cifar10_corrupted")
  with pytest.raises(ValueError, match="EvalConfig.corruptions"):
    config_lib.EvalConfig(corruptions="imagenet_c")


def test_complete_corruptions_reads_only_what_is_prepared(prepared, tmp_path):
  data_dir, _, _ = prepared
  corruptions, missing = cifar10_corrupted.complete_corruptions(data_dir)
  # snow has severity 1 only: prepared in part, so not complete.
  assert sorted(corruptions) == ["fog", "gaussian_noise"]
  assert "snow_1" not in missing and "snow_5" in missing
  empty = str(tmp_path / "empty")
  assert cifar10_corrupted.complete_corruptions(empty) == (
      [], [cifar10_corrupted.config_name(*c)
           for c in cifar10_corrupted.all_configs()])
  assert cifar10_corrupted.build_command(empty) == (
      f"tfds build cifar10_corrupted --data_dir={empty}")


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
