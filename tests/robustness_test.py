"""Tests of supcon_tf.robustness: corruptions and robustness results."""

import json
import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import conftest
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


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
