"""The blockwise SupCon kernel for symmetric logits (one matrix x x^T / tau).

With one replica and every view an anchor, the anchors are the contrast set
and the logits are symmetric. `SymmetricSweeps` computes each tile of them
once and uses it for both its rows and its columns: the forward pass forms
half of the logits, the backward pass recomputes them and applies
`Q = diag(w) P + P^T diag(w)` to both sides, about two logits-sized matmuls
in all against three for the fused kernel of `supcon_tf.blockwise`, which
chooses this one (default mode, enough blocks) and documents the closed
forms.
"""

import numpy as np
import tensorflow as tf

_MIN = float(np.finfo(np.float32).min)  # a logit that takes no part


class SymmetricSweeps:
  """Row logsumexp and gradient of `softmax(x x^T / tau)` minus its diagonal.

  With one matrix `x` as anchors and contrast the logits `S` are symmetric,
  so each tile is computed once and used for both of its rows and columns.
  Block `i` of rows meets blocks `i .. i + nb // 2` (cyclically) in one
  `[block, (nb // 2 + 1) * block]` slab; every off-diagonal pair of blocks
  occurs in exactly one slab (for even `nb` the pair at distance `nb / 2`
  occurs in two and is used one-sided there, like the diagonal).

  Per slab, products of matmul size: the forward computes `S` (half of
  `x x^T` over all slabs); the gradient recomputes it and forms
  `Q = w_r P_rc + w_c P_cr` for both triangles at once, then `Q x_slab` and
  `Q^T x_block`: two matmuls of the full matrix in all, against three for
  separate anchor and contrast sides.
  """

  def __init__(self, x, inv_tau, block):
    self.inv_tau = inv_tau
    n, self.dim = x.shape
    self.n = n
    rows, blocks = self.plan(n, block)
    self.rows, self.blocks = rows, blocks
    self.padded = rows * blocks
    half = blocks // 2
    self.width = (half + 1) * rows
    # Slab tiles 1 .. two_sided serve both their rows and their columns.
    self.two_sided_end = (half if blocks % 2 else half - 1) * rows + rows
    if self.two_sided_end <= rows:
      self.two_sided_end = None
    self.xp = tf.pad(x, [[0, self.padded - n], [0, 0]])
    self.real = tf.range(self.padded) < n
    self.diagonal = tf.stack([tf.range(rows), tf.range(rows)], 1)

  @staticmethod
  def plan(n, block):
    """Rows per block and blocks; a divisor of `n` avoids padded rows."""
    block = max(1, min(block, n))
    for rows in range(block, max(block // 2, 1) - 1, -1):
      if n % rows == 0:
        return rows, n // rows
    blocks = -(-n // block)
    return -(-n // blocks), blocks

  def _slab(self, i):
    rows = i * self.rows + tf.range(self.rows)
    cols = (i * self.rows + tf.range(self.width)) % self.padded
    a, c = tf.gather(self.xp, rows), tf.gather(self.xp, cols)
    logits = tf.matmul(a * self.inv_tau, c, transpose_b=True)
    logits = tf.tensor_scatter_nd_update(logits, self.diagonal,
                                         tf.fill([self.rows], _MIN))
    return rows, cols, a, c, logits

  def _loop(self, body, state):
    return tf.while_loop(lambda i, *_: i < self.blocks, body,
                         [tf.constant(0)] + state, parallel_iterations=1)[1:]

  def logsumexp(self):
    """`[n]` logsumexp of each row of S without its diagonal."""
    end = self.two_sided_end

    def body(i, top, total):
      rows, cols, _, _, logits = self._slab(i)
      if self.padded > self.n:  # keep the zero padding rows out of the sums
        logits = tf.where(tf.gather(self.real, cols)[None, :], logits, _MIN)
        logits = tf.where(tf.gather(self.real, rows)[:, None], logits, _MIN)
      new_top = tf.reduce_max(logits, 1)
      new_total = tf.reduce_sum(tf.exp(logits - new_top[:, None]), 1)
      if end is not None:
        col_top = tf.reduce_max(logits, 0)
        col_total = tf.reduce_sum(tf.exp(logits - col_top[None, :]), 0)
        rows = tf.concat([rows, cols[self.rows:end]], 0)
        new_top = tf.concat([new_top, col_top[self.rows:end]], 0)
        new_total = tf.concat([new_total, col_total[self.rows:end]], 0)
      old_top, old_total = tf.gather(top, rows), tf.gather(total, rows)
      merged = tf.maximum(old_top, new_top)
      merged_total = (old_total * tf.exp(old_top - merged) +
                      new_total * tf.exp(new_top - merged))
      rows = rows[:, None]
      return (i + 1, tf.tensor_scatter_nd_update(top, rows, merged),
              tf.tensor_scatter_nd_update(total, rows, merged_total))

    top, total = self._loop(body, [tf.fill([self.padded], _MIN),
                                   tf.zeros([self.padded])])
    self.lse = (top + tf.math.log(total))[:self.n]
    return self.lse

  def gradient(self, weights):
    """`(diag(w) P + P^T diag(w)) x` for row weights `w` `[n]`, P = softmax."""
    end = self.two_sided_end
    # P's entries are exp(logit - lse), scaled by w after the exp: w may be
    # zero or negative (an upstream gradient), where log(w) would not do.
    # Padded rows get lse = +inf and w = 0, so their terms are exactly 0.
    pad = [[0, self.padded - self.n]]
    lse = tf.pad(self.lse, pad, constant_values=np.inf)
    weights = tf.pad(weights, pad)
    pad_right = self.width - (end or 0)

    def body(i, dx):
      rows, cols, a, c, logits = self._slab(i)
      # Padded rows are zero, so the logits they meet add nothing below.
      q = (tf.exp(logits - tf.gather(lse, rows)[:, None]) *
           tf.gather(weights, rows)[:, None])
      if end is not None:
        col_lse = tf.concat([tf.fill([self.rows], np.inf),
                             tf.gather(lse, cols[self.rows:end]),
                             tf.fill([pad_right], np.inf)], 0)
        col_w = tf.concat([tf.zeros([self.rows]),
                           tf.gather(weights, cols[self.rows:end]),
                           tf.zeros([pad_right])], 0)
        q += tf.exp(logits - col_lse[None, :]) * col_w[None, :]
      dx = tf.tensor_scatter_nd_add(dx, rows[:, None], tf.matmul(q, c))
      return i + 1, tf.tensor_scatter_nd_add(
          dx, cols[:, None], tf.matmul(q, a, transpose_a=True))

    dx, = self._loop(body, [tf.zeros([self.padded, self.dim])])
    return dx[:self.n]


def symmetric_loss(features, *, inv_tau, block_size, row_class, num_classes,
                   row_inv_pos, row_valid, row_weight, scale):
  """Per-sample SupCon loss (default mode) with the symmetric sweeps.

  Rows are the `features` views in sample-major order (`n = batch * views`).

  Args:
    features: `[batch, views, dim]` float32, anchors and contrast at once.
    inv_tau: scalar float32, 1 / temperature.
    block_size: python int, rows per block (see `SymmetricSweeps.plan`).
    row_class: `[n]` int32 dense class of each row, in `[0, num_classes)`.
    num_classes: number of dense classes (segments), e.g. `batch`.
    row_inv_pos: `[n]` float32, 1 / number of positives of each row.
    row_valid: `[n]` bool, rows that have a positive.
    row_weight: `[n]` float32, each row's gradient weight for a unit upstream
      gradient of its sample's loss.
    scale: scalar float32 factor of the loss (temperature or 1).

  Returns:
    `[batch]` float32 losses, differentiable (closed-form gradient).
  """
  batch, views, dim = features.shape[0], features.shape[1], features.shape[2]
  cols = batch * views

  @tf.custom_gradient
  def loss_fn(features):
    x = tf.reshape(features, [cols, dim])
    sweeps = SymmetricSweeps(x, inv_tau, block_size)
    per_class = tf.math.unsorted_segment_sum(x, row_class, num_classes)
    positives = tf.gather(per_class, row_class) - x
    row_loss = sweeps.logsumexp() - tf.reduce_sum(x * positives, 1) * (
        inv_tau * row_inv_pos)
    row_loss = tf.where(row_valid, row_loss, 0.0)
    loss = tf.reduce_sum(tf.reshape(row_loss, [batch, views]), 1) * (
        scale / views)

    def grad(dloss):
      row_w = tf.reshape(tf.repeat(tf.cast(dloss, tf.float32)[:, None],
                                   views, 1), [-1]) * row_weight
      wa = (row_w * row_inv_pos)[:, None] * x
      # Positive terms, anchor side then contrast side (pos is symmetric).
      dx = sweeps.gradient(row_w) - positives * (row_w * row_inv_pos)[
          :, None] + wa - tf.gather(
              tf.math.unsorted_segment_sum(wa, row_class, num_classes),
              row_class)
      return tf.reshape(dx, tf.shape(features))

    return loss, grad

  return loss_fn(features)
