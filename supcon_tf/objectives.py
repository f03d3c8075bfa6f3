"""What each pretraining method minimises, and the step both paths share.

`OBJECTIVES` maps every `config.METHODS` name to an `Objective`: the head it
trains, how many views of each sample it reads, its per-sample loss and the
health metrics it reports. `train_lib.Trainer` (the custom loop) looks its
method up here; `keras_model.SupConModel` looks up the objective of its
compiled loss with `for_loss`. Both normalise a replica's loss with
`replica_loss` and take their gradient step with `minimize`, so the global
normalisation, loss scaling and the cross-replica overflow check are written
once.

Every objective sees embeddings `[batch, V, dim]` from `models.embed_views`
and contrasts (or classifies) this replica's samples against the batch
gathered from every replica, so per-replica shares of the loss add up to the
global batch's.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import keras
import tensorflow as tf

from supcon_tf import config as config_lib
from supcon_tf import distributed
from supcon_tf import losses
from supcon_tf import models
from supcon_tf import npairs

CONTRASTIVE_METRICS = ("loss", "positives", "nn_top1")


def minimize(optimizer, compute_loss, variables):
  """One gradient step, as both training paths take it (replica context).

  Args:
    optimizer: a Keras optimizer, possibly a `LossScaleOptimizer` (its loss
      is scaled, and an overflow on any replica skips the step and halves
      the scale on all of them).
    compute_loss: callable with no arguments returning `(loss, aux)`: the
      scalar this replica differentiates and anything else to pass on.
      Called inside the gradient tape.
    variables: callable with no arguments returning the variables to update;
      called after `compute_loss`, whose forward pass may build layers (a
      Keras model is built on its first call in `fit`).

  Returns:
    `aux`.
  """
  with tf.GradientTape() as tape:
    loss, aux = compute_loss()
    scaled = optimizer.scale_loss(loss)
  variables = variables()
  gradients = tape.gradient(scaled, variables)
  if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
    # An overflow on any replica must skip the step on all of them.
    gradients = distributed.agree_on_finite(gradients)
  optimizer.apply_gradients(zip(gradients, variables))
  return aux


def replica_loss(per_sample, valid, *, weight=None, reduction="mean"):
  """This replica's share of a loss over the global batch (replica context).

  A local sum over a global normaliser: the replicas' shares add up to the
  loss of the global batch, so the gradients the optimizer sums across
  replicas are those of the same batch on one device.

  Args:
    per_sample: `[batch]` float32 losses of this replica's samples.
    valid: `[batch]` bool (or 0/1 float32): the samples that count.
    weight: None (sum `per_sample` as it is) or `[batch]` float32 weights
      of the local sum, zero for samples that do not count.
    reduction: `"mean"`: over the global number of valid samples;
      `"mean_with_sample_weight"`: over the global sum of `weight`; `"sum"`:
      the local sum.

  Returns:
    scalar float32.
  """
  total = tf.reduce_sum(per_sample if weight is None else per_sample * weight)
  if reduction == "sum":
    return total
  if reduction == "mean_with_sample_weight":
    return tf.math.divide_no_nan(
        total, distributed.all_reduce_sum(tf.reduce_sum(weight)))
  count = distributed.all_reduce_sum(
      tf.reduce_sum(tf.cast(valid, tf.float32)))
  return total / tf.maximum(count, 1.0)


def ce_head(num_classes: int) -> keras.layers.Dense:
  """Cross-entropy's softmax layer (float32 logits), as trained and restored."""
  return keras.layers.Dense(num_classes, dtype="float32", name="classifier")


class Objective:
  """One pretraining method.

  Attributes:
    name: the `config.METHODS` name.
    one_view: reads only the first view of each sample (else all of them).
    metric_names: what `terms` reports, `loss` first.
  """
  name = None
  one_view = False
  metric_names = CONTRASTIVE_METRICS

  def build_head(self, model_config: config_lib.ModelConfig,
                 num_classes: int, num_replicas: int = 1) -> keras.layers.Layer:
    """The layer on the encoder's representation: a projection head."""
    del num_classes
    return models.build_head(model_config, num_replicas)

  def num_views(self, available: int) -> int:
    """Views per sample this method trains on, of `available`."""
    return 1 if self.one_view else available

  def terms(self, outputs, labels, *, loss_config: config_lib.LossConfig,
            num_classes, memory=None):
    """Per-sample loss of this replica's samples.

    Args:
      outputs: `[batch, V, dim]` float32 head outputs (`V = num_views`).
      labels: `[batch]` int class ids.
      loss_config: the run's loss settings.
      num_classes: classes of the dataset (None when unknown).
      memory: a `memory.KeyMemory` whose queue joins the contrast, or None.

    Returns:
      `(per_sample [batch] float32, valid [batch] bool, metrics)`: samples
      that count in the global mean, and a dict of this replica's mean
      health metrics (`metric_names` without `loss`).
    """
    raise NotImplementedError


