"""Tests of supcon_tf.evaluation and supcon_tf.plots."""

import json
import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import conftest
from supcon_tf import config as config_lib
from supcon_tf import data
from supcon_tf import evaluation
from supcon_tf import linear_eval
from supcon_tf import models
from supcon_tf import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
  assert os.path.isfile(path), path
  assert os.path.getsize(path) > 1000, os.path.getsize(path)
  with open(path, "rb") as f:
    assert f.read(8) == PNG_MAGIC


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
# kNN.


def test_knn_predict_weights_votes_by_similarity():
  # Test row (1, 0): neighbours of class 0 at cosine 1 and 0, class 1 at
  # 0.8. With k=2 the top two are class 0 (1.0) and class 1 (0.8); at
  # temperature 0.1 the weights are e^10 vs e^8, so class 0 wins; with k=1
  # only the class-0 neighbour votes.
  train = np.array([[1, 0], [0, 1], [0.8, 0.6]], np.float32)
  labels = np.array([0, 0, 1])
  test = np.array([[1, 0], [0.6, 0.8]], np.float32)
  assert evaluation.knn_predict(train, labels, test, k=2, temperature=0.1,
                                num_classes=2).tolist() == [0, 1]
  assert evaluation.knn_predict(train, labels, test, k=1, temperature=0.1,
                                num_classes=2).tolist() == [0, 1]
  # All three vote for (0.6, 0.8): similarities 0.6 (c0), 0.8 (c0), 0.96
  # (c1): e^6 + e^8 < e^9.6, so class 1.
  assert evaluation.knn_predict(train, labels, test[1:], k=3, temperature=0.1,
                                num_classes=2).tolist() == [1]
  with pytest.raises(ValueError, match="k must be"):
    evaluation.knn_predict(train, labels, test, k=0, temperature=0.1,
                           num_classes=2)


KNN_IMAGE = 8


def colour_data(n, num_classes, seed, noise=0.01):
  """Images whose mean colour (an RGB-cube corner) is their class."""
  corners = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]],
                     np.float32)[:num_classes]
  rng = np.random.RandomState(seed)
  labels = rng.permutation(np.arange(n) % num_classes).astype(np.int32)
  images = (0.5 + 0.8 * (corners[labels] - 0.5))[:, None, None, :]
  images = images + noise * rng.normal(size=(n, KNN_IMAGE, KNN_IMAGE, 3))
  return np.clip(images, 0, 1).astype(np.float32), labels


def batches(images, labels, batch=16):
  return tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch)


def tiny_encoder(seed=0):
  keras.utils.set_random_seed(seed)
  return models.resnet(18, width=0.0625, input_shape=(KNN_IMAGE, KNN_IMAGE, 3))


def unit_rows(rng, n, dim):
  x = rng.normal(size=(n, dim))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def reference_knn(train, train_labels, test, k, temperature, num_classes):
  """Loop-by-loop weighted k-NN in float64."""
  predictions = []
  for query in test.astype(np.float64):
    similarity = train.astype(np.float64) @ query
    votes = np.zeros(num_classes)
    for i in np.argsort(-similarity)[:k]:
      votes[train_labels[i]] += np.exp(similarity[i] / temperature)
    predictions.append(np.argmax(votes))
  return np.array(predictions)


@pytest.mark.parametrize("k,temperature,chunk_size", [
    (1, 0.1, 256), (5, 0.1, 3), (7, 0.5, 4), (100, 0.07, 5)])
def test_knn_predict_matches_reference(k, temperature, chunk_size):
  rng = np.random.default_rng(k)
  train, test = unit_rows(rng, 40, 8), unit_rows(rng, 23, 8)
  labels = rng.integers(0, 5, size=40)
  predictions = evaluation.knn_predict(
      train, labels, test, k=k, temperature=temperature, num_classes=5,
      chunk_size=chunk_size)
  assert predictions.shape == (23,) and predictions.dtype == np.int32
  np.testing.assert_array_equal(
      predictions, reference_knn(train, labels, test, min(k, 40),
                                 temperature, 5))


