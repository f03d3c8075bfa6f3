"""The SupCon loss in blocks of anchor rows, with a closed-form gradient.

The dense formulation (`supcon_tf.dense`) holds several
`[anchor_rows, contrast_rows]` float32 matrices at once; at 16,384 rows each
is 1 GiB. Here anchor rows are processed `block_size` at a time inside a
`tf.while_loop`: only the logits of the current block exist, the positive /
negative masks are built per block from class ids and sample indices, and the
gradient is written in closed form inside a `tf.custom_gradient` (no autodiff
through the loop, nothing of size rows^2 kept for the backward pass). Peak
memory is O(block * contrast_rows + rows * dim).

The gradient of an anchor row's loss with respect to its logits is a row
`H_r` in closed form for every mode (`supcon_tf.blockwise_masked` lists
them). For the default mode (out, all, no cap), `H = softmax_{P+N} - [P] /
n`, the `[P] / n` terms are handled with per-class sums of embeddings
(O(rows * dim)), so a block needs only its logits, one softmax and the
gradient products.

Two kernels, by case; matmul-sized products (`[block, contrast_rows] x
[.., dim]`) per block of anchor rows:

* Fused (default mode). Every upstream gradient of the per-sample loss
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
* Masked (every other mode, positive caps, a queue): as fused, with the
  masks and `H` built per block (`supcon_tf.blockwise_masked`).

One replica's logits are symmetric when every view is an anchor, but a
kernel that computed each tile once for its rows and its columns lost to
the fused one (1.25-1.5x its time on an AMX Xeon, experiments/RESULTS.md),
so the fused kernel serves that case too.

With `distributed.all_gather` contrast the contrast gradient flows back
through the gather, so summed per-replica gradients equal the single-device
ones. Not differentiable twice.
"""

import functools

import numpy as np
import tensorflow as tf

from supcon_tf import blockwise_masked as masked_lib

# Above this many anchor x contrast logits `supcon_terms` switches to blocks
# (already faster than the dense path at 1024 x 1024 on CPU).
AUTO_MIN_LOGITS = 1024 * 1024
# Automatic block: about this many logits per block (16 MiB of float32).
BLOCK_LOGITS = 1 << 22
DEFAULT_BLOCK_ROWS = 256

_MIN = masked_lib.MASKED_LOGIT


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
      (`anchor_views == 1`). Any float dtype; computed in float32. May be
      the `contrast` tensor itself (one replica, every view an anchor; then
      `offset` is 0).
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


def _check_block_size(block_size):
  if block_size is not None and (isinstance(block_size, bool) or
                                 not isinstance(block_size, (int, np.integer))
                                 or block_size < 1):
    raise ValueError(f"block_size={block_size!r} must be a positive int "
                     "(anchor rows per block) or None (automatic).")


def _terms(anchors, contrast, ids, *, offset, temperature, summation,
           denominator, positives_cap, scale_by_temperature, block_size,
           class_sums, queue=None):
  """`blockwise_terms`; `class_sums=False` forces the masked kernel."""
  _check_block_size(block_size)
  anchors = tf.cast(anchors, tf.float32)
  contrast = tf.cast(contrast, tf.float32)
  plan = _Plan(anchors, contrast, ids, offset=offset, temperature=temperature,
               summation=summation, denominator=denominator,
               positives_cap=positives_cap,
               scale_by_temperature=scale_by_temperature,
               block_size=block_size, class_sums=class_sums, queue=queue)
  return plan.loss(anchors, contrast), plan.valid[:plan.batch]


