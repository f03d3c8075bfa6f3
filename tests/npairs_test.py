"""Tests for supcon_tf.npairs: the one-view N-pairs baseline loss."""

import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import conftest
from supcon_tf import losses
from supcon_tf import npairs as npairs_lib


def _normalised(rng, shape, dtype=np.float32):
  x = rng.normal(size=shape)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(dtype)


def _np(x):
  return np.asarray(x)


def _keras_inputs(seed=13, batch=6, views=2):
  rng = np.random.default_rng(seed)
  features = _normalised(rng, (batch, views, 8))
  labels = np.array([0, 1, 2, 0, 1, 2])[:batch]
  return rng, features, labels


def reference_npairs(features, labels, temperature=1.0):
  """Per-row cross-entropy against uniform same-label targets, float64."""
  feats = np.asarray(features, np.float64).reshape(len(labels), -1)
  labels = np.asarray(labels)
  out = np.zeros(len(labels))
  for i in range(len(labels)):
    logits = np.array([feats[i] @ feats[j] for j in range(len(labels))])
    logits /= temperature
    same = [j for j in range(len(labels)) if labels[j] == labels[i]]
    log_z = conftest.logsumexp(logits)
    out[i] = -np.mean([logits[j] - log_z for j in same])
  return out


@pytest.mark.parametrize("kwargs,expected", [
    (dict(features=np.zeros((4, 2, 3))), "(4, 2, 3)"),
    (dict(labels=np.zeros((4, 2))), "multi-hot"),
    (dict(temperature=0.0), "0.0"),
])
def test_npairs_bad_input_raises_value_error(kwargs, expected):
  args = dict(features=np.zeros((4, 3), np.float32), labels=np.zeros(4))
  args.update(kwargs)
  with pytest.raises(ValueError) as error:
    npairs_lib.npairs_loss(args.pop("features"), args.pop("labels"), **args)
  assert expected in str(error.value)


@pytest.mark.parametrize("shape", [(6, 8), (6, 1, 8)])
def test_npairs_keras_loss_is_mean_of_function(shape):
  _, features, labels = _keras_inputs(views=1)
  features = features.reshape(shape)
  want = np.mean(_np(npairs_lib.npairs_loss(features, labels, temperature=0.5)))
  np.testing.assert_allclose(
      float(npairs_lib.NPairsLoss(temperature=0.5)(labels, features)), want,
      rtol=1e-6)


@pytest.mark.parametrize("seed,batch,temperature", [
    (16, 1, 1.0), (17, 5, 1.0), (18, 12, 0.1), (19, 12, 0.5)])
def test_npairs_matches_reference(seed, batch, temperature):
  rng = np.random.default_rng(seed)
  features = _normalised(rng, (batch, 6))
  labels = rng.integers(0, 3, batch)
  got = npairs_lib.npairs_loss(features, labels, temperature=temperature)
  assert got.dtype == tf.float32
  np.testing.assert_allclose(
      _np(got), reference_npairs(features, labels, temperature), rtol=1e-5,
      atol=1e-6)
  np.testing.assert_allclose(
      _np(npairs_lib.npairs_loss(features[:, None], labels,
                             temperature=temperature)), _np(got), rtol=1e-6)


