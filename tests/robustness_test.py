"""Tests of supcon_tf.robustness: corruptions and robustness results."""

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
from supcon_tf import rundir


def random_images(shape, seed=0):
  return tf.random.stateless_uniform(shape, seed=[seed, 1])


def smooth_images(batch, size, seed=0):
  """Random images with large smooth blobs (JPEG-friendly content)."""
  coarse = random_images([batch, 4, 4, 3], seed)
  return tf.image.resize(coarse, [size, size], method="bilinear")


def high_frequency_energy(images):
  """Mean squared difference between neighbouring pixels."""
  dx = images[:, :, 1:] - images[:, :, :-1]
  dy = images[:, 1:] - images[:, :-1]
  return float(tf.reduce_mean(tf.square(dx)) + tf.reduce_mean(tf.square(dy)))


# ----------------------------------------------------------------------------
# Corruptions.


def test_noise_change_grows_with_severity_like_its_sigma():
  grey = tf.fill([4, 16, 16, 3], 0.5)  # Far from 0 and 1: no clipping.
  changes = [float(tf.reduce_mean(tf.abs(
      robustness.corrupt(grey, "gaussian_noise", s, seed=1) - grey)))
             for s in range(1, 6)]
  assert all(a < b for a, b in zip(changes, changes[1:])), changes
  # E|N(0, sigma^2)| = sigma * sqrt(2 / pi).
  np.testing.assert_allclose(
      changes, np.array(robustness.NOISE_SIGMAS) * np.sqrt(2 / np.pi),
      rtol=0.06)


def test_blur_removes_more_high_frequency_energy_with_severity():
  images = random_images([2, 32, 32, 3])
  energies = [high_frequency_energy(
      robustness.corrupt(images, "gaussian_blur", s)) for s in range(6)]
  assert all(a > b for a, b in zip(energies, energies[1:])), energies
  # A normalised kernel with mirrored borders leaves flat images flat.
  flat = tf.fill([1, 8, 8, 3], 0.3)
  np.testing.assert_allclose(
      robustness.corrupt(flat, "gaussian_blur", 5), flat, atol=1e-6)


def test_blur_sigma_scales_with_image_size():
  def spread(size):
    impulse = np.zeros([1, size, size, 1], np.float32)
    impulse[0, size // 2, size // 2, 0] = 1.0
    out = robustness.corrupt(impulse, "gaussian_blur", 5).numpy()[0, :, :, 0]
    profile = out.sum(axis=0) / out.sum()
    offsets = np.arange(size) - size // 2
    return float(np.sum(profile * offsets ** 2))

  # Severity 5 is sigma 1 pixel at 32 pixels and 2 pixels at 64; cutting the
  # kernel at 3 sigma lowers the variance by ~3%.
  np.testing.assert_allclose(spread(32), 1.0, rtol=0.05)
  np.testing.assert_allclose(spread(64), 4.0, rtol=0.05)


def test_jpeg_changes_images_within_range():
  images = smooth_images(3, 16) * 0.9 + 0.05 * random_images([3, 16, 16, 3])
  changes = []
  for severity in (1, 5):
    out = robustness.corrupt(images, "jpeg", severity)
    assert out.shape == images.shape and out.dtype == tf.float32
    assert float(tf.reduce_min(out)) >= 0 and float(tf.reduce_max(out)) <= 1
    changes.append(float(tf.reduce_mean(tf.abs(out - images))))
  assert changes[0] > 1e-3 and changes[1] > changes[0], changes
  single = robustness.corrupt(images[0], "jpeg", 5)
  np.testing.assert_allclose(single, robustness.corrupt(images, "jpeg", 5)[0])


@pytest.mark.parametrize("kind", robustness.CORRUPTIONS)
def test_severity_zero_is_clean_and_outputs_are_clipped(kind):
  images = random_images([2, 8, 8, 3])
  np.testing.assert_array_equal(robustness.corrupt(images, kind, 0), images)
  out = robustness.corrupt(images * 1.4 - 0.2, kind, 3, seed=2)
  assert float(tf.reduce_min(out)) >= 0 and float(tf.reduce_max(out)) <= 1


def test_noise_is_deterministic_under_a_seed():
  images = random_images([2, 8, 8, 3])
  a = robustness.corrupt(images, "gaussian_noise", 3, seed=7)
  np.testing.assert_array_equal(
      a, robustness.corrupt(images, "gaussian_noise", 3, seed=7))
  traced = tf.function(robustness.corrupt)
  np.testing.assert_array_equal(
      a, traced(images, "gaussian_noise", 3, seed=tf.constant(7)))
  assert not np.array_equal(
      a, robustness.corrupt(images, "gaussian_noise", 3, seed=8))
  assert not np.array_equal(
      robustness.corrupt(images, "gaussian_noise", 3, seed=(7, 0)),
      robustness.corrupt(images, "gaussian_noise", 3, seed=(7, 1)))


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="snow", severity=1), "snow"),
    (dict(kind="jpeg", severity=6), "severity"),
    (dict(kind="jpeg", severity=-1), "severity"),
    (dict(kind="jpeg", severity=1.5), "severity"),
    (dict(kind="jpeg", severity=True), "severity"),
])
def test_corrupt_rejects_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    robustness.corrupt(random_images([1, 4, 4, 3]), **kwargs)