def test_knn_votes_are_weighted_by_similarity():
  # One neighbour of class 1 at similarity 1, two of class 0 at 0.5: a sharp
  # temperature lets the close one win, a flat one lets the majority win.
  angle = np.pi / 3
  train = np.array([[1, 0], [np.cos(angle), np.sin(angle)],
                    [np.cos(angle), -np.sin(angle)]], np.float32)
  labels = np.array([1, 0, 0])
  test = np.array([[1, 0]], np.float32)

  def predict(k, temperature):
    return evaluation.knn_predict(train, labels, test, k=k,
                                  temperature=temperature, num_classes=2)[0]

  assert predict(3, 0.1) == 1  # e^10 > 2 e^5
  assert predict(3, 10.0) == 0  # e^0.1 < 2 e^0.05
  assert predict(1, 10.0) == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(k=0), "k must be"),
    (dict(temperature=0.0), "temperature"),
    (dict(num_classes=2), "num_classes=2"),
    (dict(test_features=np.zeros([2, 5], np.float32)), "shapes"),
])
def test_knn_predict_rejects_bad_arguments(kwargs, match):
  rng = np.random.default_rng(0)
  arguments = dict(train_features=unit_rows(rng, 6, 4),
                   train_labels=np.arange(6) % 3,
                   test_features=unit_rows(rng, 2, 4), k=3, temperature=0.1,
                   num_classes=3)
  arguments.update(kwargs)
  with pytest.raises(ValueError, match=match):
    evaluation.knn_predict(**arguments)


def test_embed_normalises_and_leaves_encoder_untouched():
  encoder = tiny_encoder()
  before = [np.array(w.numpy()) for w in encoder.weights]
  images, labels = colour_data(20, 3, 0)
  features, embedded_labels = evaluation.embed(encoder,
                                               batches(images, labels, 8))
  assert features.shape == (20, 32) and features.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0,
                             rtol=1e-5)
  np.testing.assert_array_equal(embedded_labels, labels)
  expected = encoder(images, training=False).numpy()
  expected /= np.linalg.norm(expected, axis=1, keepdims=True)
  np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-6)
  for old, weight in zip(before, encoder.weights):
    assert old.tobytes() == np.array(weight.numpy()).tobytes(), weight.path


def test_knn_accuracy_on_separable_data():
  encoder = tiny_encoder()
  train_images, train_labels = colour_data(64, 4, 0)
  test = batches(*colour_data(32, 4, 1))
  accuracy = evaluation.knn_accuracy(
      encoder, batches(train_images, train_labels), test, k=10,
      chunk_size=7)
  assert accuracy >= 0.95
  # Neighbours with scrambled labels carry no information.
  scrambled = np.random.RandomState(0).permutation(train_labels)
  chance = evaluation.knn_accuracy(
      encoder, batches(train_images, scrambled), test, k=10)
  assert chance < 0.7


# ----------------------------------------------------------------------------
# Corruptions.


def test_noise_change_grows_with_severity_like_its_sigma():
  grey = tf.fill([4, 16, 16, 3], 0.5)  # Far from 0 and 1: no clipping.
  changes = [float(tf.reduce_mean(tf.abs(
      evaluation.corrupt(grey, "gaussian_noise", s, seed=1) - grey)))
             for s in range(1, 6)]
  assert all(a < b for a, b in zip(changes, changes[1:])), changes
  # E|N(0, sigma^2)| = sigma * sqrt(2 / pi).
  np.testing.assert_allclose(
      changes, np.array(evaluation.NOISE_SIGMAS) * np.sqrt(2 / np.pi),
      rtol=0.06)


def test_blur_removes_more_high_frequency_energy_with_severity():
  images = random_images([2, 32, 32, 3])
  energies = [high_frequency_energy(
      evaluation.corrupt(images, "gaussian_blur", s)) for s in range(6)]
  assert all(a > b for a, b in zip(energies, energies[1:])), energies
  # A normalised kernel with mirrored borders leaves flat images flat.
  flat = tf.fill([1, 8, 8, 3], 0.3)
  np.testing.assert_allclose(
      evaluation.corrupt(flat, "gaussian_blur", 5), flat, atol=1e-6)


