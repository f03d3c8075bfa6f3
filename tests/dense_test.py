"""Tests for supcon_tf.dense: the whole-matrix SupCon loss and its masks.

Checked against the float64 NumPy reference of `supcon_reference.py`:
values, validity and gradients (central differences of the reference).
"""

import itertools
import sys

import numpy as np
import pytest
import tensorflow as tf

import supcon_reference as ref
from supcon_tf import dense

SUMMATIONS = ("out", "in")
DENOMINATORS = ("all", "one_positive", "only_negatives")
# Class 0 has three samples (so caps bite), sample 3 is alone in class 2.
LABELS = np.array([0, 1, 0, 2, 1, 0])


def _features(batch, views, dim=4, seed=0, norm=1.0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, views, dim))
  return norm * x / np.linalg.norm(x, axis=-1, keepdims=True)


def _dense(x, labels=None, *, anchor_views=None, offset=0, local=None,
           temperature=0.1, summation="out", denominator="all",
           positives_cap=None, scale_by_temperature=True, queue=None,
           weights=None):
  """`(loss, valid, d sum(weights * loss) / d x)` of `dense_terms`."""
  x = tf.constant(x, tf.float32)
  global_batch, views = x.shape[0], x.shape[1]
  anchor_views = views if anchor_views is None else anchor_views
  local = global_batch - offset if local is None else local
  ids = None if labels is None else tf.constant(labels, tf.int32)
  weights = np.ones(local) if weights is None else weights
  with tf.GradientTape() as tape:
    tape.watch(x)
    same = dense.same_sample_or_label(ids, None, local, global_batch, offset)
    queue_tensors = queue_positive = None
    if queue is not None:
      queue_tensors = (tf.constant(queue[0], tf.float32),
                       tf.constant(queue[1], tf.int32))
      queue_positive = dense.queue_match(ids, offset, local, queue_tensors[1])
    loss, valid = dense.dense_terms(
        x[offset:offset + local, :anchor_views], x, same, offset,
        temperature, summation, denominator, positives_cap,
        scale_by_temperature, queue_tensors, queue_positive)
    total = tf.reduce_sum(loss * tf.constant(weights, tf.float32))
  return loss.numpy(), valid.numpy(), tape.gradient(total, x).numpy()


def _reference(x, labels=None, weights=None, **kwargs):
  """`(loss, valid, gradient)` of the float64 reference, as `_dense`."""
  loss, valid = ref.reference_loss(x, labels, **kwargs)
  weights = np.ones(len(loss)) if weights is None else weights
  grad = ref.numeric_gradient(
      lambda z: float(np.sum(weights * ref.reference_loss(z, labels,
                                                          **kwargs)[0])), x)
  return loss, valid, grad


def test_same_sample_or_label_by_hand():
  labels = tf.constant([3, 1, 3, 2])
  got = dense.same_sample_or_label(labels, None, 2, 4, 1)  # samples 1, 2
  np.testing.assert_array_equal(got, [[0, 1, 0, 0], [1, 0, 1, 0]])
  multi_hot = tf.constant([[1, 0], [1, 1], [0, 1], [0, 0]]) > 0
  got = dense.same_sample_or_label(multi_hot, None, 4, 4, 0)
  # A sample without labels shares none, but is its own positive.
  np.testing.assert_array_equal(got, [[1, 1, 0, 0], [1, 1, 1, 0],
                                      [0, 1, 1, 0], [0, 0, 0, 1]])
  mask = tf.constant([[False, False, True, False]] * 2)
  got = dense.same_sample_or_label(None, mask, 2, 4, 0)
  np.testing.assert_array_equal(got, [[1, 0, 1, 0], [0, 1, 1, 0]])
  got = dense.same_sample_or_label(None, None, 2, 4, 2)
  np.testing.assert_array_equal(got, [[0, 0, 1, 0], [0, 0, 0, 1]])


def test_queue_match_by_hand():
  queue_labels = tf.constant([1, -1, 2, 1, 0])
  got = dense.queue_match(tf.constant([0, 1, 2]), 1, 2, queue_labels)
  np.testing.assert_array_equal(got, [[1, 0, 0, 1, 0], [0, 0, 1, 0, 0]])
  got = dense.queue_match(None, 0, 2, queue_labels)
  assert got.shape == (2, 5) and not np.any(got)