class SupCon(Objective):
  """`losses.supcon_terms` over the gathered global batch, with the memory
  queue when there is one; positives share labels."""
  name = "supcon"
  supervised = True

  def terms(self, outputs, labels, *, loss_config, num_classes, memory=None):
    del num_classes
    per_sample, valid = self.contrast(outputs, labels,
                                      dataclasses.asdict(loss_config), memory)
    return per_sample, valid, contrastive_health(
        outputs, labels, supervised=self.supervised)

  def contrast(self, outputs, labels, options, memory=None):
    """`(per_sample, valid)` of `losses.supcon_terms`, without metrics.

    Args:
      outputs: `[batch, V, dim]` float32 embeddings.
      labels: `[batch]` ids or `[batch, classes]` multi-hot (ignored
        without supervision).
      options: its settings, `LossConfig`'s fields (`SupConLoss.options()`).
      memory: as in `terms`.
    """
    return losses.supcon_terms(
        outputs, labels if self.supervised else None, gather=True, **options,
        **(memory.loss_kwargs() if memory is not None else {}))


class SimCLR(SupCon):
  """SupCon without labels: the other views of a sample are its positives."""
  name = "simclr"
  supervised = False


class NPairs(Objective):
  """The one-view N-pairs baseline over the gathered global batch."""
  name = "npairs"
  one_view = True

  def terms(self, outputs, labels, *, loss_config, num_classes, memory=None):
    del num_classes, memory
    per_sample = npairs.npairs_loss(
        outputs, labels, temperature=loss_config.temperature, gather=True)
    return (per_sample, tf.ones_like(per_sample, tf.bool),
            contrastive_health(outputs, labels))


class CrossEntropy(Objective):
  """Encoder + softmax classifier trained with cross-entropy (one view)."""
  name = "ce"
  one_view = True
  metric_names = ("loss", "accuracy")

  def build_head(self, model_config, num_classes, num_replicas=1):
    del model_config, num_replicas
    return ce_head(num_classes)

  def terms(self, outputs, labels, *, loss_config, num_classes, memory=None):
    del loss_config, memory
    logits = outputs[:, 0]
    # CPU kernels reject out-of-range labels but GPU ones return NaN, which
    # would surface as a "non-finite loss" with the cause hidden.
    in_range = tf.reduce_all((labels >= 0) & (labels < num_classes))
    check = tf.debugging.Assert(in_range, [
        f"method='ce' needs labels in [0, num_classes={num_classes}); "
        "got labels:", labels], summarize=16)
    with tf.control_dependencies([check]):
      labels = tf.identity(labels)
    per_sample = keras.losses.sparse_categorical_crossentropy(
        labels, logits, from_logits=True)
    accuracy = tf.reduce_mean(tf.cast(
        tf.equal(tf.argmax(logits, -1, output_type=labels.dtype), labels),
        tf.float32))
    return (per_sample, tf.ones_like(per_sample, tf.bool),
            {"accuracy": accuracy})


OBJECTIVES = {objective.name: objective for objective in (
    SupCon(), SimCLR(), NPairs(), CrossEntropy())}


def get(method: str) -> Objective:
  """The objective of `method`; ValueError naming the choices otherwise."""
  if method not in OBJECTIVES:
    raise ValueError(f"method={method!r} is not one of {list(OBJECTIVES)}.")
  return OBJECTIVES[method]


def for_loss(loss) -> Optional[SupCon]:
  """The objective of a compiled Keras loss: SupCon for a `SupConLoss`,
  SimCLR for a `SimCLRLoss` (its `method`), None for any other loss."""
  if isinstance(loss, losses.SupConLoss):
    return get(loss.method)
  return None


def contrastive_health(embeddings, labels, supervised=True):
  """Cheap signals that contrastive training is working (local batch).

  Args:
    embeddings: `[batch, views, dim]` float32, L2-normalised.
    labels: `[batch]` int.
    supervised: positives share labels (else: other views of the sample).

  Returns:
    `positives`: mean positives per anchor (views of the same sample and,
    if supervised, same-label samples, within the batch);
    `nn_top1`: share of first-view anchors whose nearest other embedding is
    a positive.
  """
  batch, views = tf.shape(embeddings)[0], embeddings.shape[1]
  sample_of_row = tf.repeat(tf.range(batch), views)
  ids = tf.gather(labels, sample_of_row) if supervised else sample_of_row
  anchor_ids = labels if supervised else tf.range(batch)
  rows = tf.reshape(embeddings, [batch * views, -1])
  similarity = tf.matmul(embeddings[:, 0], rows, transpose_b=True)
  self_column = tf.one_hot(tf.range(batch) * views, batch * views,
                           on_value=True, off_value=False)
  similarity = tf.where(self_column, similarity.dtype.min, similarity)
  nearest = tf.argmax(similarity, axis=1, output_type=tf.int32)
  same = tf.equal(anchor_ids[:, None], ids[None, :])
  return {
      "positives": tf.reduce_mean(tf.reduce_sum(
          tf.cast(same & ~self_column, tf.float32), 1)),
      "nn_top1": tf.reduce_mean(tf.cast(
          tf.equal(tf.gather(ids, nearest), anchor_ids), tf.float32)),
  }