def test_corrupt_rejects_integer_and_badly_shaped_images():
  with pytest.raises(ValueError, match="uint8"):
    robustness.corrupt(tf.zeros([1, 4, 4, 3], tf.uint8), "jpeg", 1)
  with pytest.raises(ValueError, match="shape"):
    robustness.corrupt(tf.zeros([4, 4]), "gaussian_noise", 1)


# ----------------------------------------------------------------------------
# corruption_robustness.


class NoiseDetector(keras.Model):
  """Logits (threshold - std, std - threshold): class 1 = "noisy image"."""

  def __init__(self, threshold):
    super().__init__()
    self.threshold = threshold

  def call(self, images, training=False):
    std = keras.ops.std(keras.ops.reshape(images, (keras.ops.shape(images)[0],
                                                   -1)), axis=1)
    return keras.ops.stack([self.threshold - std, std - self.threshold], 1)


def test_robustness_of_a_noise_detector_is_hand_derivable():
  # Flat grey images labelled "clean" (0): the detector is right until the
  # noise sigma (0.04, 0.06, 0.08, 0.09, 0.10) passes its threshold 0.07.
  # Blur and JPEG keep flat images flat, so they never fool it.
  images = np.full([10, 8, 8, 3], 0.5, np.float32)
  dataset = tf.data.Dataset.from_tensor_slices(
      (images, np.zeros([10], np.int32))).batch(4)
  result = robustness.corruption_robustness(NoiseDetector(0.07), dataset)
  assert result["clean_top1"] == 1.0
  assert result["num_examples"] == 10
  assert result["severities"] == [1, 2, 3, 4, 5]
  assert result["top1"]["gaussian_noise"] == [1.0, 1.0, 0.0, 0.0, 0.0]
  assert result["top1"]["gaussian_blur"] == [1.0] * 5
  assert result["top1"]["jpeg"] == [1.0] * 5
  assert result["mean_top1"]["gaussian_noise"] == pytest.approx(0.4)
  assert result["mean_corrupted_top1"] == pytest.approx(0.8)


def test_robustness_structure_and_clean_accuracy_match_the_classifier():
  rng = np.random.RandomState(0)
  images = rng.uniform(size=[22, 8, 8, 3]).astype(np.float32)
  labels = rng.randint(0, 3, size=[22]).astype(np.int32)
  classifier = keras.Sequential([keras.Input((8, 8, 3)),
                                 keras.layers.Flatten(),
                                 keras.layers.Dense(
                                     3, kernel_initializer=keras.initializers
                                     .GlorotUniform(seed=0))])
  dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)
  plain = np.argmax(classifier.predict(images, verbose=0), axis=1) == labels

  result = robustness.corruption_robustness(
      classifier, dataset, kinds=("jpeg", "gaussian_noise"),
      severities=(2, 5), max_examples=13, seed=3)
  assert set(result) == {"clean_top1", "severities", "top1", "mean_top1",
                         "mean_corrupted_top1", "num_examples", "seed"}
  assert result["num_examples"] == 13
  assert result["clean_top1"] == pytest.approx(plain[:13].mean())
  assert list(result["top1"]) == ["jpeg", "gaussian_noise"]
  for values in result["top1"].values():
    assert len(values) == 2 and all(0 <= v <= 1 for v in values)
  assert json.loads(json.dumps(result)) == result
  assert robustness.corruption_robustness(
      classifier, dataset, kinds=("jpeg", "gaussian_noise"),
      severities=(2, 5), max_examples=13, seed=3) == result

  whole = robustness.corruption_robustness(classifier, dataset, kinds=(),
                                           severities=())
  assert whole["clean_top1"] == pytest.approx(plain.mean())
  assert whole["num_examples"] == 22 and whole["mean_corrupted_top1"] is None
  with pytest.raises(ValueError, match="severity"):
    robustness.corruption_robustness(classifier, dataset, severities=(0,))
  with pytest.raises(ValueError, match="uint8"):
    robustness.corruption_robustness(classifier, dataset.map(
        lambda x, y: (tf.cast(x * 255, tf.uint8), y)))


def test_compare_robustness_reads_every_workdir(tmp_path):
  results = {}
  for name, clean in (("supcon", 0.8), ("ce", 0.7)):
    os.makedirs(tmp_path / name)
    results[name] = {"clean_top1": clean, "severities": [1, 2],
                     "top1": {"jpeg": [clean - 0.1, clean - 0.2]},
                     "mean_corrupted_top1": clean - 0.15}
    with open(tmp_path / name / rundir.ROBUSTNESS_FILE, "w") as f:
      json.dump(results[name], f)
  out = str(tmp_path / "compare.png")
  loaded = robustness.compare_robustness(
      {name: str(tmp_path / name) for name in results}, out)
  assert loaded == results
  conftest.assert_png(out)
  table = robustness.robustness_table(loaded).splitlines()
  assert table[0] == "| model | clean | jpeg | mean corrupted |"
  assert table[2] == "| supcon | 80.0 | 65.0 | 65.0 |"
  assert table[3] == "| ce | 70.0 | 55.0 | 55.0 |"
  with pytest.raises(ValueError, match="--mode=evaluate"):
    robustness.compare_robustness({"x": str(tmp_path / "nothing")}, out)



# ----------------------------------------------------------------------------
# CIFAR-10-C from a prepared TFDS data dir, else the built-in corruptions.

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


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