def test_blur_sigma_scales_with_image_size():
  def spread(size):
    impulse = np.zeros([1, size, size, 1], np.float32)
    impulse[0, size // 2, size // 2, 0] = 1.0
    out = evaluation.corrupt(impulse, "gaussian_blur", 5).numpy()[0, :, :, 0]
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
    out = evaluation.corrupt(images, "jpeg", severity)
    assert out.shape == images.shape and out.dtype == tf.float32
    assert float(tf.reduce_min(out)) >= 0 and float(tf.reduce_max(out)) <= 1
    changes.append(float(tf.reduce_mean(tf.abs(out - images))))
  assert changes[0] > 1e-3 and changes[1] > changes[0], changes
  single = evaluation.corrupt(images[0], "jpeg", 5)
  np.testing.assert_allclose(single, evaluation.corrupt(images, "jpeg", 5)[0])


@pytest.mark.parametrize("kind", evaluation.CORRUPTIONS)
def test_severity_zero_is_clean_and_outputs_are_clipped(kind):
  images = random_images([2, 8, 8, 3])
  np.testing.assert_array_equal(evaluation.corrupt(images, kind, 0), images)
  out = evaluation.corrupt(images * 1.4 - 0.2, kind, 3, seed=2)
  assert float(tf.reduce_min(out)) >= 0 and float(tf.reduce_max(out)) <= 1


def test_noise_is_deterministic_under_a_seed():
  images = random_images([2, 8, 8, 3])
  a = evaluation.corrupt(images, "gaussian_noise", 3, seed=7)
  np.testing.assert_array_equal(
      a, evaluation.corrupt(images, "gaussian_noise", 3, seed=7))
  traced = tf.function(evaluation.corrupt)
  np.testing.assert_array_equal(
      a, traced(images, "gaussian_noise", 3, seed=tf.constant(7)))
  assert not np.array_equal(
      a, evaluation.corrupt(images, "gaussian_noise", 3, seed=8))
  assert not np.array_equal(
      evaluation.corrupt(images, "gaussian_noise", 3, seed=(7, 0)),
      evaluation.corrupt(images, "gaussian_noise", 3, seed=(7, 1)))


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="snow", severity=1), "snow"),
    (dict(kind="jpeg", severity=6), "severity"),
    (dict(kind="jpeg", severity=-1), "severity"),
    (dict(kind="jpeg", severity=1.5), "severity"),
    (dict(kind="jpeg", severity=True), "severity"),
])
def test_corrupt_rejects_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    evaluation.corrupt(random_images([1, 4, 4, 3]), **kwargs)


