"""The multi-class N-pairs loss: the one-view baseline SupCon is measured
against (the formulation of the original SupCon Keras example).
"""

import keras
import tensorflow as tf

from supcon_tf import config as config_lib
from supcon_tf import distributed
from supcon_tf import losses


def npairs_loss(features, labels, *, temperature=1.0, gather=False):
  """The multi-class N-pairs loss used by the original SupCon Keras notebook.

  One view per sample; the similarity matrix keeps its diagonal, so each
  sample is its own positive and appears in its own denominator (this is
  the formulation of `tfa.losses.npairs_loss` applied to
  `features @ features.T / temperature`, as in the keras.io example). Kept
  as a baseline to measure against `supcon_loss`.

  Args:
    features: `[batch, dim]` (or `[batch, 1, dim]`) embeddings, expected
      L2-normalised; computed in float32.
    labels: `[batch]` integer class ids.
    temperature: softmax temperature > 0.
    gather: inside a `tf.distribute` replica context, contrast the local
      rows against the global batch gathered from all replicas (gradients
      flow back through the gather), so each row's loss is its row of the
      global batch's loss. A no-op on one replica.

  Returns:
    `[batch]` float32 softmax cross-entropy of each row against the uniform
    distribution over the samples sharing its label (itself included), over
    the local batch or, with `gather`, the global one.
  """
  features = tf.convert_to_tensor(features)
  if features.shape.rank == 3 and features.shape[1] == 1:
    features = features[:, 0]
  if features.shape.rank != 2:
    raise ValueError("npairs_loss takes features [batch, dim] or "
                     f"[batch, 1, dim]; got shape {features.shape}.")
  config_lib.check_temperature(temperature)
  labels = losses.validate_labels(tf.convert_to_tensor(labels), features.shape[0],
                            features.shape)
  if labels.dtype == tf.bool:
    raise ValueError("npairs_loss takes [batch] class ids, not multi-hot.")
  features = tf.cast(features, tf.float32)
  contrast, contrast_labels = features, labels
  if gather:
    contrast = tf.ensure_shape(distributed.all_gather(features),
                               [None, features.shape[-1]])
    contrast_labels = distributed.all_gather(labels)
  logits = tf.matmul(features, contrast, transpose_b=True) / temperature
  targets = tf.cast(tf.equal(labels[:, None], contrast_labels[None, :]),
                    tf.float32)
  targets /= tf.reduce_sum(targets, 1, keepdims=True)
  return tf.nn.softmax_cross_entropy_with_logits(targets, logits)


@keras.saving.register_keras_serializable(package="supcon_tf")
class NPairsLoss(keras.losses.Loss):
  """Keras wrapper of `npairs_loss`: `y_true` ids `[batch]`, `y_pred`
  `[batch, dim]` or `[batch, 1, dim]`."""

  def __init__(self, temperature=1.0, reduction="sum_over_batch_size",
               name="npairs_loss", dtype=None):
    super().__init__(name=name, reduction=reduction, dtype=dtype)
    self.temperature = temperature

  def call(self, y_true, y_pred):
    return npairs_loss(y_pred, y_true, temperature=self.temperature)

  def get_config(self):
    return {**super().get_config(), "temperature": self.temperature}
