"""Tests of supcon_tf.knn: the weighted k-NN classifier and its accuracy."""

import sys

import numpy as np
import pytest
import tensorflow as tf

import conftest
from supcon_tf import knn


def test_knn_predict_weights_votes_by_similarity():
  # Test row (1, 0): neighbours of class 0 at cosine 1 and 0, class 1 at
  # 0.8. With k=2 the top two are class 0 (1.0) and class 1 (0.8); at
  # temperature 0.1 the weights are e^10 vs e^8, so class 0 wins; with k=1
  # only the class-0 neighbour votes.
  train = np.array([[1, 0], [0, 1], [0.8, 0.6]], np.float32)
  labels = np.array([0, 0, 1])
  test = np.array([[1, 0], [0.6, 0.8]], np.float32)
  assert knn.knn_predict(train, labels, test, k=2, temperature=0.1,
                                num_classes=2).tolist() == [0, 1]
  assert knn.knn_predict(train, labels, test, k=1, temperature=0.1,
                                num_classes=2).tolist() == [0, 1]
  # All three vote for (0.6, 0.8): similarities 0.6 (c0), 0.8 (c0), 0.96
  # (c1): e^6 + e^8 < e^9.6, so class 1.
  assert knn.knn_predict(train, labels, test[1:], k=3, temperature=0.1,
                                num_classes=2).tolist() == [1]
  with pytest.raises(ValueError, match="k must be"):
    knn.knn_predict(train, labels, test, k=0, temperature=0.1,
                           num_classes=2)


def batches(images, labels, batch=16):
  return tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch)


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
  predictions = knn.knn_predict(
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
    return knn.knn_predict(train, labels, test, k=k,
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
    knn.knn_predict(**arguments)


def test_embed_normalises_and_leaves_encoder_untouched():
  encoder = conftest.tiny_encoder()
  before = [np.array(w.numpy()) for w in encoder.weights]
  images, labels = conftest.colour_data(20, 3, 0)
  features, embedded_labels = knn.embed(encoder,
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
  encoder = conftest.tiny_encoder()
  train_images, train_labels = conftest.colour_data(64, 4, 0)
  test = batches(*conftest.colour_data(32, 4, 1))
  accuracy = knn.knn_accuracy(
      encoder, batches(train_images, train_labels), test, k=10,
      chunk_size=7)
  assert accuracy >= 0.95
  # Neighbours with scrambled labels carry no information.
  scrambled = np.random.RandomState(0).permutation(train_labels)
  chance = knn.knn_accuracy(
      encoder, batches(train_images, scrambled), test, k=10)
  assert chance < 0.7


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
