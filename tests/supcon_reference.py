"""Float64 NumPy reference of the SupCon loss for the kernel tests.

Written from the definitions, one anchor row at a time with explicit masks,
independent of `supcon_tf.dense`, `supcon_tf.blockwise` and its kernels.
Rows are anchor views (sample-major), columns every view of every sample
(sample-major), then the rows of a queue.
"""

import numpy as np


def reference_masks(global_batch, views, labels=None, *, anchor_views=None,
                    offset=0, local=None, positives_cap=None,
                    queue_labels=None):
  """`(positive, negative)` `[rows, cols]` bool of the SupCon loss.

  Args:
    global_batch: samples in the contrast set.
    views: views per contrast sample.
    labels: `[global_batch]` class ids, or None (each sample its own class).
    anchor_views: the first this many views of a sample are anchors.
    offset, local: the anchors are samples `offset .. offset + local - 1`.
    positives_cap: keep the first `cap // views` other samples of the class,
      then queue rows of the class up to `cap - views * kept`.
    queue_labels: `[K]` ids of extra one-view columns, -1 = empty slot.

  Returns:
    Positives: the anchor's other views, its kept class mates' views, its
    class's kept queue rows. Negatives: other classes' columns and valid
    queue rows (all of them without labels). Capped-away positives are in
    neither.
  """
  ids = np.arange(global_batch) if labels is None else np.asarray(labels)
  anchor_views = views if anchor_views is None else anchor_views
  local = global_batch - offset if local is None else local
  queue_labels = np.zeros([0], np.int64) if queue_labels is None else (
      np.asarray(queue_labels))
  cols = global_batch * views + len(queue_labels)
  positive = np.zeros([local * anchor_views, cols], bool)
  negative = np.zeros_like(positive)
  for i in range(offset, offset + local):
    mates = [j for j in range(global_batch) if j != i and ids[j] == ids[i]]
    kept = mates if positives_cap is None else mates[:positives_cap // views]
    for v in range(anchor_views):
      row = (i - offset) * anchor_views + v
      for j in range(global_batch):
        for w in range(views):
          col = j * views + w
          if j == i:
            positive[row, col] = w != v
          elif j in kept:
            positive[row, col] = True
          elif ids[j] != ids[i]:
            negative[row, col] = True
      left = None if positives_cap is None else (
          positives_cap - views * len(kept))
      for k, queue_id in enumerate(queue_labels):
        col = global_batch * views + k
        if queue_id < 0:
          continue
        if labels is not None and queue_id == ids[i]:
          if left is None or left > 0:
            positive[row, col] = True
            left = None if left is None else left - 1
        else:
          negative[row, col] = True
  return positive, negative


def _logsumexp(values):
  """log(sum(exp(values))); -inf for no values."""
  if values.size == 0:
    return -np.inf
  top = values.max()
  return top + np.log(np.sum(np.exp(values - top)))


def anchor_loss(positives, negatives, *, summation, denominator):
  """One anchor's loss from its positive and negative logits (unscaled).

  Returns None when the anchor has no term: no positive, or no negative
  with `denominator="only_negatives"`.
  """
  if not positives.size or (denominator == "only_negatives" and
                            not negatives.size):
    return None
  if denominator == "all":
    log_denominator = _logsumexp(np.concatenate([positives, negatives]))
  elif denominator == "one_positive":  # each positive against the negatives
    log_denominator = np.logaddexp(positives, _logsumexp(negatives))
  else:
    log_denominator = _logsumexp(negatives)
  log_probs = positives - log_denominator
  if summation == "out":
    return -np.mean(log_probs)
  return np.log(positives.size) - _logsumexp(log_probs)


def row_losses(logits, positive, negative, *, summation, denominator):
  """`(loss [rows], valid [rows])` of each anchor row, unscaled, float64."""
  logits = np.asarray(logits, np.float64)
  loss = np.zeros(len(logits))
  valid = np.zeros(len(logits), bool)
  for r, row in enumerate(logits):
    value = anchor_loss(row[positive[r]], row[negative[r]],
                        summation=summation, denominator=denominator)
    if value is not None:
      loss[r], valid[r] = value, True
  return loss, valid


def reference_loss(features, labels=None, *, temperature=0.1,
                   summation="out", denominator="all", positives_cap=None,
                   scale_by_temperature=True, anchor_views=None, offset=0,
                   local=None, queue=None):
  """`(loss [local], valid [local])` float64 per anchor sample.

  Args:
    features: `[global_batch, views, dim]`.
    labels, anchor_views, offset, local, positives_cap: as `reference_masks`.
    temperature, summation, denominator, scale_by_temperature: as in
      `supcon_tf.supcon_loss`.
    queue: None or `(features [K, dim], labels [K])`.
  """
  x = np.asarray(features, np.float64)
  global_batch, views, dim = x.shape
  anchor_views = views if anchor_views is None else anchor_views
  local = global_batch - offset if local is None else local
  columns = x.reshape(-1, dim)
  queue_labels = None
  if queue is not None:
    columns = np.concatenate([columns, np.asarray(queue[0], np.float64)])
    queue_labels = queue[1]
  anchors = x[offset:offset + local, :anchor_views].reshape(-1, dim)
  positive, negative = reference_masks(
      global_batch, views, labels, anchor_views=anchor_views, offset=offset,
      local=local, positives_cap=positives_cap, queue_labels=queue_labels)
  rows, valid = row_losses(anchors @ columns.T / temperature, positive,
                           negative, summation=summation,
                           denominator=denominator)
  if scale_by_temperature:
    rows *= temperature
  rows = rows.reshape(local, anchor_views)
  valid = valid.reshape(local, anchor_views)
  count = valid.sum(1)
  return (np.where(valid, rows, 0.0).sum(1) / np.maximum(count, 1),
          count > 0)


def numeric_gradient(fn, x, eps=1e-6):
  """Central differences of the scalar `fn(x)` at float64 `x`."""
  x = np.array(x, np.float64)
  grad = np.zeros_like(x)
  for index in np.ndindex(x.shape):
    old = x[index]
    x[index] = old + eps
    high = fn(x)
    x[index] = old - eps
    low = fn(x)
    x[index] = old
    grad[index] = (high - low) / (2 * eps)
  return grad


def assert_close_to_scale(got, want, tol=1e-4):
  """Equal up to `tol` relative to the largest entry of `want`."""
  scale = np.abs(want).max()
  assert scale > 0, "a zero reference cannot tell right from wrong"
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale)