def test_npairs_gather_gives_the_global_batch_gradient():
  """2-replica loss shares and summed gradients equal one device's."""
  strategy = conftest.make_mirrored(2)
  rng = np.random.default_rng(21)
  batch, half = 10, 5
  features = _normalised(rng, (batch, 6))
  labels = rng.integers(0, 3, batch).astype(np.int32)
  kernel = rng.normal(size=(6, 6)).astype(np.float32)

  def shard(x):
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(x[ctx.replica_id_in_sync_group * half:
                                  (ctx.replica_id_in_sync_group + 1) * half]))

  with strategy.scope():
    weight = tf.Variable(kernel)

  def loss_of(x, y):
    # A weight shared by all rows, as in a model: its gradient sums rows.
    z = tf.math.l2_normalize(tf.matmul(x, weight), axis=-1)
    per_sample = npairs_lib.npairs_loss(z, y, temperature=0.5, gather=True)
    return tf.reduce_sum(per_sample) / batch

  @tf.function
  def step(x, y):
    def replica_fn(x, y):
      with tf.GradientTape() as tape:
        loss = loss_of(x, y)
      return loss, tape.gradient(loss, weight)
    return strategy.run(replica_fn, args=(x, y))

  shares, grads = step(shard(features), shard(labels))
  total = sum(float(t) for t in strategy.experimental_local_results(shares))
  grad = sum(g.numpy() for g in strategy.experimental_local_results(grads))

  one = tf.Variable(kernel)
  with tf.GradientTape() as tape:
    z = tf.math.l2_normalize(tf.matmul(tf.constant(features), one), axis=-1)
    want = tf.reduce_mean(npairs_lib.npairs_loss(z, labels, temperature=0.5))
  np.testing.assert_allclose(total, float(want), rtol=1e-5)
  np.testing.assert_allclose(grad, tape.gradient(want, one).numpy(),
                             rtol=1e-4, atol=1e-6)


def test_npairs_differs_from_supcon_with_one_view():
  rng = np.random.default_rng(20)
  features = _normalised(rng, (8, 6))
  labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
  npairs = _np(npairs_lib.npairs_loss(features, labels))
  supcon = _np(losses.supcon_loss(features[:, None], labels, temperature=1.0))
  assert np.all(np.isfinite(npairs))
  assert np.abs(npairs - supcon).max() > 1e-2


def test_two_samples_by_hand():
  # Orthogonal unit rows at temperature 1: logits [[1, 0], [0, 1]]. The
  # diagonal stays, so each row is its own positive.
  features = np.eye(2, dtype=np.float32)
  apart = _np(npairs_lib.npairs_loss(features, [0, 1]))
  np.testing.assert_allclose(apart, [np.log1p(np.exp(-1.0))] * 2, rtol=1e-6)
  # Same label: uniform targets over both columns, log(e + 1) - 1 / 2.
  together = _np(npairs_lib.npairs_loss(features, [4, 4]))
  np.testing.assert_allclose(together, [np.log(np.e + 1.0) - 0.5] * 2,
                             rtol=1e-6)


def test_gradient_matches_finite_differences_of_the_reference():
  rng = np.random.default_rng(22)
  features = _normalised(rng, (7, 5))
  labels = np.array([0, 1, 0, 2, 1, 0, 3])
  weights = rng.uniform(0.5, 1.5, 7)
  x = tf.constant(features)
  with tf.GradientTape() as tape:
    tape.watch(x)
    total = tf.reduce_sum(npairs_lib.npairs_loss(x, labels, temperature=0.3)
                          * weights.astype(np.float32))
  got = tape.gradient(total, x).numpy()
  want = np.zeros((7, 5))
  eps = 1e-6
  for index in np.ndindex(want.shape):
    plus, minus = (features.astype(np.float64) for _ in range(2))
    plus[index] += eps
    minus[index] -= eps
    want[index] = np.sum(weights * (reference_npairs(plus, labels, 0.3) -
                                    reference_npairs(minus, labels, 0.3))) / (
                                        2 * eps)
  np.testing.assert_allclose(got, want, rtol=1e-4,
                             atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("temperature", [float("nan"), None, -0.5])
def test_temperature_must_be_a_positive_number(temperature):
  with pytest.raises(ValueError, match="temperature must be > 0") as error:
    npairs_lib.npairs_loss(np.eye(3, dtype=np.float32), [0, 1, 2],
                           temperature=temperature)
  assert repr(temperature) in str(error.value)


def test_keras_loss_is_registered_for_saved_models():
  assert keras.saving.get_registered_name(npairs_lib.NPairsLoss) == (
      "supcon_tf>NPairsLoss")
  loss = keras.saving.deserialize_keras_object(
      keras.saving.serialize_keras_object(npairs_lib.NPairsLoss(0.2)))
  assert isinstance(loss, npairs_lib.NPairsLoss) and loss.temperature == 0.2


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