class _Plan:
  """Sizes, kernel choice, per-row statistics and the kernels of one call.

  Rows are the local anchors, `anchor_views` per sample (sample-major),
  padded to whole blocks of `per_block` samples; columns are the contrast's
  `views` per sample, then the queue's rows. `row_*` arrays are `[padded *
  anchor_views]`, `col_*` arrays `[global_batch * views]`, `block_*` arrays
  `[num_blocks, rows, ...]`.
  """

  def __init__(self, anchors, contrast, ids, *, offset, temperature,
               summation, denominator, positives_cap, scale_by_temperature,
               block_size, class_sums, queue):
    self.summation, self.denominator = summation, denominator
    self.positives_cap, self.supervised = positives_cap, ids is not None
    self.anchor_views, self.views = anchors.shape[1], contrast.shape[1]
    self.dim = contrast.shape[2]
    self.batch, self.global_batch = _size(anchors), _size(contrast)
    self.cols = cols = self.global_batch * self.views
    if block_size is None:
      block_size = auto_block_size(cols if isinstance(cols, int) else None)
    self.block_size = int(block_size)
    # The per-class sums need the whole positive set of a class, so no cap.
    self.class_sums = class_sums and queue is None and (
        summation == "out" and denominator == "all" and
        (positives_cap is None or ids is None))
    # Samples per block.
    per_block = max(1, self.block_size // self.anchor_views)
    if isinstance(self.batch, int):  # no padding beyond the batch
      per_block = min(per_block, max(self.batch, 1))
    self.rows = per_block * self.anchor_views
    self.num_blocks = (self.batch + per_block - 1) // per_block
    self.padded = self.num_blocks * per_block
    temperature = tf.cast(temperature, tf.float32)
    self.inv_tau = 1.0 / temperature
    self.scale = temperature if scale_by_temperature else tf.constant(1.0)
    self._sample_stats(ids, tf.cast(offset, tf.int32), queue)
    self._row_stats()

  def _sample_stats(self, ids, offset, queue):
    """Per sample of the padded local batch: which class, how many positives.
    """
    views, cap = self.views, self.positives_cap
    self.cls, self.rank, count = _class_stats(ids, self.global_batch)
    local = tf.range(self.padded)
    self.exists = local < self.batch
    self.sample = tf.where(self.exists, offset + local, 0)
    others = tf.gather(count, self.sample) - 1
    if cap is not None:
      others = tf.minimum(others, cap // views)
    self.num_pos = (views - 1) + views * others
    self.has_negative = tf.gather(count, self.sample) < self.global_batch
    self.queue = queue
    if queue is not None:
      self._queue_stats(ids, others)
    self.valid = self.exists & (self.num_pos > 0)
    if self.denominator == "only_negatives":
      self.valid &= self.has_negative
    # Anchors without a negative have loss 0 under one_positive: no gradient.
    self.graded = self.valid & self.has_negative if (
        self.denominator == "one_positive") else self.valid
    self.weight = tf.cast(self.graded, tf.float32) * (
        self.scale * self.inv_tau / self.anchor_views)

  def _queue_stats(self, ids, others):
    """Adds the queue's positives and negatives to the sample statistics."""
    queue_x, self.queue_ids = self.queue
    self.queue_x = tf.cast(queue_x, tf.float32)
    self.queue_valid = self.queue_ids >= 0
    if ids is None:  # no queue row is a positive
      self.sample_id = tf.fill([self.padded], -2)
      queue_match = tf.zeros([self.padded], tf.int32)
    else:  # per sample, valid queue rows with its id, from sorted ids
      self.sample_id = tf.gather(tf.reshape(tf.cast(ids, tf.int32), [-1]),
                                 self.sample)
      sorted_ids = tf.sort(self.queue_ids)
      queue_match = (tf.searchsorted(sorted_ids, self.sample_id, "right") -
                     tf.searchsorted(sorted_ids, self.sample_id, "left"))
    # Budget of queue positives left after the batch's kept ones.
    self.queue_left = (queue_match if self.positives_cap is None else
                       tf.maximum(self.positives_cap - self.views * others,
                                  0))
    self.num_pos += tf.minimum(queue_match, self.queue_left)
    self.has_negative |= (tf.reduce_sum(tf.cast(self.queue_valid, tf.int32)) -
                          queue_match) > 0
    _, self.queue_rank, _ = _class_stats(self.queue_ids, _size(self.queue_x))

  def per_row(self, x):
    """`[padded]` -> `[padded * anchor_views]`."""
    return tf.reshape(tf.repeat(x[:, None], self.anchor_views, 1), [-1])

  def blocked(self, x):
    """`[padded * anchor_views, ...]` -> `[num_blocks, rows, ...]`."""
    return tf.reshape(x, tf.concat([[self.num_blocks, self.rows],
                                    tf.shape(x)[1:]], 0))

  def _row_stats(self):
    per_row, blocked = self.per_row, self.blocked
    self.row_valid = per_row(self.valid)
    self.row_weight = per_row(self.weight)
    row_sample = per_row(self.sample)
    self.row_class = tf.gather(self.cls, row_sample)
    self.row_self = tf.where(per_row(self.exists), row_sample * self.views +
                             tf.tile(tf.range(self.anchor_views),
                                     [self.padded]), 0)
    row_pos = tf.cast(per_row(self.num_pos), tf.float32)
    self.row_inv_pos = 1.0 / tf.maximum(row_pos, 1.0)
    self.col_sample = tf.repeat(tf.range(self.global_batch), self.views)
    self.col_class = tf.gather(self.cls, self.col_sample)
    self.col_rank = tf.gather(self.rank, self.col_sample)
    self.col_index = tf.range(self.cols)
    self.block_self = blocked(self.row_self)
    self.block_class = blocked(self.row_class)
    self.block_sample = blocked(row_sample)
    self.block_pos = blocked(row_pos)
    self.block_inv_pos = blocked(self.row_inv_pos)
    self.block_has_negative = blocked(per_row(self.has_negative))
    self.all_cols = self.cols
    if self.queue is not None:
      self.block_id = blocked(per_row(self.sample_id))
      self.block_left = blocked(per_row(self.queue_left))
      self.all_cols = self.cols + _size(self.queue_x)

  def softmax_block(self, b, a, c, row_w, full):
    """Default mode: logsumexp, P C and P^T (w A) with P the softmax."""
    rows = self.rows
    idx = tf.stack([tf.range(rows), self.block_self[b]], 1)
    logits = tf.matmul(a * self.inv_tau, c, transpose_b=True)
    logits = tf.tensor_scatter_nd_update(logits, idx, tf.fill([rows], _MIN))
    top = tf.reduce_max(logits, 1)
    probs = tf.nn.softmax(logits)
    # The largest probability is exp(0) / sum: no second pass for the sum.
    lse = top - tf.math.log(tf.reduce_max(probs, 1))
    dc = tf.matmul(probs, row_w[:, None] * a, transpose_a=True)
    if not full:
      return dc
    return lse, tf.matmul(probs, c), dc

  def run_blocks(self, a, c, row_w, full):
    """Loops over blocks; returns row values, row matrices and dC."""
    block_fn = self.softmax_block if self.class_sums else functools.partial(
        masked_lib.masked_block, self)
    num_blocks, rows, dim = self.num_blocks, self.rows, self.dim
    a_blocks = self.blocked(a)
    w_blocks = self.blocked(row_w)

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
        [tf.constant(0), tf.zeros([self.all_cols, dim])] + arrays,
        parallel_iterations=1)
    if not full:
      return result[1]
    return (tf.reshape(result[2].stack(), [-1]),
            tf.reshape(result[3].stack(), [-1, dim]), result[1])

  def loss(self, anchors, contrast):
    """`[batch]` losses of the fused or masked kernel (closed-form grad)."""
    batch, padded, cols, dim = self.batch, self.padded, self.cols, self.dim
    anchor_views, row_weight = self.anchor_views, self.row_weight

    @tf.custom_gradient
    def loss_fn(anchors, contrast):
      a = tf.pad(tf.reshape(anchors, [-1, dim]),
                 [[0, (padded - batch) * anchor_views], [0, 0]])
      c = tf.reshape(contrast, [cols, dim])
      if self.queue is not None:  # constant columns: their gradient dropped
        c = tf.concat([c, tf.stop_gradient(self.queue_x)], 0)
      row_loss, hc, dc_rows, contrast_grad = self._rows_and_grads(a, c)
      row_loss = tf.where(self.row_valid, row_loss, 0.0)
      loss = tf.reduce_sum(tf.reshape(row_loss, [padded, anchor_views]),
                           1) * (self.scale / anchor_views)
      da_fused = row_weight[:, None] * hc
      dc_fused = contrast_grad(row_weight, dc_rows)

      def grad(dloss):
        dy = tf.pad(tf.cast(dloss, tf.float32), [[0, padded - batch]])
        graded = self.graded
        ref = tf.reduce_max(tf.where(graded, dy, -np.inf))
        ref = tf.where(tf.reduce_any(graded), ref, 0.0)
        uniform = tf.reduce_all(~graded | tf.equal(dy, ref))

        def weighted():
          row_w = self.per_row(dy) * row_weight
          return (row_w[:, None] * hc,
                  contrast_grad(row_w, self.run_blocks(a, c, row_w, False)))

        da, dc = tf.cond(uniform, lambda: (ref * da_fused, ref * dc_fused),
                         weighted)
        da = tf.reshape(da[:batch * anchor_views], tf.shape(anchors))
        return da, tf.reshape(dc[:cols], tf.shape(contrast))

      return loss[:batch], grad

    return loss_fn(anchors, contrast)

  def _rows_and_grads(self, a, c):
    """Row losses, `H C`, the blocks' dC and the contrast gradient's form.

    Returns `(row_loss, hc, dc_rows, contrast_grad)` where
    `contrast_grad(row_w, dc_rows)` completes the gradient of the contrast
    rows (the class-sum terms of the fused kernel; nothing for the masked).
    """
    if not self.class_sums:
      row_loss, hc, dc_h = self.run_blocks(a, c, self.row_weight, True)
      return row_loss, hc, dc_h, lambda row_w, dc_h: dc_h
    cols, dim, row_class = self.cols, self.dim, self.row_class
    row_self, row_inv_pos = self.row_self, self.row_inv_pos
    per_class = tf.math.unsorted_segment_sum(c, self.col_class,
                                             self.global_batch)
    positives = tf.gather(per_class, row_class) - tf.gather(c, row_self)
    lse, probs_c, dc_probs = self.run_blocks(a, c, self.row_weight, True)
    row_loss = lse - tf.reduce_sum(a * positives, 1) * (self.inv_tau *
                                                        row_inv_pos)
    hc = probs_c - positives * row_inv_pos[:, None]

    def contrast_grad(row_w, dc_probs):
      wa = (row_w * row_inv_pos)[:, None] * a
      return (dc_probs + tf.scatter_nd(row_self[:, None], wa, [cols, dim]) -
              tf.gather(tf.math.unsorted_segment_sum(wa, row_class,
                                                     self.global_batch),
                        self.col_class))

    return row_loss, hc, dc_probs, contrast_grad
