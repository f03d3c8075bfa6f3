"""The SupCon loss in blocks of anchor rows, with a closed-form gradient.

The dense formulation (`losses._dense_terms`) holds several
`[anchor_rows, contrast_rows]` float32 matrices at once; at 16,384 rows each
is 1 GiB. Here anchor rows are processed `block_size` at a time inside a
`tf.while_loop`: only the logits of the current block exist, the positive /
negative masks are built per block from class ids and sample indices, and the
gradient is written in closed form inside a `tf.custom_gradient` (no autodiff
through the loop, nothing of size rows^2 kept for the backward pass). Peak
memory is O(block * contrast_rows + rows * dim).

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

For the default mode (out, all, no cap) the `[P] / n` terms are handled with
per-class sums of embeddings (O(rows * dim)), so a block needs only its
logits, one softmax and the gradient products.

Three kernels, by case; matmul-sized products (`[block, contrast_rows] x
[.., dim]`) per block of anchor rows:

* Symmetric (default mode, `anchors is contrast`: one replica, every view an
  anchor; at least `MIN_SYMMETRIC_BLOCKS` blocks). The logits are
  symmetric, so each tile serves its rows and its columns
  (`_SymmetricSweeps`): the forward computes half of the logits (0.5 of the
  full matrix), the backward recomputes them and applies
  `Q = diag(w) P + P^T diag(w)` to both sides (0.5 + 1): about two in all.
* Fused (default mode otherwise: `contrast_mode="one"`, a gathered
  contrast, or few blocks). Every upstream gradient of the per-sample loss
  only rescales rows of `H`, so the forward pass computes with the weights
  of a plain mean

    S_b = A_b C^T       logits of the block             (1)
    dA_b = H_b C        gradient of the block's anchors (2)
    dC += H_b^T A_b     gradient of the contrast rows   (3)

  three, the fewest for three different contractions. The backward pass
  only scales `dA`, `dC` when the upstream gradient is the same for every
  sample that has a positive (any mean of the loss, Keras reductions
  included); otherwise it reruns the loop with the given weights to rebuild
  `dC` (two more; `H C` does not depend on the weights). Inside a
  `tf.function` that takes no gradient, TensorFlow prunes (2) and (3).
* Masked (every other mode, and positive caps): as fused, with the masks
  and `H` of the closed forms above built per block.

With `distributed.all_gather` contrast the contrast gradient flows back
through the gather, so summed per-replica gradients equal the single-device
ones. Not differentiable twice.
"""

import numpy as np
import tensorflow as tf

# Above this many anchor x contrast logits `supcon_terms` switches to blocks
# (already faster than the dense path at 1024 x 1024 on CPU).
AUTO_MIN_LOGITS = 1024 * 1024
# Automatic block: about this many logits per block (16 MiB of float32).
BLOCK_LOGITS = 1 << 22
DEFAULT_BLOCK_ROWS = 256
# The symmetric kernel costs 4 (nb // 2 + 1) / nb logits-sized matmuls for
# nb blocks against 3 for the fused one, plus a second sweep: it pays from
# about 8 blocks on.
MIN_SYMMETRIC_BLOCKS = 8

_MIN = float(np.finfo(np.float32).min)


