"""Tests for supcon_tf.blockwise_symmetric: the symmetric-logits kernel.

`SymmetricSweeps` against TensorFlow's dense logsumexp and autodiff, and
`symmetric_loss` against the float64 NumPy reference of
`supcon_reference.py` and `supcon_tf.dense`.
"""

import sys

import numpy as np
import pytest
import tensorflow as tf

import supcon_reference as ref
from supcon_tf import blockwise_symmetric
from supcon_tf import dense

TOL = 1e-5
LABELS = np.array([0, 1, 0, 2, 1, 0, 3])  # Samples 3 and 6: no class mates.


@pytest.mark.parametrize("n", [2, 3, 7, 8, 12, 33])
def test_symmetric_sweeps(n):
  # Every block plan: one block, odd and even block counts, padded rows.
  rng = np.random.default_rng(n)
  x = tf.constant(rng.normal(size=(n, 6)).astype(np.float32))
  weights = rng.uniform(size=n).astype(np.float32)
  weights[rng.uniform(size=n) < 0.2] = 0.0
  with tf.GradientTape() as tape:
    tape.watch(x)
    logits = tf.matmul(x, x, transpose_b=True) * 3.0
    logits = tf.where(tf.eye(n, dtype=tf.bool), -np.inf, logits)
    want = tf.reduce_logsumexp(logits, 1)
    total = tf.reduce_sum(want * weights)
  want_grad = tape.gradient(total, x).numpy() / 3.0
  for block in (1, 2, 3, 4, 5, 64):
    sweeps = blockwise_symmetric.SymmetricSweeps(x, 3.0, block)
    np.testing.assert_allclose(sweeps.logsumexp(), want, rtol=TOL)
    np.testing.assert_allclose(sweeps.gradient(weights), want_grad,
                               rtol=TOL, atol=TOL * np.abs(want_grad).max(),
                               err_msg=f"block={block}")


@pytest.mark.parametrize("n", [7, 33])
def test_sweeps_gradient_takes_negative_and_tiny_weights(n):
  # Upstream gradients may be negative (a loss subtracted) or tiny: the row
  # weights multiply P after the exp rather than entering as log(w).
  rng = np.random.default_rng(n)
  x = tf.constant(rng.normal(size=(n, 6)).astype(np.float32))
  weights = rng.normal(size=n).astype(np.float32)
  weights[::3] *= 1e-30
  with tf.GradientTape() as tape:
    tape.watch(x)
    logits = tf.matmul(x, x, transpose_b=True) * 3.0
    logits = tf.where(tf.eye(n, dtype=tf.bool), -np.inf, logits)
    total = tf.reduce_sum(tf.reduce_logsumexp(logits, 1) * weights)
  want_grad = tape.gradient(total, x).numpy() / 3.0
  for block in (2, 4, 64):
    sweeps = blockwise_symmetric.SymmetricSweeps(x, 3.0, block)
    sweeps.logsumexp()
    got = sweeps.gradient(weights).numpy()
    assert np.isfinite(got).all(), f"block={block}"
    np.testing.assert_allclose(got, want_grad, rtol=TOL,
                               atol=TOL * np.abs(want_grad).max(),
                               err_msg=f"block={block}")


@pytest.mark.parametrize("n,block,plan", [
    (12, 5, (4, 3)),  # a divisor of n close below the block: no padding
    (12, 64, (12, 1)),  # one block
    (7, 4, (4, 2)),  # 7 is prime: two blocks of 4, one padded row
    (33, 8, (7, 5)),  # no divisor in 8..4: five blocks of 7, two padded
    (5, 1, (1, 5)),
])
def test_plan_by_hand(n, block, plan):
  assert blockwise_symmetric.SymmetricSweeps.plan(n, block) == plan
  rows, blocks = plan
  assert rows * blocks >= n > rows * (blocks - 1)