def test_corrupt_rejects_integer_and_badly_shaped_images():
  with pytest.raises(ValueError, match="uint8"):
    evaluation.corrupt(tf.zeros([1, 4, 4, 3], tf.uint8), "jpeg", 1)
  with pytest.raises(ValueError, match="shape"):
    evaluation.corrupt(tf.zeros([4, 4]), "gaussian_noise", 1)


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
  result = evaluation.corruption_robustness(NoiseDetector(0.07), dataset)
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

  result = evaluation.corruption_robustness(
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
  assert evaluation.corruption_robustness(
      classifier, dataset, kinds=("jpeg", "gaussian_noise"),
      severities=(2, 5), max_examples=13, seed=3) == result

  whole = evaluation.corruption_robustness(classifier, dataset, kinds=(),
                                           severities=())
  assert whole["clean_top1"] == pytest.approx(plain.mean())
  assert whole["num_examples"] == 22 and whole["mean_corrupted_top1"] is None
  with pytest.raises(ValueError, match="severity"):
    evaluation.corruption_robustness(classifier, dataset, severities=(0,))
  with pytest.raises(ValueError, match="uint8"):
    evaluation.corruption_robustness(classifier, dataset.map(
        lambda x, y: (tf.cast(x * 255, tf.uint8), y)))


# ----------------------------------------------------------------------------
# Plots.


def write_scalars(event_dir, steps, method="supcon"):
  writer = tf.summary.create_file_writer(str(event_dir))
  with writer.as_default():
    for step in steps:
      tf.summary.scalar("loss", 5.0 - 0.1 * step, step=step)
      tf.summary.scalar("learning_rate", 0.01 * step, step=step)
      tf.summary.scalar("nn_top1" if method != "ce" else "accuracy",
                        0.1 * step, step=step)
      tf.summary.scalar("images_per_second", 100.0 + step, step=step)
  writer.close()


def test_read_scalars_reads_tf2_summaries_and_keeps_the_latest(tmp_path):
  write_scalars(tmp_path, [1, 2, 3])
  scalars = plots.read_scalars(str(tmp_path))
  assert set(scalars) == {"loss", "learning_rate", "nn_top1",
                          "images_per_second"}
  steps, values = scalars["loss"]
  assert steps.tolist() == [1, 2, 3]
  np.testing.assert_allclose(values, [4.9, 4.8, 4.7], rtol=1e-6)
  # A resumed run writes a newer file that repeats step 3.
  writer = tf.summary.create_file_writer(str(tmp_path), filename_suffix=".b")
  with writer.as_default():
    tf.summary.scalar("loss", -1.0, step=3)
  writer.close()
  assert plots.read_scalars(str(tmp_path))["loss"][1].tolist()[-1] == -1.0
  assert plots.read_scalars(str(tmp_path / "missing")) == {}


def test_read_scalars_survives_a_truncated_event_file(tmp_path):
  write_scalars(tmp_path, [1, 2, 3])
  (path,) = tmp_path.glob("events.out.tfevents.*")
  path.write_bytes(path.read_bytes()[:-7])  # Killed mid-write.
  steps, values = plots.read_scalars(str(tmp_path))["loss"]
  assert steps.tolist() == [1, 2, 3]
  np.testing.assert_allclose(values, [4.9, 4.8, 4.7], rtol=1e-6)
  assert plots.read_scalars(str(tmp_path))["images_per_second"][0].tolist() == [
      1, 2]


def test_plot_training_curves(tmp_path):
  with pytest.raises(ValueError, match="pretrain"):
    plots.plot_training_curves(str(tmp_path), str(tmp_path / "a.png"))
  write_scalars(tmp_path / "pretrain" / "train", [1, 2, 3], method="ce")
  out = plots.plot_training_curves(str(tmp_path), str(tmp_path / "p/c.png"))
  assert out == str(tmp_path / "p/c.png")
  assert_png(out)


def test_pca_keeps_the_geometry_of_planar_data():
  rng = np.random.RandomState(0)
  plane = rng.normal(size=[30, 2]) * [3.0, 1.0]
  rotation, _ = np.linalg.qr(rng.normal(size=[5, 5]))
  features = plane @ rotation[:2] + rng.normal(size=[5])
  points = plots.pca_2d(features)

  def distances(x):
    return np.linalg.norm(x[:, None] - x[None], axis=-1)

  np.testing.assert_allclose(distances(points), distances(plane), atol=1e-8)
  assert points[:, 0].var() > points[:, 1].var()
  assert plots.pca_2d(np.ones([4, 1])).shape == (4, 2)


def test_tsne_falls_back_to_pca_without_scikit_learn(monkeypatch):
  monkeypatch.setitem(sys.modules, "sklearn", None)  # Import fails.
  features = np.random.RandomState(0).normal(size=[12, 4])
  points, used = plots.project_2d(features, "tsne")
  assert used == "pca"
  np.testing.assert_allclose(points, plots.pca_2d(features), atol=1e-5)
  with pytest.raises(ValueError, match="umap"):
    plots.project_2d(features, "umap")


def test_plot_embeddings_and_robustness_write_pngs(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "sklearn", None)
  rng = np.random.RandomState(0)
  labels = np.arange(40) % 4
  features = rng.normal(size=[40, 8]) + labels[:, None]
  for method in ("pca", "tsne"):
    out = plots.plot_embeddings(
        features, labels, str(tmp_path / f"{method}.png"),
        class_names=list("abcd"), method=method)
    assert_png(out)
  with pytest.raises(ValueError, match="one label per row"):
    plots.plot_embeddings(features, labels[:3], str(tmp_path / "x.png"))

  result = {"clean_top1": 0.9, "severities": [1, 2],
            "top1": {"jpeg": [0.8, 0.7], "gaussian_noise": [0.6, 0.5]}}
  other = {**result, "top1": {"jpeg": [0.7, 0.6]}}
  out = plots.plot_robustness({"supcon": result, "ce": other},
                              str(tmp_path / "r.png"))
  assert_png(out)
  with pytest.raises(ValueError, match="clean_top1"):
    plots.plot_robustness({"x": {"top1": {}}}, str(tmp_path / "y.png"))


def test_compare_robustness_reads_every_workdir(tmp_path):
  results = {}
  for name, clean in (("supcon", 0.8), ("ce", 0.7)):
    os.makedirs(tmp_path / name)
    results[name] = {"clean_top1": clean, "severities": [1, 2],
                     "top1": {"jpeg": [clean - 0.1, clean - 0.2]},
                     "mean_corrupted_top1": clean - 0.15}
    with open(tmp_path / name / evaluation.ROBUSTNESS_FILE, "w") as f:
      json.dump(results[name], f)
  out = str(tmp_path / "compare.png")
  loaded = evaluation.compare_robustness(
      {name: str(tmp_path / name) for name in results}, out)
  assert loaded == results
  assert_png(out)
  table = evaluation.robustness_table(loaded).splitlines()
  assert table[0] == "| model | clean | jpeg | mean corrupted |"
  assert table[2] == "| supcon | 80.0 | 65.0 | 65.0 |"
  assert table[3] == "| ce | 70.0 | 55.0 | 55.0 |"
  with pytest.raises(ValueError, match="--mode=evaluate"):
    evaluation.compare_robustness({"x": str(tmp_path / "nothing")}, out)


# ----------------------------------------------------------------------------
# evaluate_workdir.

IMAGE = 8


def mock_cifar10(tmp_path, num_examples=20, num_train=20, num_test=10):
  return conftest.mock_tfds(tmp_path, "cifar10", num_examples, num_train,
                           num_test)


def test_evaluate_workdir_end_to_end(tmp_path):
  workdir = tmp_path / "run"
  write_scalars(workdir / "pretrain" / "train", [10, 20, 30])
  with open(workdir / "pretrain" / "config.json", "w") as f:
    json.dump({"method": "supcon"}, f)
  encoder = models.resnet(18, width=0.0625, input_shape=(IMAGE, IMAGE, 3))
  classifier = linear_eval.build_classifier(encoder, 10)
  data_config = config_lib.DataConfig(dataset="cifar10", image_size=IMAGE,
                                      validation_fraction=0.25)
  with mock_cifar10(tmp_path):
    result = evaluation.evaluate_workdir(
        str(workdir), encoder=encoder, classifier=classifier,
        data_config=data_config, config=config_lib.EvalConfig(
            max_examples=6, knn_train_examples=12, batch_size=4))
    # The same kNN classifier, computed from scratch on the same examples.
    train = data.eval_dataset(data_config, "train", batch_size=12).take(1)
    test = data.eval_dataset(data_config, "test", batch_size=6).take(1)
    expected_knn = evaluation.knn_accuracy(encoder, train, test, k=12,
                                           num_classes=10)
    images, labels = next(iter(test))
    plain = np.mean(np.argmax(classifier.predict(images, verbose=0), 1) ==
                    labels.numpy())

  assert result["knn_top1"] == pytest.approx(expected_knn)
  assert result["knn_k"] == 12 and result["knn_train_examples"] == 12
  assert result["test_examples"] == 6
  assert result["notes"] == []
  assert result["plots"] == ["plots/training_curves.png",
                             "plots/embeddings.png", "plots/robustness.png"]
  for path in result["plots"]:
    assert_png(os.path.join(workdir, path))
  robustness = result["robustness"]
  assert robustness["num_examples"] == 6
  assert robustness["clean_top1"] == pytest.approx(plain)
  assert set(robustness["top1"]) == set(evaluation.CORRUPTIONS)
  with open(workdir / "robustness.json") as f:
    assert json.load(f) == robustness
  assert json.loads(json.dumps(result)) == result


def test_evaluate_workdir_without_events_or_robustness(tmp_path):
  workdir = tmp_path / "bare"
  encoder = models.resnet(18, width=0.0625, input_shape=(IMAGE, IMAGE, 3))
  data_config = config_lib.DataConfig(dataset="cifar10", image_size=IMAGE,
                                      validation_fraction=0.0)
  with pytest.raises(ValueError, match="classifier"):
    evaluation.evaluate_workdir(str(workdir), encoder=encoder,
                                classifier=None, data_config=data_config)
  with mock_cifar10(tmp_path, num_examples=8, num_train=8, num_test=8):
    result = evaluation.evaluate_workdir(
        str(workdir), encoder=encoder, classifier=None,
        data_config=data_config, config=config_lib.EvalConfig(
            robustness=False, max_examples=5, batch_size=4))
  assert result["knn_k"] == 8 and result["test_examples"] == 5
  assert result["robustness"] is None
  assert result["plots"] == ["plots/embeddings.png"]
  assert len(result["notes"]) == 1 and "training_curves" in result["notes"][0]
  assert not os.path.exists(workdir / "robustness.json")
  assert_png(os.path.join(workdir, "plots", "embeddings.png"))



def test_top1_accuracy_counts_the_top_logit():
  # Logits that pick class (label + shift) % 3: all right at shift 0, none
  # at shift 1; the last batch is smaller.
  labels = np.array([0, 1, 2, 2, 1], np.int32)
  for shift, expected in ((0, 1.0), (1, 0.0)):
    logits = np.eye(3, dtype=np.float32)[(labels + shift) % 3]
    model = keras.Sequential([keras.Input((3,)), keras.layers.Identity()])
    dataset = tf.data.Dataset.from_tensor_slices((logits, labels)).batch(2)
    assert evaluation.top1_accuracy(model, dataset) == expected
  with pytest.raises(ValueError, match="empty"):
    evaluation.top1_accuracy(model, dataset.take(0))


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
