"""The supervised contrastive loss (Khosla et al., NeurIPS 2020).

One function computes every variant; the variants are arguments. Notation:
a sample has `views` augmented views; each view fed as an anchor is
contrasted against every view of every sample in the contrast set except
itself. Its positives are the other views of its own sample and every view of
samples that share its label; the rest are negatives.

For one anchor `a` with positives `P(a)`, logits `s = <z_a, z_c> / tau`:

  summation="out" (L_out, paper eq. 2):  -1/|P| sum_p log(exp(s_p) / D_p)
  summation="in"  (L_in,  paper eq. 3):  -log(1/|P| sum_p exp(s_p) / D_p)

  denominator="all":             D_p = sum over positives and negatives
  denominator="one_positive":    D_p = exp(s_p) + sum over negatives
  denominator="only_negatives":  D_p = sum over negatives

and the result is multiplied by `tau` when `scale_by_temperature` (paper
section 3, keeps gradient magnitudes independent of tau).

`supcon_terms` validates the arguments and computes on whole matrices
(`supcon_tf.dense`) or in blocks of anchor rows (`supcon_tf.blockwise`);
`SupConLoss` / `SimCLRLoss` are its Keras losses. Their settings are the
fields of `config.LossConfig`, which the custom training loop takes, and
the mode choices are `config`'s. The N-pairs baseline is in
`supcon_tf.npairs`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf
import keras

from supcon_tf import blockwise
from supcon_tf import config as config_lib
from supcon_tf import dense as dense_lib
from supcon_tf import distributed

# The choices `config.LossConfig` checks, under this module's names too.
CONTRAST_MODES = config_lib.CONTRAST_MODES
SUMMATIONS = config_lib.SUMMATIONS
DENOMINATORS = config_lib.DENOMINATORS


def supcon_loss(features, labels=None, *, mask=None, temperature=0.1,
                contrast_mode="all", summation="out", denominator="all",
                positives_cap=None, scale_by_temperature=True,
                gather=False, block_size=None, queue_features=None,
                queue_labels=None):
  """Per-sample supervised contrastive loss.

  Args:
    features: `[batch, views, dim]` embeddings, `views >= 1`, any float
      dtype. They are expected to be L2-normalised along `dim` (a projection
      head's output); nothing is normalised here. The loss is computed in
      float32 and is stable for small temperatures and unnormalised inputs
      (log-sum-exp with the row maximum subtracted).
    labels: optional class ids `[batch]` (or `[batch, 1]`), integer or
      integral float, >= 0; or multi-hot `[batch, classes]` of 0/1, in which
      case two samples are positives when they share at least one label and
      negatives when they share none (a sample with no label has only its own
      views as positives).
    mask: optional explicit `[batch, batch]` positives (nonzero = positive);
      with `gather=True` it is `[batch, global_batch]`. Its diagonal is
      ignored: a sample's own other views are always positives. Give at most
      one of `labels` and `mask`; with neither, every sample is its own class
      (SimCLR / instance discrimination).
    temperature: softmax temperature `tau > 0`.
    contrast_mode: `"all"` (every view is an anchor) or `"one"` (only the
      first view is).
    summation: `"out"` (L_out, the paper's choice) or `"in"` (L_in).
    denominator: `"all"`, `"one_positive"` or `"only_negatives"` (see module
      docstring).
    positives_cap: keep at most this many positive *views* per anchor besides
      the anchor's own augmentations, chosen in batch order; must be a
      multiple of `views`. Positives dropped by the cap leave the
      denominator too (paper Supp. Table 5). `None` = no cap.
    scale_by_temperature: multiply the loss by `temperature`.
    gather: inside a `tf.distribute` replica context, contrast the local
      anchors against the global batch gathered from all replicas (gradients
      flow back through the gather). A no-op on one replica.
    block_size: how the `[anchor_rows, contrast_rows]` logits are computed.
      `None` (automatic): in blocks when there are more than
      `blockwise.AUTO_MIN_LOGITS` (1024 * 1024) of them and `labels` are
      class ids or absent, densely otherwise. `0`: always densely. A
      positive int: in blocks of that many anchor rows (rounded down to whole
      samples), which needs class ids or no labels. The block path gives the
      same values and gradients with O(block_size * contrast_rows) memory
      instead of several O(rows^2) matrices (`supcon_tf.blockwise`); it is
      not differentiable twice.
    queue_features: optional `[K, dim]` extra contrast rows (a memory queue
      of past keys, MoCo / XBM), one view each, expected L2-normalised. They
      join every anchor's contrast set and receive no gradient
      (`tf.stop_gradient`); they are never anchors. Not gathered: under
      `gather=True` the queue is the same on every replica.
    queue_labels: `[K]` integer class ids of the queue rows, required with
      `queue_features`; `-1` marks an empty slot, which is ignored entirely
      (neither positive nor negative). A valid row whose label equals the
      anchor's label is a positive, any other a negative; with
      `labels=None` every valid row is a negative. `positives_cap` counts
      queue positives after the batch's: the batch's positive samples are
      kept first (whole samples, in batch order), then queue positives in
      slot order until `positives_cap` views are kept; capped-away queue
      positives leave the denominator too. A queue needs `[batch]` class
      ids or no labels (not multi-hot labels nor a mask).

  Returns:
    `[batch]` float32: for each sample, the mean loss over its anchor views
    that have at least one positive. Policy for anchors without a positive
    (possible only with one view, or `contrast_mode="one"` and one view, or an
    explicit mask): they are left out of the mean; a sample none of whose
    anchors has a positive gets loss 0 and gradient 0. Use
    `supcon_terms` (or `SupConLoss`, which masks them) to average over the
    valid samples only, so such samples do not drag the batch mean down. With
    `denominator="only_negatives"`, an anchor with no negative is treated the
    same way.

  Raises:
    ValueError: naming the received value, for a features rank other than 3,
      `views < 1`, unknown batch or views dimension, labels or mask whose
      shape does not match the batch, negative or non-integer labels,
      multi-hot labels other than 0/1, both labels and mask, a temperature
      <= 0, an unknown mode string, or a cap that is negative or not a
      multiple of `views`, a block_size that is not None or an int >= 0, or
      a positive block_size with multi-hot labels or a mask; queue_features
      without queue_labels (or the reverse), a queue whose width is not
      `dim`, queue_labels whose length is not `K` or that are < -1 or not
      integral, a queue with multi-hot labels or a mask.
  """
  loss, _ = supcon_terms(
      features, labels, mask=mask, temperature=temperature,
      contrast_mode=contrast_mode, summation=summation,
      denominator=denominator, positives_cap=positives_cap,
      scale_by_temperature=scale_by_temperature, gather=gather,
      block_size=block_size, queue_features=queue_features,
      queue_labels=queue_labels)
  return loss


def supcon_terms(features, labels=None, *, mask=None, temperature=0.1,
                 contrast_mode="all", summation="out", denominator="all",
                 positives_cap=None, scale_by_temperature=True, gather=False,
                 block_size=None, queue_features=None, queue_labels=None):
  """`supcon_loss` and, per sample, whether any of its anchors counted.

  Arguments as `supcon_loss`.

  Returns:
    `(loss, valid)`: `[batch]` float32 and `[batch]` bool. The batch loss
    that is not dragged down by samples without positives is
    `sum(loss) / max(count_nonzero(valid), 1)` (summed over replicas when
    gathering).
  """
  features, labels, mask, views = _validate(
      features, labels, mask, temperature, contrast_mode, summation,
      denominator, positives_cap)
  _validate_block_size(block_size, labels, mask)
  queue = _validate_queue(queue_features, queue_labels, labels, mask,
                          features.shape)
  batch = tf.shape(features)[0]
  contrast = features
  offset = tf.constant(0, tf.int32)
  if gather:
    # The gather loses static shapes; views and dim are the same everywhere.
    contrast = tf.ensure_shape(distributed.all_gather(features),
                               [None] + features.shape[1:])
    offset = distributed.replica_offset(batch)
    if labels is not None:
      labels = distributed.all_gather(labels)
  if mask is not None:
    _check(tf.equal(tf.shape(mask)[1], tf.shape(contrast)[0]),
           f"mask must have shape [batch, batch] (or [batch, global_batch] "
           f"when gathering) for features {features.shape}; got mask of "
           f"shape {mask.shape}.", tf.shape(mask))
  anchors = features[:, :1] if contrast_mode == "one" else features

  def dense():
    same = dense_lib.same_sample_or_label(labels, mask, batch, tf.shape(contrast)[0],
                                 offset)
    queue_positive = None
    if queue is not None:
      queue_positive = dense_lib.queue_match(labels, offset, batch, queue[1])
    return dense_lib.dense_terms(anchors, contrast, same, offset, temperature,
                        summation, denominator, positives_cap,
                        scale_by_temperature, queue, queue_positive)

  def blocks():
    return blockwise.blockwise_terms(
        anchors, contrast, labels, offset=offset, temperature=temperature,
        summation=summation, denominator=denominator,
        positives_cap=positives_cap,
        scale_by_temperature=scale_by_temperature,
        block_size=block_size or None, queue=queue)

  if block_size == 0 or mask is not None or (labels is not None and
                                              labels.dtype == tf.bool):
    return dense()
  if block_size is not None:
    return blocks()
  queue_rows = 0 if queue is None else queue[0].shape[0]
  anchor_rows, contrast_rows = anchors.shape[0], contrast.shape[0]
  if (anchor_rows is not None and contrast_rows is not None and
      queue_rows is not None):
    logits = anchor_rows * anchors.shape[1] * (contrast_rows * views +
                                               queue_rows)
    return blocks() if logits > blockwise.AUTO_MIN_LOGITS else dense()
  # Batch unknown while tracing: decide per call.
  queue_rows = (0 if queue is None else
                tf.shape(queue[0], tf.int64)[0])
  logits = (tf.shape(anchors, tf.int64)[0] * anchors.shape[1] *
            (tf.shape(contrast, tf.int64)[0] * views + queue_rows))
  return tf.cond(logits > blockwise.AUTO_MIN_LOGITS, blocks, dense)


def _validate(features, labels, mask, temperature, contrast_mode, summation,
              denominator, positives_cap):
  """Checks arguments; returns float32 features and normalised labels/mask."""
  _validate_options(temperature, contrast_mode, summation, denominator)
  features = tf.convert_to_tensor(features)
  if features.shape.rank != 3:
    raise ValueError(
        "features must have shape [batch, views, dim] (rank 3); got shape "
        f"{features.shape}. Stack views with tf.stack(views, axis=1).")
  batch, views, dim = features.shape
  if views is None or dim is None:
    raise ValueError(f"features {features.shape} need a known views and dim "
                     "dimension.")
  if views < 1:
    raise ValueError(f"features need views >= 1; got shape {features.shape}.")
  if positives_cap is not None and (positives_cap < 0 or
                                    positives_cap % views):
    raise ValueError(
        f"positives_cap={positives_cap} must be >= 0 and a multiple of "
        f"views={views} (it counts positive views besides the anchor's own).")
  if not features.dtype.is_floating:
    raise ValueError(f"features must be floating point, got {features.dtype}.")
  features = tf.cast(features, tf.float32)
  if labels is not None and mask is not None:
    raise ValueError("Give labels or mask, not both.")
  if labels is not None:
    labels = validate_labels(tf.convert_to_tensor(labels), batch,
                              features.shape)
  if mask is not None:
    mask = tf.convert_to_tensor(mask)
    if (mask.shape.rank != 2 or
        (batch is not None and mask.shape[0] not in (None, batch))):
      raise ValueError(
          f"mask must have shape [batch, batch] = [{batch}, {batch}] (or "
          f"[batch, global_batch] when gathering); got {mask.shape}.")
    mask = tf.not_equal(mask, tf.zeros([], mask.dtype))
  return features, labels, mask, views


def _validate_queue(queue_features, queue_labels, labels, mask,
                    features_shape):
  """Returns `(float32 [K, dim] stop-gradient queue, int32 [K] ids)` or None.
  """
  if queue_features is None and queue_labels is None:
    return None
  if queue_features is None or queue_labels is None:
    missing = "queue_labels" if queue_labels is None else "queue_features"
    raise ValueError(
        f"queue_features and queue_labels go together; {missing} is None "
        "(give queue_labels -1 for empty queue slots).")
  if mask is not None or (labels is not None and labels.dtype == tf.bool):
    raise ValueError(
        "A queue needs [batch] class ids or no labels; multi-hot labels and "
        "explicit masks cannot say which queue rows are positives.")
  queue = tf.convert_to_tensor(queue_features)
  if queue.shape.rank != 2 or queue.shape[1] != features_shape[2]:
    raise ValueError(
        f"queue_features must have shape [K, dim] with dim = "
        f"{features_shape[2]} (features {features_shape}); got "
        f"{queue.shape}.")
  if not queue.dtype.is_floating:
    raise ValueError(
        f"queue_features must be floating point, got {queue.dtype}.")
  queue_labels = tf.convert_to_tensor(queue_labels)
  if queue_labels.shape.rank == 2 and queue_labels.shape[1] == 1:
    queue_labels = tf.squeeze(queue_labels, 1)
  if queue_labels.shape.rank != 1 or (
      queue.shape[0] is not None and
      queue_labels.shape[0] not in (None, queue.shape[0])):
    raise ValueError(
        f"queue_labels must have shape [K] = [{queue.shape[0]}] (queue "
        f"{queue.shape}); got {queue_labels.shape}.")
  if not (queue_labels.dtype.is_integer or queue_labels.dtype.is_floating):
    raise ValueError(
        f"queue_labels must be integer class ids, got {queue_labels.dtype}.")
  if queue_labels.dtype.is_floating:
    _check(tf.reduce_all(tf.equal(queue_labels, tf.round(queue_labels))),
           "queue_labels must be integer class ids (-1 = empty slot); got "
           "non-integer values.", queue_labels)
  _check(tf.reduce_all(queue_labels >= -1),
         "queue_labels must be class ids >= 0 or -1 (empty slot); got "
         "values < -1.", queue_labels)
  _check(tf.equal(tf.shape(queue_labels)[0], tf.shape(queue)[0]),
         f"queue_labels must have one label per queue row (queue "
         f"{queue.shape}).", tf.shape(queue_labels))
  return (tf.stop_gradient(tf.cast(queue, tf.float32)),
          tf.cast(queue_labels, tf.int32))


def _validate_block_size(block_size, labels, mask):
  if block_size is not None and (
      isinstance(block_size, bool) or
      not isinstance(block_size, (int, np.integer)) or block_size < 0):
    raise ValueError(
        f"block_size={block_size!r} must be None (automatic), 0 (dense) or a "
        "positive int (anchor rows per block).")
  if block_size and (mask is not None or
                     labels is not None and labels.dtype == tf.bool):
    raise ValueError(
        f"block_size={block_size} needs [batch] class ids or no labels; "
        "multi-hot labels and explicit masks use the dense path (pass "
        "block_size=None or 0).")


def _validate_options(temperature, contrast_mode, summation, denominator):
  # The choices as `LossConfig` checks them; the temperature may also be a
  # tensor here (a schedule), which a config cannot hold.
  config_lib.check_choice("contrast_mode", contrast_mode, CONTRAST_MODES)
  config_lib.check_choice("summation", summation, SUMMATIONS)
  config_lib.check_choice("denominator", denominator, DENOMINATORS)
  if not isinstance(temperature, tf.Tensor):
    config_lib.check_temperature(temperature)


def validate_labels(labels, batch, features_shape):
  """Returns int32 `[batch]` class ids or bool `[batch, classes]` multi-hot."""
  if labels.shape.rank == 2 and labels.shape[1] == 1:
    labels = tf.squeeze(labels, 1)
  if labels.shape.rank not in (1, 2) or (
      batch is not None and labels.shape[0] not in (None, batch)):
    raise ValueError(
        f"labels must be [batch] class ids or [batch, classes] multi-hot with "
        f"batch = {batch} (features {features_shape}); got {labels.shape}.")
  if not (labels.dtype.is_integer or labels.dtype.is_floating or
          labels.dtype == tf.bool):
    raise ValueError(f"labels must be numeric, got dtype {labels.dtype}.")
  if labels.shape.rank == 1:
    if labels.dtype.is_floating:
      _check(tf.reduce_all(tf.equal(labels, tf.round(labels))),
             "labels must be integer class ids; got non-integer values "
             "(pass multi-hot labels as [batch, classes]).", labels)
    _check(tf.reduce_all(labels >= 0),
           "labels must be class ids >= 0; got negative values.", labels)
    return tf.cast(labels, tf.int32)
  if labels.dtype != tf.bool:
    _check(tf.reduce_all((labels == 0) | (labels == 1)),
           "multi-hot labels [batch, classes] must hold only 0 and 1.",
           labels)
  return tf.cast(labels, tf.bool)


def _check(condition, message, value):
  """Raises ValueError eagerly; adds a runtime assertion inside graphs."""
  if tf.executing_eagerly():
    if not bool(condition.numpy()):
      raise ValueError(f"{message} Received: {np.asarray(value).tolist()}")
  else:
    tf.debugging.Assert(condition, [message, value], summarize=32)


def _masked(losses, valid):
  """Attaches `valid` as the Keras mask so reductions skip invalid samples."""
  # `Loss.__call__` reads this attribute (Keras has no public setter).
  losses._keras_mask = valid  # pylint: disable=protected-access
  return losses


@keras.saving.register_keras_serializable(package="supcon_tf")
class SupConLoss(keras.losses.Loss):
  """Keras wrapper of `supcon_loss`.

  `y_true` holds the labels (`[batch]` ids or `[batch, classes]` multi-hot;
  pass `None`/zeros-free SimCLR via `supcon_tf.SimCLRLoss`), `y_pred` the
  embeddings `[batch, views, dim]` with the views of sample `i` in
  `y_pred[i, 0..views-1]`. Samples without any positive are masked out of
  the reduction (they neither add loss nor count in the mean); sample
  weights and every Keras reduction apply as usual.

  Args:
    temperature, contrast_mode, summation, denominator, positives_cap,
    scale_by_temperature, block_size: as in `supcon_loss`.
    reduction, name, dtype: as in `keras.losses.Loss`.

  Example:
    >>> loss = SupConLoss(temperature=0.1)
    >>> loss(labels, embeddings)  # labels [batch], embeddings [batch, 2, 128]
  """
  # The `config.METHODS` objective it computes (`objectives.for_loss`).
  method = "supcon"

  def __init__(self, temperature=0.1, contrast_mode="all", summation="out",
               denominator="all", positives_cap=None,
               scale_by_temperature=True, reduction="sum_over_batch_size",
               name="supcon_loss", dtype=None, block_size=None):
    super().__init__(name=name, reduction=reduction, dtype=dtype)
    self.temperature = temperature
    self.contrast_mode = contrast_mode
    self.summation = summation
    self.denominator = denominator
    self.positives_cap = positives_cap
    self.scale_by_temperature = scale_by_temperature
    self.block_size = block_size
    # Fail at construction, not at the first batch.
    _validate_options(temperature, contrast_mode, summation, denominator)
    _validate_block_size(block_size, None, None)

  def options(self) -> dict:
    """The settings of `supcon_terms` this loss computes with.

    Keyed by the fields of `config.LossConfig`, as the custom loop passes
    them.
    """
    return {field.name: getattr(self, field.name)
            for field in dataclasses.fields(config_lib.LossConfig)}

  def call(self, y_true, y_pred):
    return _masked(*supcon_terms(y_pred, y_true, **self.options()))

  def get_config(self):
    return {**super().get_config(), **self.options()}


@keras.saving.register_keras_serializable(package="supcon_tf")
class SimCLRLoss(SupConLoss):
  """`SupConLoss` that ignores `y_true`: each sample is its own class."""
  method = "simclr"

  def __init__(self, temperature=0.5, name="simclr_loss", **kwargs):
    super().__init__(temperature=temperature, name=name, **kwargs)

  def call(self, y_true, y_pred):
    del y_true
    return _masked(*supcon_terms(y_pred, None, **self.options()))
