"""The masked blockwise kernel: every SupCon mode, masks built per block.

Used by `supcon_tf.blockwise` for every mode other than the default (out,
all, no cap) and for a memory queue. A block of anchor rows gets its
positive / negative masks from class ids and sample indices (no `[rows,
contrast]` mask of the whole batch exists), then its row losses and the
closed-form gradient rows `H`.

Closed forms. For anchor row `r` with logits `s_rc = <a_r, c_c> / tau`, the
gradient of its loss with respect to `s_r` is a row `H_r`; with `P`
positives, `n = |P|`, `N` negatives, `softmax_X` the softmax of `s`
restricted to the set `X`:

  out, all:             H = softmax_{P+N} - [P] / n
  out, only_negatives:  H = softmax_N - [P] / n
  in, all:              H = softmax_{P+N} - softmax_P
  in, only_negatives:   H = softmax_N - softmax_P
  out, one_positive:    with q_p = sigmoid(s_p - logsumexp_N(s)):
                        H_p = -(1 - q_p) / n,
                        H_N = softmax_N sum_p (1 - q_p) / n
  in, one_positive:     with w = softmax_P(log q):
                        H_p = -w_p (1 - q_p),
                        H_N = softmax_N sum_p w_p (1 - q_p)
"""

import numpy as np
import tensorflow as tf

# A logit that takes no part in a softmax (float32 min, not -inf, so that
# max-subtraction stays finite on rows with nothing kept).
MASKED_LOGIT = float(np.finfo(np.float32).min)


def _masked_softmax(x, keep):
  """Row-wise logsumexp and softmax of `x` over `keep`.

  Args:
    x: `[rows, cols]` float32.
    keep: `[rows, cols]` bool.

  Returns:
    `(lse [rows], probs [rows, cols])`; rows with nothing kept give 0 and 0.
  """
  x = tf.where(keep, x, MASKED_LOGIT)
  top = tf.reduce_max(x, 1, keepdims=True)
  top = tf.where(top > MASKED_LOGIT, top, 0.0)
  e = tf.exp(x - top)
  total = tf.reduce_sum(e, 1, keepdims=True)
  nonempty = total > 0
  safe = tf.where(nonempty, total, 1.0)
  lse = tf.where(nonempty, top + tf.math.log(safe), 0.0)
  return lse[:, 0], e * (1.0 / safe)


# `plan` below is the `blockwise._Plan` of the call: its settings
# (`summation`, `denominator`, `positives_cap`, `supervised`, `views`,
# `inv_tau`), its per-block arrays (`block_self`, `block_class`,
# `block_sample`, `block_pos`, `block_inv_pos`, `block_has_negative` and,
# with a queue, `block_id`, `block_left`), its columns (`col_index`,
# `col_class`, `col_sample`, `col_rank`) and its queue (`queue`,
# `queue_ids`, `queue_valid`, `queue_rank`).


def _masks(plan, b):
  """`(positive, in_all, negative)` `[rows, all_cols]` bool of block b."""
  cap = plan.positives_cap
  not_self = tf.not_equal(plan.col_index[None, :],
                          plan.block_self[b][:, None])
  same = tf.equal(plan.block_class[b][:, None], plan.col_class[None, :])
  if cap is not None and plan.supervised:
    sample_b = plan.block_sample[b][:, None]
    own = tf.equal(sample_b, plan.col_sample[None, :])
    # Same-class samples other than the anchor's, up to this column.
    seen = plan.col_rank[None, :] + 1 - tf.cast(
        sample_b < plan.col_sample[None, :], tf.int32)
    kept = own | (seen <= cap // plan.views)
    positive = same & kept & not_self
    in_all = not_self & (kept | ~same)
  else:
    positive = same & not_self
    in_all = not_self
  negative = ~same
  if plan.queue is not None:  # one-view columns after the batch's
    valid = plan.queue_valid[None, :]
    q_same = tf.equal(plan.block_id[b][:, None],
                      plan.queue_ids[None, :]) & valid
    q_negative = valid & ~q_same
    if cap is not None:
      q_same &= plan.queue_rank[None, :] < plan.block_left[b][:, None]
    positive = tf.concat([positive, q_same], 1)
    in_all = tf.concat([in_all, q_same | q_negative], 1)
    negative = tf.concat([negative, q_negative], 1)
  return positive, in_all, negative


def masked_block(plan, b, a, c, row_w, full):
  """Any mode: row loss, H C and H^T (w A) with masks from class ids.

  Args:
    plan: the call's `blockwise._Plan`.
    b: scalar int32, the block.
    a: `[rows, dim]` float32 anchors of the block.
    c: `[all_cols, dim]` float32 contrast (batch rows, then queue rows).
    row_w: `[rows]` float32 gradient weights of the block's rows.
    full: also return the row losses and `H C`.

  Returns:
    `H^T (w A)` `[all_cols, dim]`; with `full`, `(row_loss [rows], H C
    [rows, dim], H^T (w A))`.
  """
  logits = tf.matmul(a * plan.inv_tau, c, transpose_b=True)
  positive, in_all, negative = _masks(plan, b)
  n = plan.block_pos[b]
  inv_n = plan.block_inv_pos[b][:, None]
  zero = tf.zeros_like(logits)
  if plan.denominator in ("all", "only_negatives"):
    lse_d, probs_d = _masked_softmax(
        logits, in_all if plan.denominator == "all" else negative)
    if plan.summation == "out":
      row_loss = lse_d - tf.reduce_sum(tf.where(positive, logits, zero),
                                       1) * inv_n[:, 0]
      h = probs_d - tf.cast(positive, tf.float32) * inv_n
    else:
      lse_p, probs_p = _masked_softmax(logits, positive)
      row_loss = tf.math.log(tf.maximum(n, 1.0)) - lse_p + lse_d
      h = probs_d - probs_p
  else:  # one_positive
    lse_n, probs_n = _masked_softmax(logits, negative)
    shifted = lse_n[:, None] - logits
    log_q = -tf.nn.softplus(shifted)
    not_q = tf.sigmoid(shifted)  # 1 - q
    if plan.summation == "out":
      row_loss = -tf.reduce_sum(tf.where(positive, log_q, zero),
                                1) * inv_n[:, 0]
      coef = tf.where(positive, not_q, zero) * inv_n
    else:
      lse_q, w = _masked_softmax(log_q, positive)
      row_loss = tf.math.log(tf.maximum(n, 1.0)) - lse_q
      coef = w * not_q
    h = probs_n * tf.reduce_sum(coef, 1, keepdims=True) - coef
    row_loss = tf.where(plan.block_has_negative[b], row_loss, 0.0)
  dc = tf.matmul(h, row_w[:, None] * a, transpose_a=True)
  if not full:
    return dc
  return row_loss, tf.matmul(h, c), dc