def _row_stats(labels, views, temperature, scale):
  """The per-row arguments of `symmetric_loss`, as `blockwise` derives them."""
  dense_class = np.unique(labels, return_inverse=True)[1]
  count = np.bincount(dense_class)[dense_class]
  positives = np.repeat(views * count - 1, views)
  valid = positives > 0
  return dict(
      row_class=tf.constant(np.repeat(dense_class, views), tf.int32),
      num_classes=len(labels),
      row_inv_pos=tf.constant(1.0 / np.maximum(positives, 1), tf.float32),
      row_valid=tf.constant(valid),
      # A unit upstream gradient of a sample's loss, per row's logits.
      row_weight=tf.constant(valid * scale / (temperature * views),
                             tf.float32),
      scale=tf.constant(scale, tf.float32))


def _symmetric(x, labels, weights, *, temperature, block, scale_by_temperature):
  features = tf.constant(x, tf.float32)
  scale = temperature if scale_by_temperature else 1.0
  with tf.GradientTape() as tape:
    tape.watch(features)
    loss = blockwise_symmetric.symmetric_loss(
        features, inv_tau=tf.constant(1.0 / temperature), block_size=block,
        **_row_stats(labels, x.shape[1], temperature, scale))
    total = tf.reduce_sum(loss * tf.constant(weights, tf.float32))
  return loss.numpy(), tape.gradient(total, features).numpy()


def _features(batch, views, dim=4, seed=0, norm=1.0):
  x = np.random.default_rng(seed).normal(size=(batch, views, dim))
  return norm * x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("views,block,scale_by_temperature", [
    (2, 1, True), (2, 3, False), (2, 64, True), (1, 2, True), (3, 4, True)])
def test_matches_float64_reference(views, block, scale_by_temperature):
  x = _features(len(LABELS), views, seed=views)
  weights = np.random.default_rng(block).uniform(0.5, 1.5, len(LABELS))
  kwargs = dict(temperature=0.3, scale_by_temperature=scale_by_temperature)
  loss, grad = _symmetric(x, LABELS, weights, block=block, **kwargs)
  want, valid = ref.reference_loss(x, LABELS, **kwargs)
  np.testing.assert_allclose(loss, want, rtol=TOL, atol=1e-6)
  assert valid.all() == (views > 1)  # One view: 3 and 6 have no positive.
  want_grad = ref.numeric_gradient(lambda z: float(np.sum(
      weights * ref.reference_loss(z, LABELS, **kwargs)[0])), x)
  ref.assert_close_to_scale(grad, want_grad)


def test_matches_dense():
  x = _features(len(LABELS), 2, seed=7)
  weights = np.linspace(0.2, 1.0, len(LABELS))
  loss, grad = _symmetric(x, LABELS, weights, temperature=0.1, block=3,
                          scale_by_temperature=True)
  features = tf.constant(x, tf.float32)
  ids = tf.constant(LABELS, tf.int32)
  with tf.GradientTape() as tape:
    tape.watch(features)
    same = dense.same_sample_or_label(ids, None, len(LABELS), len(LABELS), 0)
    want, _ = dense.dense_terms(features, features, same, 0, 0.1, "out",
                                "all", None, True)
    total = tf.reduce_sum(want * tf.constant(weights, tf.float32))
  np.testing.assert_allclose(loss, want.numpy(), rtol=TOL, atol=1e-6)
  ref.assert_close_to_scale(grad, tape.gradient(total, features).numpy(),
                            tol=TOL)


def test_extreme_logits_stay_finite_and_exact():
  # |logits| up to 9 / 0.01 = 900: exp() of them overflows float32.
  x = _features(len(LABELS), 2, seed=8, norm=3.0)
  weights = np.ones(len(LABELS))
  kwargs = dict(temperature=0.01, scale_by_temperature=False)
  loss, grad = _symmetric(x, LABELS, weights, block=2, **kwargs)
  assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))
  ref.assert_close_to_scale(loss, ref.reference_loss(x, LABELS, **kwargs)[0],
                            tol=1e-5)
  want_grad = ref.numeric_gradient(lambda z: float(np.sum(
      ref.reference_loss(z, LABELS, **kwargs)[0])), x)
  ref.assert_close_to_scale(grad, want_grad, tol=1e-3)


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
