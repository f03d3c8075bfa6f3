"""The SupCon loss with whole `[anchor rows, contrast rows]` matrices.

`losses.supcon_terms` uses this path for small batches, explicit masks and
multi-hot labels (`supcon_tf.blockwise` computes the same loss in blocks of
anchor rows above `blockwise.AUTO_MIN_LOGITS` logits). Positive and negative
masks are built at the sample level `[batch, global_batch]` and tiled to
every view; autodiff gives the gradient.
"""

import tensorflow as tf


def same_sample_or_label(labels, mask, batch, global_batch, offset):
  """`[batch, global_batch]` bool: positive candidates at the sample level.

  Includes each sample's own column (offset + row): its other views are
  always positives.
  """
  own = tf.one_hot(offset + tf.range(batch), global_batch, on_value=True,
                   off_value=False)
  if mask is not None:
    return mask | own
  if labels is None:
    return own
  local = labels[offset:offset + batch]
  if labels.dtype == tf.bool:
    shared = tf.matmul(tf.cast(local, tf.float32), tf.cast(labels, tf.float32),
                       transpose_b=True)
    return (shared > 0) | own
  return tf.equal(local[:, None], labels[None, :])


def _capped(same, own, positives_cap, views):
  """Keeps the first `positives_cap // views` other samples per row."""
  others = same & ~own
  rank = tf.cumsum(tf.cast(others, tf.int32), axis=1)
  return own | (others & (rank <= positives_cap // views))


def _masked_logsumexp(x, keep, axis=-1):
  """log(sum(exp(x)) over `keep`) and whether anything was kept.

  Never produces inf or NaN, in value or gradient: empty rows give 0.
  """
  row_max = tf.stop_gradient(
      tf.reduce_max(tf.where(keep, x, x.dtype.min), axis, keepdims=True))
  exp = tf.where(keep, tf.exp(tf.where(keep, x, row_max) - row_max), 0.0)
  total = tf.reduce_sum(exp, axis, keepdims=True)
  nonempty = total > 0
  return (tf.math.log(tf.where(nonempty, total, 1.0)) +
          tf.where(nonempty, row_max, 0.0)), nonempty


def dense_terms(anchors, contrast, same, offset, temperature, summation,
                 denominator, positives_cap, scale_by_temperature,
                 queue=None, queue_positive=None):
  """The loss with `[anchor_rows, contrast_rows]` matrices.

  Args:
    anchors: `[batch, anchor_views, dim]` float32.
    contrast: `[global_batch, views, dim]` float32.
    same: `[batch, global_batch]` bool positive candidates (incl. own).
    offset: scalar int32, global row of local sample 0.
    queue: None or `(features [K, dim], labels [K])`, extra columns.
    queue_positive: `[batch, K]` bool, queue rows with the sample's label.
  """
  batch, anchor_views = tf.shape(anchors)[0], anchors.shape[1]
  global_batch, views = tf.shape(contrast)[0], contrast.shape[1]
  own = tf.one_hot(offset + tf.range(batch), global_batch, on_value=True,
                   off_value=False)
  positive = same
  if positives_cap is not None:
    positive = _capped(same, own, positives_cap, views)

  def tile(sample_mask):  # [batch, global] -> [batch*Va, global*V]
    tiled = tf.broadcast_to(sample_mask[:, None, :, None],
                            [batch, anchor_views, global_batch, views])
    return tf.reshape(tiled, [batch * anchor_views, global_batch * views])

  self_view = tf.reshape(
      own[:, None, :, None] & tf.eye(anchor_views, views, dtype=tf.bool)[
          None, :, None, :], [batch * anchor_views, global_batch * views])
  kept_others = tf.reduce_sum(tf.cast(positive & ~own, tf.int32), 1)
  positive = tile(positive) & ~self_view
  negative = tile(~same)
  columns = tf.reshape(contrast, [-1, contrast.shape[2]])
  if queue is not None:
    # Queue rows are one-view columns after the batch's.
    queue_negative = ~queue_positive & (queue[1] >= 0)[None, :]
    if positives_cap is not None:  # the batch's kept positives count first
      left = positives_cap - views * kept_others
      rank = tf.cumsum(tf.cast(queue_positive, tf.int32), axis=1)
      queue_positive &= rank <= left[:, None]

    def tile_queue(sample_mask):  # [batch, K] -> [batch*Va, K]
      return tf.reshape(tf.repeat(sample_mask[:, None], anchor_views, 1),
                        [batch * anchor_views, -1])

    positive = tf.concat([positive, tile_queue(queue_positive)], 1)
    negative = tf.concat([negative, tile_queue(queue_negative)], 1)
    columns = tf.concat([columns, queue[0]], 0)

  temperature = tf.cast(temperature, tf.float32)
  logits = tf.matmul(tf.reshape(anchors, [-1, anchors.shape[2]]), columns,
                     transpose_b=True) / temperature
  num_positives = tf.reduce_sum(tf.cast(positive, tf.float32), 1,
                                keepdims=True)
  valid = num_positives > 0
  if denominator == "all":
    log_denominator, _ = _masked_logsumexp(logits, positive | negative)
  else:
    log_negatives, has_negative = _masked_logsumexp(logits, negative)
    if denominator == "one_positive":
      log_denominator = tf.where(
          has_negative, tf.math.reduce_logsumexp(
              tf.stack([logits, tf.broadcast_to(log_negatives,
                                                tf.shape(logits))]), 0),
          logits)
    else:
      log_denominator = log_negatives
      valid &= has_negative
  log_prob = logits - log_denominator
  if summation == "out":
    row_loss = -tf.reduce_sum(tf.where(positive, log_prob, 0.0), 1,
                              keepdims=True) / tf.maximum(num_positives, 1.0)
  else:
    log_sum, _ = _masked_logsumexp(log_prob, positive)
    row_loss = tf.math.log(tf.maximum(num_positives, 1.0)) - log_sum
  row_loss = tf.where(valid, row_loss, 0.0)
  if scale_by_temperature:
    row_loss *= temperature
  row_loss = tf.reshape(row_loss, [batch, anchor_views])
  valid_views = tf.reduce_sum(
      tf.cast(tf.reshape(valid, [batch, anchor_views]), tf.float32), 1)
  loss = tf.reduce_sum(row_loss, 1) / tf.maximum(valid_views, 1.0)
  return loss, valid_views > 0


def queue_match(labels, offset, batch, queue_labels):
  """`[batch, K]` bool: queue rows with the local sample's label."""
  if labels is None:
    return tf.zeros([batch, tf.shape(queue_labels)[0]], tf.bool)
  local = labels[offset:offset + batch]
  return tf.equal(local[:, None], queue_labels[None, :]) & (
      queue_labels >= 0)[None, :]
