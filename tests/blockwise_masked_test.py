"""Tests for supcon_tf.blockwise_masked: the masked kernel of one block.

`masked_block` on the plans `supcon_tf.blockwise` makes, against the float64
NumPy reference of `supcon_reference.py`: each row's loss, and its gradient
rows `H` (central differences of the reference row loss in the logits)
through `H C` and `H^T (w A)`.
"""

import itertools
import sys

import numpy as np
import pytest
import tensorflow as tf

import supcon_reference as ref
from supcon_tf import blockwise
from supcon_tf import blockwise_masked

SUMMATIONS = ("out", "in")
DENOMINATORS = ("all", "one_positive", "only_negatives")
MODES = list(itertools.product(SUMMATIONS, DENOMINATORS))
# Class 0 has three samples (so caps bite), sample 3 is alone in class 2.
LABELS = np.array([0, 1, 0, 2, 1, 0])
QUEUE_LABELS = np.array([1, -1, 0, 5])  # A class mate, an empty slot, ...


def _features(batch, views, dim=4, seed=0, norm=1.0):
  x = np.random.default_rng(seed).normal(size=(batch, views, dim))
  return norm * x / np.linalg.norm(x, axis=-1, keepdims=True)


def _run_blocks(x, labels, *, anchor_views, summation, denominator,
                positives_cap=None, queue=None, block_size=4,
                temperature=0.5, row_w=None):
  """Every block of `masked_block`, concatenated, and what it was given.

  Returns a dict: `row_loss`, `hc` `[padded rows, ...]`, `dc`, the padded
  anchors `a`, columns `c`, row weights `w` (random on graded rows, 0
  elsewhere, unless `row_w` is given), and the plan's `graded` rows.
  """
  batch, _, dim = x.shape
  anchors = tf.constant(x[:, :anchor_views], tf.float32)
  contrast = tf.constant(x, tf.float32)
  ids = None if labels is None else tf.constant(labels, tf.int32)
  queue_tensors = None if queue is None else (
      tf.constant(queue[0], tf.float32), tf.constant(queue[1], tf.int32))
  plan = blockwise._Plan(
      anchors, contrast, ids, offset=0,
      temperature=temperature, summation=summation, denominator=denominator,
      positives_cap=positives_cap, scale_by_temperature=True,
      block_size=block_size, class_sums=False, queue=queue_tensors)
  a = tf.pad(tf.reshape(anchors, [-1, dim]),
             [[0, (plan.padded - batch) * anchor_views], [0, 0]])
  c = tf.reshape(contrast, [-1, dim])
  if queue is not None:
    c = tf.concat([c, queue_tensors[0]], 0)
  graded = plan.per_row(plan.graded).numpy()
  if row_w is None:
    row_w = np.random.default_rng(1).uniform(0.5, 1.5, len(graded)) * graded
  out = {"row_loss": [], "hc": [], "dc": 0.0}
  for b in range(plan.num_blocks):
    rows = slice(b * plan.rows, (b + 1) * plan.rows)
    w = tf.constant(row_w[rows], tf.float32)
    row_loss, hc, dc = blockwise_masked.masked_block(plan, b, a[rows], c, w,
                                                     True)
    np.testing.assert_allclose(
        blockwise_masked.masked_block(plan, b, a[rows], c, w, False), dc,
        rtol=1e-6, atol=1e-7)
    out["row_loss"].append(row_loss.numpy())
    out["hc"].append(hc.numpy())
    out["dc"] += dc.numpy()
  out["row_loss"] = np.concatenate(out["row_loss"])
  out["hc"] = np.concatenate(out["hc"])
  out.update(a=a.numpy().astype(np.float64), c=c.numpy().astype(np.float64),
             w=row_w, graded=graded, num_blocks=plan.num_blocks)
  return out


def _reference(got, labels, views, *, anchor_views, summation, denominator,
               positives_cap=None, queue=None, temperature=0.5):
  """Row losses, validity and gradient rows `H` of the real anchor rows."""
  real = len(LABELS) * anchor_views
  logits = got["a"][:real] @ got["c"].T / temperature
  positive, negative = ref.reference_masks(
      len(LABELS), views, labels, anchor_views=anchor_views,
      positives_cap=positives_cap,
      queue_labels=None if queue is None else queue[1])
  modes = dict(summation=summation, denominator=denominator)
  loss, valid = ref.row_losses(logits, positive, negative, **modes)
  h = np.zeros_like(logits)
  for r in range(real):
    h[r] = ref.numeric_gradient(lambda row, r=r: ref.row_losses(
        row[None], positive[r:r + 1], negative[r:r + 1], **modes)[0][0],
                                logits[r])
  return loss, valid, h