# (views, anchor_views, positives_cap, labels, offset, local, queue)
CASES = [
    (2, 2, None, LABELS, 0, None, False),
    (2, 1, None, LABELS, 0, None, False),  # contrast_mode="one"
    (3, 3, 3, LABELS, 0, None, False),  # one class mate of two kept
    (1, 1, None, LABELS, 0, None, False),  # sample 3 has no positive
    (2, 2, None, None, 0, None, False),  # SimCLR
    (2, 2, None, LABELS, 2, 2, False),  # one replica's rows
    (2, 2, 4, LABELS, 0, None, True),  # class 0 has no queue budget left
    (2, 1, None, None, 1, 3, True),  # SimCLR: the queue is all negatives
]


@pytest.mark.parametrize("summation,denominator",
                         list(itertools.product(SUMMATIONS, DENOMINATORS)))
def test_matches_float64_reference(summation, denominator):
  rng = np.random.default_rng(3)
  for case in CASES:
    views, anchor_views, cap, labels, offset, local, with_queue = case
    x = _features(len(LABELS), views, seed=views)
    queue = None
    if with_queue:  # one empty slot, class mates and strangers
      queue = (_features(4, 1, seed=9)[:, 0], np.array([1, -1, 0, 5]))
    kwargs = dict(anchor_views=anchor_views, offset=offset, local=local,
                  temperature=0.5, summation=summation,
                  denominator=denominator, positives_cap=cap, queue=queue)
    rows = (local or len(LABELS) - offset)
    weights = rng.uniform(0.5, 1.5, rows)
    got = _dense(x, labels, weights=weights, **kwargs)
    want = _reference(x, labels, weights=weights, **kwargs)
    context = f"case={case}"
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6,
                               err_msg=context)
    np.testing.assert_array_equal(got[1], want[1], err_msg=context)
    ref.assert_close_to_scale(got[2], want[2], tol=1e-4)


def test_reference_cases_hold_invalid_and_capped_rows():
  # CASES must hold a row without positives and capped-away positives, or
  # they could not catch a wrong mask.
  positive, _ = ref.reference_masks(6, 1, LABELS)
  assert not positive[3].any()
  positive, negative = ref.reference_masks(6, 3, LABELS, positives_cap=3)
  # Anchor 0 keeps sample 2; its own column and sample 5's are in neither.
  assert np.flatnonzero(~positive[0] & ~negative[0]).tolist() == [
      0, 15, 16, 17]
  positive, negative = ref.reference_masks(
      6, 2, LABELS, positives_cap=4, queue_labels=[1, -1, 0, 5])
  assert not positive[0, 14] and not negative[0, 14]
  assert positive[2, 12]  # Class 1 keeps one mate: its queue row fits.


@pytest.mark.parametrize("summation,denominator",
                         list(itertools.product(SUMMATIONS, DENOMINATORS)))
def test_extreme_logits_stay_finite_and_exact(summation, denominator):
  # |logits| up to 16 / 0.02 = 800: exp() of them overflows float32.
  x = _features(len(LABELS), 2, seed=5, norm=4.0)
  kwargs = dict(temperature=0.02, summation=summation,
                denominator=denominator)
  loss, valid, grad = _dense(x, LABELS, **kwargs)
  assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))
  want = _reference(x, LABELS, **kwargs)
  np.testing.assert_array_equal(valid, want[1])
  ref.assert_close_to_scale(loss, want[0], tol=1e-5)
  ref.assert_close_to_scale(grad, want[2], tol=1e-3)


@pytest.mark.parametrize("summation,denominator",
                         list(itertools.product(SUMMATIONS, DENOMINATORS)))
def test_one_class_has_no_negatives(summation, denominator):
  x = _features(4, 2, seed=6)
  one_class = np.zeros(4, np.int64)
  loss, valid, grad = _dense(x, one_class, summation=summation,
                             denominator=denominator)
  assert np.all(np.isfinite(grad))
  if denominator == "only_negatives":  # no term at all: no loss, no grad
    assert not valid.any()
    np.testing.assert_array_equal(loss, 0.0)
    np.testing.assert_array_equal(grad, 0.0)
  else:
    assert valid.all()
    want = _reference(x, one_class, summation=summation,
                      denominator=denominator)
    np.testing.assert_allclose(loss, want[0], rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