def auto_block_size(contrast_rows):
  """Anchor rows per block for `contrast_rows` columns.

  Args:
    contrast_rows: python int (or None when unknown at trace time).

  Returns:
    A python int, a multiple of 32 in [32, 2048].
  """
  if contrast_rows is None:
    return DEFAULT_BLOCK_ROWS
  rows = BLOCK_LOGITS // max(int(contrast_rows), 1)
  return int(min(max(rows // 32 * 32, 32), 2048))


# Plain TF control flow throughout: no need for (slow) autograph conversion.
@tf.autograph.experimental.do_not_convert
def blockwise_terms(anchors, contrast, ids=None, *, offset=0, temperature=0.1,
                    summation="out", denominator="all", positives_cap=None,
                    scale_by_temperature=True, block_size=None, queue=None):
  """`losses.supcon_terms` for class ids, in blocks of anchor rows.

  Computes exactly what the dense path computes for integer labels (or none)
  with O(block_size * contrast_rows) memory. Not differentiable twice.

  Args:
    anchors: `[batch, anchor_views, dim]`: samples `offset .. offset+batch-1`
      of `contrast`, all their views (`anchor_views == views`) or the first
      (`anchor_views == 1`). Any float dtype; computed in float32. Passing
      the `contrast` tensor itself (one replica, every view an anchor; then
      `offset` is 0) enables the symmetric kernel.
    contrast: `[global_batch, views, dim]`, e.g. `distributed.all_gather` of
      the local features (the gradient flows back to it).
    ids: `[global_batch]` integer class ids of `contrast`, or None: every
      sample is its own class (SimCLR).
    offset: scalar int, row of `contrast` holding `anchors[0]`.
    temperature, summation, denominator, positives_cap, scale_by_temperature:
      as in `losses.supcon_loss` (not validated here).
    block_size: anchor rows per block (rounded down to whole samples, at
      least one); None picks about 4M logits per block.
    queue: None or `(features [K, dim] float32, ids [K] int32)`: extra
      one-view contrast columns that get no gradient; id -1 = empty slot
      (ignored), an id equal to the anchor's = positive, else negative (all
      negatives when `ids` is None). Positives are counted per block from
      sorted queue ids (no `[batch, K]` mask is built; a block holds
      `[block, global_batch * views + K]` logits). Uses the masked kernel.

  Returns:
    `(loss, valid)`: `[batch]` float32 and `[batch]` bool, as
    `losses.supcon_terms`.

  Raises:
    ValueError: for a block_size that is not a positive int.
  """
  return _terms(anchors, contrast, ids, offset=offset, temperature=temperature,
                summation=summation, denominator=denominator,
                positives_cap=positives_cap,
                scale_by_temperature=scale_by_temperature,
                block_size=block_size, class_sums=True, queue=queue)


def _size(x):
  return x.shape[0] if x.shape[0] is not None else tf.shape(x)[0]


def _class_stats(ids, n):
  """Dense class, rank within class (batch order) and class size per sample.

  Args:
    ids: `[n]` integer ids or None (each sample its own class).
    n: number of samples.

  Returns:
    Three `[n]` int32: class in [0, n), number of earlier samples of the same
    class, samples in the class.
  """
  if ids is None:
    return (tf.range(n), tf.zeros([n], tf.int32), tf.ones([n], tf.int32))
  ids = tf.reshape(ids, [-1])
  order = tf.argsort(ids, stable=True)
  sorted_ids = tf.gather(ids, order)
  position = tf.range(n)
  starts = tf.not_equal(sorted_ids, tf.roll(sorted_ids, 1, 0)) | tf.equal(
      position, 0)
  group = tf.cumsum(tf.cast(starts, tf.int32)) - 1
  first = tf.math.unsorted_segment_min(position, group, n)
  rank = position - tf.gather(first, group)
  count = tf.gather(
      tf.math.unsorted_segment_sum(tf.ones_like(position), group, n), group)
  inverse = tf.math.invert_permutation(order)
  return (tf.gather(group, inverse), tf.gather(rank, inverse),
          tf.gather(count, inverse))


def _masked_softmax(x, keep):
  """Row-wise logsumexp and softmax of `x` over `keep`.

  Args:
    x: `[rows, cols]` float32.
    keep: `[rows, cols]` bool.

  Returns:
    `(lse [rows], probs [rows, cols])`; rows with nothing kept give 0 and 0.
  """
  x = tf.where(keep, x, _MIN)
  top = tf.reduce_max(x, 1, keepdims=True)
  top = tf.where(top > _MIN, top, 0.0)
  e = tf.exp(x - top)
  total = tf.reduce_sum(e, 1, keepdims=True)
  nonempty = total > 0
  safe = tf.where(nonempty, total, 1.0)
  lse = tf.where(nonempty, top + tf.math.log(safe), 0.0)
  return lse[:, 0], e * (1.0 / safe)


class _SymmetricSweeps:
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
    # log(w) - lse, -inf for weight 0 and padded rows: their terms vanish.
    shift = tf.pad(tf.math.log(weights) - self.lse,
                   [[0, self.padded - self.n]], constant_values=-np.inf)
    pad_right = tf.fill([self.width - (end or 0)], -np.inf)

    def body(i, dx):
      rows, cols, a, c, logits = self._slab(i)
      # Padded rows are zero, so the logits they meet add nothing below.
      q = tf.exp(logits + tf.gather(shift, rows)[:, None])
      if end is not None:
        col_shift = tf.concat([tf.fill([self.rows], -np.inf),
                               tf.gather(shift, cols[self.rows:end]),
                               pad_right], 0)
        q += tf.exp(logits + col_shift[None, :])
      dx = tf.tensor_scatter_nd_add(dx, rows[:, None], tf.matmul(q, c))
      return i + 1, tf.tensor_scatter_nd_add(
          dx, cols[:, None], tf.matmul(q, a, transpose_a=True))

    dx, = self._loop(body, [tf.zeros([self.padded, self.dim])])
    return dx[:self.n]


def _terms(anchors, contrast, ids, *, offset, temperature, summation,
           denominator, positives_cap, scale_by_temperature, block_size,
           class_sums, queue=None):
  """`blockwise_terms`; `class_sums=False` forces the masked kernel."""
  if block_size is not None and (isinstance(block_size, bool) or
                                 not isinstance(block_size, (int, np.integer))
                                 or block_size < 1):
    raise ValueError(f"block_size={block_size!r} must be a positive int "
                     "(anchor rows per block) or None (automatic).")
  same_tensor = anchors is contrast
  anchors = tf.cast(anchors, tf.float32)
  contrast = tf.cast(contrast, tf.float32)
  anchor_views, views, dim = anchors.shape[1], contrast.shape[1], (
      contrast.shape[2])
  batch, global_batch = _size(anchors), _size(contrast)
  cols = global_batch * views
  if block_size is None:
    block_size = auto_block_size(cols if isinstance(cols, int) else None)
  # The per-class sums need the whole positive set of a class, so no cap.
  class_sums = class_sums and queue is None and (
      summation == "out" and denominator == "all" and
      (positives_cap is None or ids is None))
  # One replica, every view an anchor: the logits are symmetric.
  symmetric = (class_sums and same_tensor and isinstance(cols, int) and
               _SymmetricSweeps.plan(cols, int(block_size))[1] >=
               MIN_SYMMETRIC_BLOCKS)
  per_block = max(1, int(block_size) // anchor_views)  # samples per block
  if isinstance(batch, int):  # no padding beyond the batch
    per_block = min(per_block, max(batch, 1))
  if symmetric:  # blocks of rows are planned by _SymmetricSweeps instead
    per_block, offset = max(batch, 1), 0
  rows = per_block * anchor_views
  num_blocks = (batch + per_block - 1) // per_block
  padded = num_blocks * per_block
  temperature = tf.cast(temperature, tf.float32)
  inv_tau = 1.0 / temperature
  scale = temperature if scale_by_temperature else tf.constant(1.0)
  offset = tf.cast(offset, tf.int32)

  # Per sample of the padded local batch: which class, how many positives.
  cls, rank, count = _class_stats(ids, global_batch)
  local = tf.range(padded)
  exists = local < batch
  sample = tf.where(exists, offset + local, 0)
  others = tf.gather(count, sample) - 1
  if positives_cap is not None:
    others = tf.minimum(others, positives_cap // views)
  num_pos = (views - 1) + views * others
  has_negative = tf.gather(count, sample) < global_batch
  if queue is not None:
    queue_x, queue_ids = tf.cast(queue[0], tf.float32), queue[1]
    queue_valid = queue_ids >= 0
    if ids is None:  # no queue row is a positive
      sample_id = tf.fill([padded], -2)
      queue_match = tf.zeros([padded], tf.int32)
    else:  # per sample, valid queue rows with its id, from sorted ids
      sample_id = tf.gather(tf.reshape(tf.cast(ids, tf.int32), [-1]), sample)
      sorted_ids = tf.sort(queue_ids)
      queue_match = (tf.searchsorted(sorted_ids, sample_id, "right") -
                     tf.searchsorted(sorted_ids, sample_id, "left"))
    # Budget of queue positives left after the batch's kept ones.
    queue_left = (queue_match if positives_cap is None else
                  tf.maximum(positives_cap - views * others, 0))
    num_pos += tf.minimum(queue_match, queue_left)
    has_negative |= (tf.reduce_sum(tf.cast(queue_valid, tf.int32)) -
                     queue_match) > 0
    _, queue_rank, _ = _class_stats(queue_ids, _size(queue_x))
  valid = exists & (num_pos > 0)
  if denominator == "only_negatives":
    valid &= has_negative
  # Anchors without a negative have loss 0 under one_positive: no gradient.
  graded = valid & has_negative if denominator == "one_positive" else valid
  weight = tf.cast(graded, tf.float32) * (scale * inv_tau / anchor_views)

  def per_row(x):  # [padded] -> [padded * anchor_views]
    return tf.reshape(tf.repeat(x[:, None], anchor_views, 1), [-1])

  row_valid = per_row(valid)
  row_weight = per_row(weight)
  row_sample = per_row(sample)
  row_class = tf.gather(cls, row_sample)
  row_self = tf.where(per_row(exists), row_sample * views + tf.tile(
      tf.range(anchor_views), [padded]), 0)
  row_pos = tf.cast(per_row(num_pos), tf.float32)
  row_inv_pos = 1.0 / tf.maximum(row_pos, 1.0)
  row_has_negative = per_row(has_negative)
  col_sample = tf.repeat(tf.range(global_batch), views)
  col_class = tf.gather(cls, col_sample)
  col_rank = tf.gather(rank, col_sample)
  col_index = tf.range(cols)

  def blocked(x):  # [padded * anchor_views, ...] -> [blocks, rows, ...]
    return tf.reshape(x, tf.concat([[num_blocks, rows], tf.shape(x)[1:]], 0))

  block_self = blocked(row_self)
  block_class = blocked(row_class)
  block_sample = blocked(row_sample)
  block_pos = blocked(row_pos)
  block_inv_pos = blocked(row_inv_pos)
  block_has_negative = blocked(row_has_negative)
  if queue is not None:
    block_id = blocked(per_row(sample_id))
    block_left = blocked(per_row(queue_left))
  all_cols = cols if queue is None else cols + _size(queue_x)

  def softmax_block(b, a, c, row_w, full):
    """Default mode: logsumexp, P C and P^T (w A) with P the softmax."""
    idx = tf.stack([tf.range(rows), block_self[b]], 1)
    logits = tf.matmul(a * inv_tau, c, transpose_b=True)
    logits = tf.tensor_scatter_nd_update(logits, idx, tf.fill([rows], _MIN))
    top = tf.reduce_max(logits, 1)
    probs = tf.nn.softmax(logits)
    # The largest probability is exp(0) / sum: no second pass for the sum.
    lse = top - tf.math.log(tf.reduce_max(probs, 1))
    dc = tf.matmul(probs, row_w[:, None] * a, transpose_a=True)
    if not full:
      return dc
    return lse, tf.matmul(probs, c), dc

  def masked_block(b, a, c, row_w, full):
    """Any mode: row loss, H C and H^T (w A) with masks from class ids."""
    logits = tf.matmul(a * inv_tau, c, transpose_b=True)
    not_self = tf.not_equal(col_index[None, :], block_self[b][:, None])
    same = tf.equal(block_class[b][:, None], col_class[None, :])
    if positives_cap is not None and ids is not None:
      sample_b = block_sample[b][:, None]
      own = tf.equal(sample_b, col_sample[None, :])
      # Same-class samples other than the anchor's, up to this column.
      seen = col_rank[None, :] + 1 - tf.cast(sample_b < col_sample[None, :],
                                             tf.int32)
      kept = own | (seen <= positives_cap // views)
      positive = same & kept & not_self
      in_all = not_self & (kept | ~same)
    else:
      positive = same & not_self
      in_all = not_self
    negative = ~same
    if queue is not None:  # one-view columns after the batch's
      q_same = tf.equal(block_id[b][:, None], queue_ids[None, :]) & (
          queue_valid[None, :])
      q_negative = queue_valid[None, :] & ~q_same
      if positives_cap is not None:
        q_same &= queue_rank[None, :] < block_left[b][:, None]
      positive = tf.concat([positive, q_same], 1)
      in_all = tf.concat([in_all, q_same | q_negative], 1)
      negative = tf.concat([negative, q_negative], 1)
    n = block_pos[b]
    inv_n = block_inv_pos[b][:, None]
    zero = tf.zeros_like(logits)
    if denominator in ("all", "only_negatives"):
      lse_d, probs_d = _masked_softmax(
          logits, in_all if denominator == "all" else negative)
      if summation == "out":
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
      if summation == "out":
        row_loss = -tf.reduce_sum(tf.where(positive, log_q, zero),
                                  1) * inv_n[:, 0]
        coef = tf.where(positive, not_q, zero) * inv_n
      else:
        lse_q, w = _masked_softmax(log_q, positive)
        row_loss = tf.math.log(tf.maximum(n, 1.0)) - lse_q
        coef = w * not_q
      h = probs_n * tf.reduce_sum(coef, 1, keepdims=True) - coef
      row_loss = tf.where(block_has_negative[b], row_loss, 0.0)
    dc = tf.matmul(h, row_w[:, None] * a, transpose_a=True)
    if not full:
      return dc
    return row_loss, tf.matmul(h, c), dc

  block_fn = softmax_block if class_sums else masked_block

  def run_blocks(a, c, row_w, full):
    """Loops over blocks; returns row values, row matrices and dC."""
    a_blocks = blocked(a)
    w_blocks = blocked(row_w)

    def body(b, dc, *arrays):
      out = block_fn(b, a_blocks[b], c, w_blocks[b], full)
      if not full:
        return b + 1, dc + out
      return (b + 1, dc + out[2], arrays[0].write(b, out[0]),
              arrays[1].write(b, out[1]))

    arrays = []
    if full:
      arrays = [tf.TensorArray(tf.float32, num_blocks, element_shape=[rows]),
                tf.TensorArray(tf.float32, num_blocks,
                               element_shape=[rows, dim])]
    # One block at a time: parallel iterations would multiply the memory.
    result = tf.while_loop(
        lambda b, *_: b < num_blocks, body,
        [tf.constant(0), tf.zeros([all_cols, dim])] + arrays,
        parallel_iterations=1)
    if not full:
      return result[1]
    return (tf.reshape(result[2].stack(), [-1]),
            tf.reshape(result[3].stack(), [-1, dim]), result[1])

  if symmetric:

    @tf.custom_gradient
    def symmetric_loss_fn(features):
      x = tf.reshape(features, [cols, dim])
      sweeps = _SymmetricSweeps(x, inv_tau, int(block_size))
      per_class = tf.math.unsorted_segment_sum(x, row_class, global_batch)
      positives = tf.gather(per_class, row_class) - x
      row_loss = sweeps.logsumexp() - tf.reduce_sum(x * positives, 1) * (
          inv_tau * row_inv_pos)
      row_loss = tf.where(row_valid, row_loss, 0.0)
      loss = tf.reduce_sum(tf.reshape(row_loss, [batch, views]), 1) * (
          scale / views)

      def grad(dloss):
        row_w = per_row(tf.cast(dloss, tf.float32)) * row_weight
        wa = (row_w * row_inv_pos)[:, None] * x
        # Positive terms, anchor side then contrast side (pos is symmetric).
        dx = sweeps.gradient(row_w) - positives * (row_w * row_inv_pos)[
            :, None] + wa - tf.gather(
                tf.math.unsorted_segment_sum(wa, row_class, global_batch),
                row_class)
        return tf.reshape(dx, tf.shape(features))

      return loss, grad

    return symmetric_loss_fn(anchors), valid

  def flat_anchors(x):
    x = tf.reshape(x, [-1, dim])
    return tf.pad(x, [[0, (padded - batch) * anchor_views], [0, 0]])

  @tf.custom_gradient
  def loss_fn(anchors, contrast):
    a = flat_anchors(anchors)
    c = tf.reshape(contrast, [cols, dim])
    if queue is not None:  # constant columns: their gradient is dropped
      c = tf.concat([c, tf.stop_gradient(queue_x)], 0)
    if class_sums:
      per_class = tf.math.unsorted_segment_sum(c, col_class, global_batch)
      positives = tf.gather(per_class, row_class) - tf.gather(c, row_self)
      lse, probs_c, dc_probs = run_blocks(a, c, row_weight, True)
      row_loss = lse - tf.reduce_sum(a * positives, 1) * (inv_tau *
                                                          row_inv_pos)
      hc = probs_c - positives * row_inv_pos[:, None]

      def contrast_grad(row_w, dc_probs):
        wa = (row_w * row_inv_pos)[:, None] * a
        return (dc_probs + tf.scatter_nd(row_self[:, None], wa, [cols, dim]) -
                tf.gather(tf.math.unsorted_segment_sum(wa, row_class,
                                                       global_batch),
                          col_class))
    else:
      row_loss, hc, dc_probs = run_blocks(a, c, row_weight, True)

      def contrast_grad(row_w, dc_h):
        del row_w
        return dc_h
    row_loss = tf.where(row_valid, row_loss, 0.0)
    loss = tf.reduce_sum(tf.reshape(row_loss, [padded, anchor_views]), 1) * (
        scale / anchor_views)
    da_fused = row_weight[:, None] * hc
    dc_fused = contrast_grad(row_weight, dc_probs)

    def grad(dloss):
      dy = tf.pad(tf.cast(dloss, tf.float32), [[0, padded - batch]])
      ref = tf.reduce_max(tf.where(graded, dy, -np.inf))
      ref = tf.where(tf.reduce_any(graded), ref, 0.0)
      uniform = tf.reduce_all(~graded | tf.equal(dy, ref))

      def weighted():
        row_w = per_row(dy) * row_weight
        return (row_w[:, None] * hc,
                contrast_grad(row_w, run_blocks(a, c, row_w, False)))

      da, dc = tf.cond(uniform, lambda: (ref * da_fused, ref * dc_fused),
                       weighted)
      da = tf.reshape(da[:batch * anchor_views], tf.shape(anchors))
      return da, tf.reshape(dc[:cols], tf.shape(contrast))

    return loss[:batch], grad

  return loss_fn(anchors, contrast), valid[:batch]
