"""A `keras.Model` that trains SupCon with `compile()` / `fit()`.

`SupConModel` wraps an encoder and a projection head. Compiled with a
`supcon_tf.SupConLoss` (or `SimCLRLoss`), its `train_step` computes the loss
exactly as the custom loop of `supcon_tf.train_lib` does: each replica's
anchors are contrasted against the batch gathered from every replica, and
each replica's loss is its local sum divided by the global count of valid
samples, so the gradients Keras sums across replicas equal the gradient of
the same global batch on one device.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from supcon_tf import config as config_lib
from supcon_tf import distributed
from supcon_tf import memory as memory_lib
from supcon_tf import models
from supcon_tf import objectives

# Reductions of a compiled SupConLoss that SupConModel reproduces globally.
_MEAN_REDUCTIONS = ("sum_over_batch_size", "mean")
_REDUCTIONS = _MEAN_REDUCTIONS + ("mean_with_sample_weight", "sum")


@keras.saving.register_keras_serializable(package="supcon_tf")
class SupConModel(keras.Model):
  """Encoder + projection head whose `fit` contrasts the global batch.

  Views layout: the model takes `views [batch, V, H, W, C]` (or `[batch, H,
  W, C]`, read as `V = 1`) and returns float32 embeddings `y_pred [batch, V,
  dim]`, where `y_pred[i, v]` is view `v` of sample `i`. All `batch * V`
  images go through the encoder as one batch, so batch normalisation sees
  every view.

  Training data are `(views, labels)` or `(views, labels, sample_weight)`
  with `labels [batch]` class ids (or `[batch, classes]` multi-hot) and
  `sample_weight [batch]`, one weight per sample.

  Loss: when the compiled loss is a `SupConLoss` (or `SimCLRLoss`, which
  ignores the labels), the loss is computed with `supcon_terms(...,
  gather=True)` using the compiled loss's settings: under a
  `tf.distribute` strategy every replica contrasts its local anchors against
  the global batch, and the loss is normalised by global counts. Its
  reduction is honoured over the global batch: `"sum_over_batch_size"` /
  `"mean"` divide the weighted sum by the global number of samples that
  have a positive, `"mean_with_sample_weight"` by the global sum of their
  weights, `"sum"` not at all (`compile(loss_weights=...)` is not applied).
  The reported `loss` is the global value, the same as on one device. Any
  other compiled loss goes through Keras's `compute_loss` on `(labels,
  y_pred)` unchanged. For replicated training to match one device exactly,
  the encoder also needs synchronised batch norm
  (`supcon_tf.models.resnet(..., sync_batch_norm=True)` or
  `build_encoder(..., num_replicas=R)`).

  `SupConLoss` also works with `compile()` on ANY Keras model whose output
  is `[batch, views, dim]` laid out as above, through the ordinary Keras
  loss path; such a model contrasts each replica's local batch only. Only
  `SupConModel` gathers across replicas.

  Memory queue (`queue_size > 0`): every step's embeddings (or, with
  `key_encoder_momentum > 0`, a momentum key encoder's) are gathered from
  all replicas and written to a FIFO queue of `queue_size` rows after the
  optimizer step; later steps contrast every anchor against the queue too
  (`supcon_terms(queue_features=...)`), exactly as the custom loop does with
  `--queue_size` (`supcon_tf.memory.KeyMemory`; it is saved with the
  model). Needs a compiled `SupConLoss` / `SimCLRLoss`.

  Mixed precision: build the model under a mixed global policy;
  `compile()` wraps the optimizer in a `LossScaleOptimizer` for
  `mixed_float16`, and the loss is computed in float32. A non-finite
  gradient on any replica skips the step (and halves the loss scale) on
  every replica.

  Args:
    encoder: Keras model mapping images `[batch, H, W, C]` to
      representations `[batch, rep_dim]`.
    head: layer mapping `[batch, rep_dim]` to embeddings `[batch, dim]`,
      normally a `supcon_tf.models.ProjectionHead` (L2-normalised output).
    queue_size: rows K of the memory queue (one per view); 0 = none. Must
      hold one step's keys, global batch x views.
    key_encoder_momentum: 0 = queue keys are the online embeddings under
      stop-gradient (XBM); m in (0, 1) = keys from a moving-average copy of
      encoder + head updated `key <- m key + (1 - m) online` (MoCo).
    **kwargs: base `keras.Model` arguments (`name`, ...).

  Example:

  ```python
  strategy = tf.distribute.MirroredStrategy()
  with strategy.scope():
    model = SupConModel(
        models.resnet(50, sync_batch_norm=True),
        models.ProjectionHead(output_dim=128))
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                  loss=supcon_tf.SupConLoss(temperature=0.1))
  model.fit(dataset)  # (views [b, 2, 32, 32, 3], labels [b]) batches
  ```
  """

  def __init__(self, encoder, head, queue_size: int = 0,
               key_encoder_momentum: float = 0.0, **kwargs):
    super().__init__(**kwargs)
    config_lib.check_queue(queue_size, key_encoder_momentum)
    self.encoder = encoder
    self.head = head
    self.queue_size = queue_size
    self.key_encoder_momentum = float(key_encoder_momentum)
    self.memory = None  # memory.KeyMemory, built with the head

  def build(self, input_shape):
    """Builds the head on the encoder's output shape.

    Args:
      input_shape: `(batch, V, H, W, C)` or `(batch, H, W, C)`.
    """
    image_shape = (None,) + tuple(input_shape)[-3:]
    if not self.encoder.built:
      self.encoder.build(image_shape)
    representation_shape = self.encoder.compute_output_shape(image_shape)
    if not self.head.built:
      self.head.build(representation_shape)
    if self.queue_size and self.memory is None:
      self.memory = memory_lib.KeyMemory(self.queue_size,
                                         self.key_encoder_momentum)
      dim = self.head.compute_output_spec(
          keras.KerasTensor(representation_shape)).shape[-1]
      self.memory.attach(self.encoder, self.head, dim)

  def call(self, views, training=None):
    """Embeds every view.

    Args:
      views: `[batch, V, H, W, C]` or `[batch, H, W, C]` images.
      training: passed to the encoder and head (batch-norm mode).

    Returns:
      float32 embeddings `[batch, V, dim]` (`V = 1` for rank-4 input).
    """
    return models.embed_views(self.encoder, self.head, _as_views(views),
                              training=training)

  def train_step(self, data):
    def compute_loss():
      loss, logs, embeddings = self._loss_and_metrics(data, training=True)
      return loss, (logs, embeddings)

    def step():
      logs, embeddings = objectives.minimize(
          self.optimizer, compute_loss, lambda: self.trainable_variables)
      if self.memory is None:
        return logs, None
      x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
      return logs, self.memory.keys(_as_views(x), y, embeddings)

    # The custom loop's order: key encoder, step, then enqueue.
    return memory_lib.train_step(self.memory, self.encoder, self.head, step)

  def test_step(self, data):
    _, logs, _ = self._loss_and_metrics(data, training=False)
    return logs

  def _loss_and_metrics(self, data, training):
    """This replica's loss for the gradient, and the updated metrics.

    Args:
      data: `(views, labels)` or `(views, labels, sample_weight)`.
      training: forward mode.

    Returns:
      `(loss, logs, y_pred)`: scalar float32 whose sum over replicas is the
      global loss, the dict of metric results (`loss` = global loss), and
      the embeddings `[batch, V, dim]`.
    """
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    y_pred = self(x, training=training)
    loss_fn = getattr(self, "loss", None)
    objective = objectives.for_loss(loss_fn)
    if objective is not None:
      loss = self._contrastive_loss(objective, loss_fn, y, y_pred,
                                    sample_weight)
      extra = [tf.cast(tf.reduce_sum(l), tf.float32) for l in self.losses]
      if extra:
        # Identical on every replica; the replicas' shares add up to one.
        loss += tf.add_n(extra) / float(distributed.num_replicas())
      reported = distributed.all_reduce_sum(loss)
    else:
      if self.memory is not None:
        raise ValueError(
            f"queue_size={self.queue_size} needs a compiled "
            f"supcon_tf.SupConLoss or SimCLRLoss; got loss={loss_fn!r}.")
      # Keras divides compiled losses by the replica count; undo it for
      # the metric as Keras's own train_step does.
      loss = self._compute_loss(x=x, y=y, y_pred=y_pred,
                                sample_weight=sample_weight,
                                training=training)
      reported = loss * float(distributed.num_replicas())
    local_batch = tf.shape(y_pred)[0]
    for metric in self.metrics:
      if metric.name == "loss":
        # Every replica reports the global value, so any weights average
        # to it; batch sizes weight the epoch average.
        metric.update_state(reported, sample_weight=local_batch)
    return loss, self.compute_metrics(x, y, y_pred,
                                      sample_weight=sample_weight), y_pred

  def _contrastive_loss(self, objective, loss_fn, labels, embeddings,
                        sample_weight):
    """SupCon over the global batch; this replica's share of its reduction.

    Args:
      objective: `objectives.for_loss(loss_fn)`.
      loss_fn: the compiled `SupConLoss` (its settings and reduction).
      labels: `[batch]` ids, `[batch, classes]` multi-hot, or None.
      embeddings: `[batch, V, dim]` float32.
      sample_weight: None or `[batch]` (or `[batch, 1]`).

    Returns:
      scalar float32: local weighted sum over the global normaliser.
    """
    if loss_fn.reduction not in _REDUCTIONS:
      raise ValueError(
          f"SupConModel trains with a SupConLoss reduction in "
          f"{list(_REDUCTIONS)}; got reduction={loss_fn.reduction!r}. Use "
          "'sum_over_batch_size' (the default).")
    per_sample, valid = objective.contrast(embeddings, labels,
                                           loss_fn.options(), self.memory)
    valid = tf.cast(valid, tf.float32)
    weight = valid
    if sample_weight is not None:
      sample_weight = tf.cast(sample_weight, tf.float32)
      if sample_weight.shape.rank == 2 and sample_weight.shape[1] == 1:
        sample_weight = sample_weight[:, 0]
      if sample_weight.shape.rank != 1:
        raise ValueError(
            "SupConModel takes one weight per sample, sample_weight "
            f"[batch]; got shape {sample_weight.shape}.")
      weight = valid * sample_weight
    reduction = ("mean" if loss_fn.reduction in _MEAN_REDUCTIONS else
                 loss_fn.reduction)
    return objectives.replica_loss(per_sample, valid, weight=weight,
                                   reduction=reduction)

  def get_config(self):
    config = super().get_config()
    config.update({
        "encoder": keras.saving.serialize_keras_object(self.encoder),
        "head": keras.saving.serialize_keras_object(self.head),
        "queue_size": self.queue_size,
        "key_encoder_momentum": self.key_encoder_momentum,
    })
    return config

  @classmethod
  def from_config(cls, config, custom_objects=None):
    config = dict(config)
    encoder = keras.saving.deserialize_keras_object(
        config.pop("encoder"), custom_objects=custom_objects)
    head = keras.saving.deserialize_keras_object(
        config.pop("head"), custom_objects=custom_objects)
    return cls(encoder, head, **config)


def _as_views(views):
  """`[batch, V, H, W, C]` views (rank-4 images read as `V = 1`)."""
  views = tf.convert_to_tensor(views)
  if views.shape.rank == 4:
    views = views[:, None]
  if views.shape.rank != 5 or views.shape[1] is None:
    raise ValueError(
        "SupConModel takes views [batch, V, H, W, C] with a known V, or "
        f"images [batch, H, W, C]; got shape {views.shape}. Stack the "
        "views with tf.stack(views, axis=1).")
  return views
