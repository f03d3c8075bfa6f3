"""A memory of past keys, so that small batches see many contrasts.

`KeyMemory` is a FIFO queue of `[size, dim]` keys with their labels (-1 =
an empty slot, ignored by the loss) and, optionally, a momentum key encoder:
an exponential moving average copy of encoder + head (MoCo). Without one the
keys are the online embeddings under stop-gradient (cross-batch memory,
XBM). The custom loop (`train_lib.Trainer`) and `model.fit`
(`keras_model.SupConModel`) run the same four calls per step, both through
`train_step`:

```python
memory.momentum_update(encoder, head)       # before the forward pass
loss = supcon_terms(..., **memory.loss_kwargs())
keys, key_labels = memory.keys(views, labels, embeddings)  # replica context
memory.enqueue(keys, key_labels)            # after the optimizer step
```

Under a `tf.distribute` strategy the keys of **all** replicas are gathered
in replica order, and replica 0's copy is written to every device, so every
replica holds the identical queue. The key encoder has the online encoder's
batch norm (synchronised when replicated): its statistics are those of the
global batch. MoCo's shuffle-BN hides a query's own key from its batch
statistics; here a step's keys are only contrasted in later steps, so there
is nothing to hide.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from supcon_tf import config as config_lib
from supcon_tf import distributed
from supcon_tf import models


@keras.saving.register_keras_serializable(package="supcon_tf")
class KeyMemory(keras.layers.Layer):
  """FIFO queue of past keys and the optional momentum key encoder.

  Not called as a layer: `attach` creates its state for an encoder + head,
  and the methods below run one step's share. Its weights (queue, labels,
  write pointer, key encoder) are saved with the model that holds it; the
  key encoder's weights are non-trainable (the moving average, not the
  optimizer, moves them) while its batch norm still runs in training mode.

  Args:
    size: rows K of the queue (one row per view of a sample).
    momentum: m in [0, 1): 0 = keys are the online embeddings (XBM); else
      the key weights follow `key <- m * key + (1 - m) * online` (MoCo).
  """

  def __init__(self, size: int, momentum: float = 0.0, **kwargs):
    super().__init__(**kwargs)
    config_lib.check_queue(size, momentum)
    if not size:
      raise ValueError("KeyMemory needs size > 0; build none for size 0.")
    self.size = size
    self.momentum = float(momentum)
    self.key_encoder = self.key_head = None

  def attach(self, encoder: keras.Model, head: keras.layers.Layer,
             dim: int) -> None:
    """Creates the queue `[size, dim]` and, with momentum, the key encoder.

    Call under the strategy scope that holds `encoder` and `head`, once
    both are built; the key encoder starts as their copy.
    """
    # Replica 0's value wins a write in replica context; cross-replica
    # writes give every device the same value.
    state = dict(trainable=False, autocast=False,
                 aggregation="only_first_replica")
    self.queue = self.add_weight(shape=(self.size, dim), initializer="zeros",
                                 name="queue", **state)
    self.queue_labels = self.add_weight(
        shape=(self.size,), dtype="int32",
        initializer=keras.initializers.Constant(-1), name="queue_labels",
        **state)
    self.queue_pointer = self.add_weight(shape=(), dtype="int32",
                                         initializer="zeros",
                                         name="queue_pointer", **state)
    if self.momentum:
      self.key_encoder = keras.models.clone_model(encoder)
      self.key_head = keras.saving.deserialize_keras_object(
          keras.saving.serialize_keras_object(head))
      if not self.key_head.built:  # a built head's config rebuilds it
        self.key_head.build(encoder.output_shape)
      for key, online in self.key_pairs(encoder, head):
        key.assign(online)
        key.trainable = False  # the layers stay trainable: BN in train mode
    self.built = True

  def key_pairs(self, encoder, head):
    """`(key, online)` variable pairs of encoder + head, all weights."""
    return list(zip(self.key_encoder.weights + self.key_head.weights,
                    encoder.weights + head.weights))

  def checkpoint_items(self) -> dict:
    """Its state for `tf.train.Checkpoint`, under flat names (`queue/`, ...)."""
    items = dict(queue=self.queue, queue_labels=self.queue_labels,
                 queue_pointer=self.queue_pointer)
    if self.key_encoder is not None:
      items.update(key_encoder=self.key_encoder, key_head=self.key_head)
    return items

  def loss_kwargs(self) -> dict:
    """The queue arguments of `losses.supcon_terms`."""
    return dict(queue_features=tf.convert_to_tensor(self.queue),
                queue_labels=tf.convert_to_tensor(self.queue_labels))

  def momentum_update(self, encoder, head, strategy=None) -> None:
    """key <- m key + (1 - m) online, for the online trainable weights.

    Batch-norm statistics are not averaged: the key encoder's own forward
    passes (training mode) move them. A no-op without a key encoder.

    Args:
      encoder, head: the online networks `attach` copied.
      strategy: the strategy, when called in its cross-replica context;
        None in replica context (inside `strategy.run` or `fit`).
    """
    if self.key_encoder is None:
      return
    m = self.momentum

    def update(strategy):
      for key, online in self.key_pairs(encoder, head):
        if online.trainable:
          # The tf.Variables under the Keras ones (mirrored when replicated).
          strategy.extended.update(
              key.value, lambda k, w: k.assign(m * k + (1.0 - m) * w),
              args=(online.value,), group=False)

    _in_cross_replica_context(strategy, update)

  def keys(self, views, labels, embeddings):
    """This step's global keys, in replica context (after the optimizer step).

    Args:
      views: `[batch, V, H, W, C]` this replica's views.
      labels: `[batch]` int, or None (no labels: keys get label 0, which a
        loss without labels ignores).
      embeddings: `[batch, V, dim]` online embeddings of `views`.

    Returns:
      `(keys [global_batch * V, dim] float32, labels [global_batch * V]
      int32)`, sample-major (the views of sample i, then of i + 1) and in
      replica order, identical on every replica.
    """
    num_views = views.shape[1]
    if self.key_encoder is not None:
      embeddings = models.embed_views(self.key_encoder, self.key_head, views,
                                      training=True)
    keys = tf.reshape(tf.cast(tf.stop_gradient(embeddings), tf.float32),
                      [-1, self.queue.shape[1]])
    if labels is None:
      labels = tf.zeros(tf.shape(views)[:1], tf.int32)
    key_labels = tf.repeat(tf.cast(labels, tf.int32), num_views)
    return distributed.all_gather(keys), distributed.all_gather(key_labels)

  def enqueue(self, keys, key_labels, strategy=None) -> None:
    """Writes `keys` and their labels FIFO at the pointer.

    Args:
      keys: `[n, dim]` from `keys()` (per-replica values in cross-replica
        context: replica 0's copy is written, all copies are equal).
      key_labels: `[n]` int32.
      strategy: as in `momentum_update`.
    """
    def write(strategy, keys, key_labels):
      keys = strategy.experimental_local_results(keys)[0]
      key_labels = strategy.experimental_local_results(key_labels)[0]
      n = tf.shape(keys)[0]
      check = tf.debugging.assert_less_equal(
          n, self.size, message=(
              f"queue_size={self.size} is smaller than one step's keys "
              "(global batch x views); use a larger queue."))
      with tf.control_dependencies([check]):
        slots = (self.queue_pointer + tf.range(n)) % self.size
      self.queue.value.scatter_update(tf.IndexedSlices(keys, slots))
      self.queue_labels.value.scatter_update(
          tf.IndexedSlices(key_labels, slots))
      self.queue_pointer.assign((self.queue_pointer + n) % self.size)

    _in_cross_replica_context(strategy, write, keys, key_labels)

  def get_config(self):
    config = super().get_config()
    config.update(size=self.size, momentum=self.momentum)
    return config


def train_step(memory: KeyMemory | None, encoder, head, step,
               strategy=None):
  """One training step with the memory's calls around it, in their order.

  Args:
    memory: a `KeyMemory`, or None (then only `step()`).
    encoder, head: the online networks.
    step: callable with no arguments that takes the optimizer step (the
      forward pass contrasting against `memory.loss_kwargs()`) and returns
      `(results, keys)`: anything to pass on, and `memory.keys(...)` of this
      step (None without a memory); per-replica values of them when called
      in cross-replica context.
    strategy: as in `KeyMemory.momentum_update`.

  Returns:
    `results`.
  """
  if memory is None:
    return step()[0]
  memory.momentum_update(encoder, head, strategy)
  results, keys = step()
  memory.enqueue(*keys, strategy=strategy)
  return results


def _in_cross_replica_context(strategy, fn, *args):
  """`fn(strategy, *args)`, from replica context when `strategy` is None."""
  if strategy is not None:
    return fn(strategy, *args)
  return tf.distribute.get_replica_context().merge_call(fn, args=args)