# (views, anchor_views, positives_cap, labels, queue, block_size)
CASES = [
    (2, 2, None, LABELS, False, 4),
    (2, 1, None, LABELS, False, 2),  # contrast_mode="one"
    (3, 3, 3, LABELS, False, 5),  # one class mate of two kept
    (2, 2, 4, LABELS, True, 3),  # class 0 has no queue budget left
    (2, 2, None, None, True, 64),  # SimCLR with a queue, one block
    (1, 1, None, LABELS, False, 4),  # no positive for 3; padded rows
]


@pytest.mark.parametrize("summation,denominator", MODES)
def test_rows_and_gradient_rows_match_float64_reference(summation,
                                                         denominator):
  for case in CASES:
    views, anchor_views, cap, labels, with_queue, block_size = case
    x = _features(len(LABELS), views, seed=views)
    queue = (_features(4, 1, seed=9)[:, 0], QUEUE_LABELS) if (
        with_queue) else None
    kwargs = dict(anchor_views=anchor_views, summation=summation,
                  denominator=denominator, positives_cap=cap, queue=queue)
    got = _run_blocks(x, labels, block_size=block_size, **kwargs)
    loss, valid, h = _reference(got, labels, views, **kwargs)
    real = len(loss)
    graded = got["graded"][:real]
    context = f"case={case}"
    assert not got["graded"][real:].any(), context  # padded rows
    # Every row here has a negative, so one_positive grades the valid rows.
    np.testing.assert_array_equal(graded, valid, err_msg=context)
    np.testing.assert_allclose(got["row_loss"][:real][valid], loss[valid],
                               rtol=1e-5, atol=1e-6, err_msg=context)
    np.testing.assert_allclose(got["hc"][:real][graded],
                               (h @ got["c"])[graded], rtol=1e-4, atol=1e-5,
                               err_msg=context)
    w = got["w"][:real, None]
    ref.assert_close_to_scale(got["dc"], h.T @ (w * got["a"][:real]))


def test_cases_use_several_blocks_and_skip_rows():
  x = _features(len(LABELS), 1, seed=1)
  got = _run_blocks(x, LABELS, anchor_views=1, summation="out",
                    denominator="all")
  assert got["num_blocks"] == 2 and len(got["row_loss"]) == 8
  np.testing.assert_array_equal(got["graded"],
                                [1, 1, 1, 0, 1, 1, 0, 0])


@pytest.mark.parametrize("summation,denominator", MODES)
def test_extreme_logits_stay_finite_and_exact(summation, denominator):
  # |logits| up to 9 / 0.01 = 900: exp() of them overflows float32.
  x = _features(len(LABELS), 2, seed=5, norm=3.0)
  kwargs = dict(anchor_views=2, summation=summation, denominator=denominator,
                temperature=0.01)
  got = _run_blocks(x, LABELS, **kwargs)
  for name in ("row_loss", "hc", "dc"):
    assert np.all(np.isfinite(got[name])), name
  loss, valid, h = _reference(got, LABELS, 2, **kwargs)
  real = len(loss)
  ref.assert_close_to_scale(got["row_loss"][:real][valid], loss[valid],
                            tol=1e-5)
  ref.assert_close_to_scale(got["hc"][:real], h @ got["c"], tol=1e-3)


@pytest.mark.parametrize("summation,denominator", MODES)
def test_rows_with_nothing_kept_stay_finite(summation, denominator):
  # One class: no negatives anywhere (only_negatives keeps no column). The
  # loss multiplies H by zero weights there, and 0 * NaN would be NaN.
  x = _features(4, 2, seed=6)
  got = _run_blocks(x, np.zeros(4, np.int64), anchor_views=2,
                    summation=summation, denominator=denominator,
                    row_w=np.ones(8))
  for name in ("row_loss", "hc", "dc"):
    assert np.all(np.isfinite(got[name])), name
  assert blockwise_masked.MASKED_LOGIT == np.finfo(np.float32).min


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
