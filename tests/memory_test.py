"""Tests of supcon_tf.memory.KeyMemory on its own (no training step).

The training paths that use it (custom loop and `fit`, one device and
replicated) are tested in train_lib_test and keras_model_test.
"""

import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import conftest
from supcon_tf import memory
from supcon_tf import models

DIM = 4


def attached(size, momentum=0.0, strategy=None):
  strategy = strategy or tf.distribute.get_strategy()
  with strategy.scope():
    keras.utils.set_random_seed(0)
    encoder = keras.Sequential([keras.Input((3,)), keras.layers.Dense(5)])
    head = models.ProjectionHead(kind="linear", output_dim=DIM)
    head.build(encoder.output_shape)
    key_memory = memory.KeyMemory(size, momentum)
    key_memory.attach(encoder, head, DIM)
  return key_memory, encoder, head


def keys(n, first_label=0):
  rng = np.random.default_rng(first_label)
  return (tf.constant(rng.normal(size=(n, DIM)), tf.float32),
          tf.range(first_label, first_label + n, dtype=tf.int32))


def test_starts_empty_and_fills_first_in_first_out():
  key_memory, _, _ = attached(size=5)
  np.testing.assert_array_equal(key_memory.queue_labels.numpy(), [-1] * 5)
  first, first_labels = keys(3, first_label=10)
  key_memory.enqueue(first, first_labels)
  np.testing.assert_array_equal(key_memory.queue_labels.numpy(),
                                [10, 11, 12, -1, -1])
  second, second_labels = keys(3, first_label=20)
  key_memory.enqueue(second, second_labels)  # wraps onto the oldest row
  np.testing.assert_array_equal(key_memory.queue_labels.numpy(),
                                [22, 11, 12, 20, 21])
  np.testing.assert_allclose(key_memory.queue.numpy()[3:], second[:2])
  np.testing.assert_allclose(key_memory.queue.numpy()[0], second[2])
  assert int(key_memory.queue_pointer.numpy()) == 1
  kwargs = key_memory.loss_kwargs()
  assert set(kwargs) == {"queue_features", "queue_labels"}
  np.testing.assert_array_equal(kwargs["queue_labels"],
                                key_memory.queue_labels.numpy())


def test_more_keys_than_rows_is_refused():
  key_memory, _, _ = attached(size=2)
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match="queue_size=2 is smaller than one step's keys"):
    key_memory.enqueue(*keys(3))


def test_momentum_update_moves_key_weights_towards_the_online_ones():
  key_memory, encoder, head = attached(size=4, momentum=0.75)
  pairs = key_memory.key_pairs(encoder, head)
  for key, online in pairs:  # starts as a copy, not trained by optimizers
    np.testing.assert_array_equal(key.numpy(), online.numpy())
    assert not key.trainable
  before = [online.numpy() for _, online in pairs]
  for _, online in pairs:
    online.assign(online + 1.0)
  key_memory.momentum_update(encoder, head)
  for (key, online), old in zip(pairs, before):
    np.testing.assert_allclose(key.numpy(), 0.75 * old + 0.25 * (old + 1.0),
                               rtol=1e-6)


def test_keys_are_the_stopped_embeddings_without_a_key_encoder():
  key_memory, _, _ = attached(size=8)
  views = tf.zeros([2, 2, 3])  # [batch, views, features]: any shape
  embeddings = tf.reshape(tf.range(16, dtype=tf.float32), [2, 2, DIM])
  got, labels = key_memory.keys(views, tf.constant([7, 9]), embeddings)
  np.testing.assert_array_equal(got, tf.reshape(embeddings, [4, DIM]))
  np.testing.assert_array_equal(labels, [7, 7, 9, 9])  # sample-major
  _, no_labels = key_memory.keys(views, None, embeddings)
  np.testing.assert_array_equal(no_labels, [0, 0, 0, 0])


def test_replica_context_writes_replica_zeros_keys_to_every_copy():
  strategy = conftest.make_mirrored(2)
  key_memory, _, _ = attached(size=4, strategy=strategy)

  @tf.function
  def step():
    def replica_fn():
      context = tf.distribute.get_replica_context()
      # Differs per replica: only replica 0's value may be written.
      offset = tf.cast(context.replica_id_in_sync_group, tf.float32)
      key_memory.enqueue(tf.ones([2, DIM]) * (1.0 + offset),
                         tf.constant([3, 4]))
    strategy.run(replica_fn)

  step()
  for copy in strategy.experimental_local_results(key_memory.queue.value):
    np.testing.assert_array_equal(copy.numpy()[:2], np.ones([2, DIM]))
  for copy in strategy.experimental_local_results(
      key_memory.queue_labels.value):
    np.testing.assert_array_equal(copy.numpy(), [3, 4, -1, -1])


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
