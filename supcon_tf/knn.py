"""Weighted k-nearest-neighbour accuracy of an encoder.

The weighted cosine k-NN classifier of InstDisc (Wu et al., 2018), also used
by SimCLR and MoCo to follow an encoder without training anything. Each test
embedding finds its `k` most similar training embeddings (cosine similarity
`s`); neighbour `i` votes for its label with weight `exp(s_i /
temperature)`, and the class with the largest summed weight wins.
"""

from typing import Optional, Tuple

import keras
import numpy as np
import tensorflow as tf

from supcon_tf import classifier as classifier_lib
from supcon_tf import config as config_lib

# Test rows per similarity block: the block is [chunk, num_train] floats.
DEFAULT_CHUNK_SIZE = 256


def embed(encoder: keras.Model, dataset: tf.data.Dataset
          ) -> Tuple[np.ndarray, np.ndarray]:
  """L2-normalised representations of every example of a dataset.

  Args:
    encoder: Keras model `[batch, H, W, C] -> [batch, dim]`, run batch by
      batch with `training=False` (its weights are not changed).
    dataset: finite dataset of `(images [batch, H, W, C], labels [batch])`.

  Returns:
    `(features [n, dim]` float32 with unit rows (all-zero rows stay zero),
    `labels [n]` int32), in dataset order.
  """
  features, labels = classifier_lib.extract_features(encoder, dataset)
  norms = np.linalg.norm(features, axis=1, keepdims=True)
  return (features / np.maximum(norms, 1e-12)).astype(np.float32), labels


def knn_predict(train_features, train_labels, test_features, *, k: int,
                temperature: float, num_classes: int,
                chunk_size: int = DEFAULT_CHUNK_SIZE) -> np.ndarray:
  """Weighted k-NN class predictions (InstDisc / SimCLR style).

  Similarities are dot products, i.e. cosine similarities for unit rows
  (see `embed`). They are computed for `chunk_size` test rows at a time, so
  memory stays at `[chunk_size, num_train]` whatever the test set size.

  Args:
    train_features: `[num_train, dim]` float, typically L2-normalised.
    train_labels: `[num_train]` int in `[0, num_classes)`.
    test_features: `[num_test, dim]` float, like `train_features`.
    k: neighbours per test row (clamped to `num_train`).
    temperature: > 0; neighbour weights are `exp(similarity / temperature)`.
    num_classes: number of classes.
    chunk_size: test rows per similarity block.

  Returns:
    `[num_test]` int32 predicted classes (ties: the lowest class index).

  Raises:
    ValueError: bad `k`, `temperature`, `num_classes`, `chunk_size`, labels
      out of range, or mismatched shapes.
  """
  train_features = np.asarray(train_features, np.float32)
  test_features = np.asarray(test_features, np.float32)
  train_labels = np.asarray(train_labels).reshape(-1)
  if k is None or k < 1:
    raise ValueError(f"k must be >= 1, got {k!r}.")
  config_lib.check_temperature(temperature)
  if num_classes is None or num_classes < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes!r}.")
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}.")
  if (train_features.ndim != 2 or test_features.ndim != 2 or
      train_features.shape[1] != test_features.shape[1] or
      len(train_labels) != len(train_features) or not len(train_labels)):
    raise ValueError(
        "Expected train_features [num_train, dim], train_labels [num_train] "
        "and test_features [num_test, dim] with num_train > 0; got shapes "
        f"{train_features.shape}, {train_labels.shape}, "
        f"{test_features.shape}.")
  if train_labels.min() < 0 or train_labels.max() >= num_classes:
    raise ValueError(
        f"train_labels span [{train_labels.min()}, {train_labels.max()}], "
        f"outside [0, num_classes={num_classes}); pass the right "
        "num_classes.")

  train = tf.constant(train_features)
  votes_of = tf.one_hot(train_labels, num_classes, dtype=tf.float32)
  k = min(int(k), len(train_labels))

  @tf.function(reduce_retracing=True)
  def predict_chunk(test):
    similarity = tf.matmul(test, train, transpose_b=True)
    top_similarity, top_index = tf.math.top_k(similarity, k=k)
    # Subtracting each row's largest similarity keeps exp finite at small
    # temperatures; it scales the row's votes by one constant (same argmax).
    weights = tf.exp((top_similarity - top_similarity[:, :1]) / temperature)
    votes = tf.reduce_sum(
        weights[:, :, None] * tf.gather(votes_of, top_index), axis=1)
    return tf.argmax(votes, axis=1, output_type=tf.int32)

  predictions = [
      predict_chunk(tf.constant(test_features[start:start + chunk_size]))
      .numpy() for start in range(0, len(test_features), chunk_size)]
  if not predictions:
    return np.zeros([0], np.int32)
  return np.concatenate(predictions)


def knn_accuracy(encoder: keras.Model, train_dataset: tf.data.Dataset,
                 test_dataset: tf.data.Dataset, *, k: int = 200,
                 temperature: float = 0.1,
                 num_classes: Optional[int] = None,
                 chunk_size: int = DEFAULT_CHUNK_SIZE) -> float:
  """Top-1 accuracy of the weighted cosine k-NN classifier.

  Args:
    encoder: Keras model `[batch, H, W, C] -> [batch, dim]` (run with
      `training=False`).
    train_dataset: finite dataset of `(images, labels)` batches: the
      neighbours (e.g. `data.eval_dataset(cfg, "train", ...)`).
    test_dataset: finite dataset of `(images, labels)` batches to classify.
    k: neighbours per test example (200 in InstDisc / SimCLR).
    temperature: weight temperature (0.1 in InstDisc).
    num_classes: default: the largest label seen + 1.
    chunk_size: test rows per similarity block (bounds memory).

  Returns:
    The share of test examples whose predicted class is their label.
  """
  train_features, train_labels = embed(encoder, train_dataset)
  test_features, test_labels = embed(encoder, test_dataset)
  if num_classes is None:
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
  predictions = knn_predict(train_features, train_labels, test_features,
                            k=k, temperature=temperature,
                            num_classes=num_classes, chunk_size=chunk_size)
  return float(np.mean(predictions == test_labels))
