"""Tests for supcon_tf.losses with an external contrast set (a memory queue)."""

import itertools
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import tensorflow as tf

import conftest
from supcon_tf import losses



def reference_queue(features, labels, queue, queue_labels, temperature=0.1,
                    contrast_mode="all", summation="out", denominator="all",
                    positives_cap=None, scale_by_temperature=True):
  """Per-sample loss and validity with queue rows, float64, explicit loops.

  The batch's other positive samples are kept first (whole samples, batch
  order), then queue positives in slot order, until `positives_cap` views.
  """
  feats = np.asarray(features, np.float64)
  queue = np.asarray(queue, np.float64)
  batch, views, _ = feats.shape
  loss, valid = np.zeros(batch), np.zeros(batch, bool)
  for i in range(batch):
    partners = [j for j in range(batch) if j != i and labels is not None
                and labels[j] == labels[i]]
    kept = partners
    if positives_cap is not None:
      kept = partners[:positives_cap // views]
    queue_partners = [k for k in range(len(queue)) if queue_labels[k] >= 0
                      and labels is not None and queue_labels[k] == labels[i]]
    queue_kept = queue_partners
    if positives_cap is not None:
      queue_kept = queue_partners[:positives_cap - views * len(kept)]
    anchor_losses = []
    for v in ([0] if contrast_mode == "one" else range(views)):
      positives, negatives = [], []
      for j in range(batch):
        for w in range(views):
          if (j, w) == (i, v):
            continue
          logit = float(feats[i, v] @ feats[j, w]) / temperature
          if j == i or j in kept:
            positives.append(logit)
          elif j not in partners:
            negatives.append(logit)
      for k in range(len(queue)):
        if queue_labels[k] < 0:
          continue
        logit = float(feats[i, v] @ queue[k]) / temperature
        if k in queue_kept:
          positives.append(logit)
        elif k not in queue_partners:
          negatives.append(logit)
      anchor_loss = conftest.reference_anchor_loss(
          positives, negatives, denominator=denominator, summation=summation,
          temperature=temperature, scale_by_temperature=scale_by_temperature)
      if anchor_loss is not None:
        anchor_losses.append(anchor_loss)
    if anchor_losses:
      loss[i] = np.mean(anchor_losses)
      valid[i] = True
  return loss, valid


def _normalised(rng, shape):
  x = rng.normal(size=shape)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _case(seed=0, batch=5, views=2, dim=4, k=7, classes=3, empty=2):
  rng = np.random.default_rng(seed)
  features = _normalised(rng, (batch, views, dim))
  labels = rng.integers(0, classes, batch).astype(np.int32)
  queue = _normalised(rng, (k, dim))
  # Classes 0..classes: some queue rows match the batch, some (the class
  # `classes`) match nothing; `empty` slots are -1.
  queue_labels = rng.integers(0, classes + 1, k).astype(np.int32)
  queue_labels[rng.choice(k, empty, replace=False)] = -1
  return features, labels, queue, queue_labels


_OPTIONS = list(itertools.product(
    ("all", "one"), ("out", "in"), ("all", "one_positive", "only_negatives"),
    (None, 2)))


@pytest.mark.parametrize("contrast_mode,summation,denominator,cap", _OPTIONS)
@pytest.mark.parametrize("block_size", [0, 2])
def test_matches_reference(contrast_mode, summation, denominator, cap,
                           block_size):
  features, labels, queue, queue_labels = _case()
  kwargs = dict(temperature=0.5, contrast_mode=contrast_mode,
                summation=summation, denominator=denominator,
                positives_cap=cap)
  expected, expected_valid = reference_queue(features, labels, queue,
                                             queue_labels, **kwargs)
  loss, valid = losses.supcon_terms(
      features, labels, queue_features=queue, queue_labels=queue_labels,
      block_size=block_size, **kwargs)
  np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(valid.numpy(), expected_valid)


@pytest.mark.parametrize("denominator", ["all", "one_positive",
                                         "only_negatives"])
@pytest.mark.parametrize("block_size", [0, 2])
def test_simclr_queue_rows_are_negatives(denominator, block_size):
  features, _, queue, queue_labels = _case(seed=1)
  expected, _ = reference_queue(features, None, queue, queue_labels,
                                denominator=denominator)
  loss = losses.supcon_loss(features, None, queue_features=queue,
                            queue_labels=queue_labels,
                            denominator=denominator, block_size=block_size)
  np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5, atol=1e-6)


# contrast_mode x summation x denominator, every combination.
_MODES = list(itertools.product(("all", "one"), ("out", "in"),
                                ("all", "one_positive", "only_negatives")))


@pytest.mark.parametrize("contrast_mode,summation,denominator", _MODES)
@pytest.mark.parametrize("block_size", [0, 2])
def test_simclr_queue_rows_are_negatives_in_every_mode(
    contrast_mode, summation, denominator, block_size):
  # labels=None: a sample's only positives are its own other views; every
  # filled queue row is a negative, whatever its label.
  features, _, queue, queue_labels = _case(seed=1)
  kwargs = dict(temperature=0.5, contrast_mode=contrast_mode,
                summation=summation, denominator=denominator)
  expected, expected_valid = reference_queue(features, None, queue,
                                             queue_labels, **kwargs)
  assert expected_valid.all()
  loss, valid = losses.supcon_terms(
      features, None, queue_features=queue, queue_labels=queue_labels,
      block_size=block_size, **kwargs)
  np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(valid.numpy(), expected_valid)
  mean = losses.supcon_loss(features, None, queue_features=queue,
                            queue_labels=queue_labels, block_size=block_size,
                            **kwargs)
  np.testing.assert_allclose(mean.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_queue_changes_the_loss():
  features, labels, queue, queue_labels = _case(seed=2)
  with_queue = losses.supcon_loss(features, labels, queue_features=queue,
                                  queue_labels=queue_labels)
  without = losses.supcon_loss(features, labels)
  assert np.max(np.abs(with_queue.numpy() - without.numpy())) > 1e-3


@pytest.mark.parametrize("summation,denominator,cap", [
    ("out", "all", None), ("in", "one_positive", 2),
    ("out", "only_negatives", 4)])
@pytest.mark.parametrize("block_size", [0, 2])
def test_gradient_matches_float64_reference(summation, denominator, cap,
                                            block_size):
  features, labels, queue, queue_labels = _case(seed=3)
  kwargs = dict(temperature=0.5, summation=summation, denominator=denominator,
                positives_cap=cap)
  weights = np.random.default_rng(4).uniform(0.5, 1.5, len(labels))
  grad, _ = _gradient_reaching_features_only(
      lambda x, q: (tf.reduce_sum(weights * losses.supcon_loss(
          x, labels, queue_features=q, queue_labels=queue_labels,
          block_size=block_size, **kwargs)), None), features, queue)
  numeric = _numeric_gradient(
      _reference_total(weights, labels, queue, queue_labels, kwargs),
      features.astype(np.float64))
  np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-4)


def _gradient_reaching_features_only(total_of, features, queue):
  """`(d total / d features, aux)` of `total_of(x, q) -> (total, aux)`.

  Asserts that no gradient reaches the queue: it holds stop-gradient keys.
  """
  x, q = tf.constant(features), tf.constant(queue)
  with tf.GradientTape(persistent=True) as tape:
    tape.watch([x, q])
    total, aux = total_of(x, q)
  queue_grad = tape.gradient(total, q)
  assert queue_grad is None or not np.any(queue_grad.numpy())
  return tape.gradient(total, x).numpy(), aux


def _reference_total(weights, labels, queue, queue_labels, kwargs):
  """The float64 reference's weighted loss sum, as a function of features."""
  return lambda f: float(np.sum(weights * reference_queue(
      f, labels, queue, queue_labels, **kwargs)[0]))


def _numeric_gradient(fn, base, eps=1e-6):
  """Central differences of the float64 scalar `fn` at `base` (float64)."""
  numeric = np.zeros_like(base)
  for index in np.ndindex(base.shape):
    up, down = base.copy(), base.copy()
    up[index] += eps
    down[index] -= eps
    numeric[index] = (fn(up) - fn(down)) / (2 * eps)
  return numeric


@pytest.mark.parametrize("contrast_mode,summation,denominator", _MODES)
@pytest.mark.parametrize("labels_kind,cap", [("ids", None), ("ids", 2),
                                             ("none", None)])
@pytest.mark.parametrize("block_size", [0, 2])
def test_gradient_matches_float64_reference_in_every_mode(
    contrast_mode, summation, denominator, labels_kind, cap, block_size):
  # labels_kind="none": labels=None, every filled queue row a negative.
  features, labels, queue, queue_labels = _case(seed=3)
  labels = labels if labels_kind == "ids" else None
  kwargs = dict(temperature=0.5, contrast_mode=contrast_mode,
                summation=summation, denominator=denominator,
                positives_cap=cap)
  weights = np.random.default_rng(4).uniform(0.5, 1.5, len(features))

  def total_of(x, q):
    loss, valid = losses.supcon_terms(
        x, labels, queue_features=q, queue_labels=queue_labels,
        block_size=block_size, **kwargs)
    return tf.reduce_sum(weights * loss), valid

  grad, valid = _gradient_reaching_features_only(total_of, features, queue)
  ref = _reference_total(weights, labels, queue, queue_labels, kwargs)
  expected_valid = reference_queue(features, labels, queue, queue_labels,
                                   **kwargs)[1]
  np.testing.assert_array_equal(valid.numpy(), expected_valid)
  assert expected_valid.any()
  numeric = _numeric_gradient(ref, features.astype(np.float64))
  assert np.any(numeric)
  np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("block_size", [0, 2])
@pytest.mark.parametrize("cap", [None, 2])
def test_empty_slots_equal_no_rows(block_size, cap):
  features, labels, queue, queue_labels = _case(seed=5, empty=3)
  filled = queue_labels >= 0
  # Empty slots hold garbage, not zeros: they must still be ignored.
  noisy = np.where(filled[:, None], queue, 5.0).astype(np.float32)
  kwargs = dict(positives_cap=cap, block_size=block_size)
  partial = losses.supcon_terms(features, labels, queue_features=noisy,
                                queue_labels=queue_labels, **kwargs)
  compact = losses.supcon_terms(features, labels,
                                queue_features=queue[filled],
                                queue_labels=queue_labels[filled], **kwargs)
  for a, b in zip(partial, compact):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("labels_kind", ["ids", "none"])
@pytest.mark.parametrize("block_size", [0, 2])
@pytest.mark.parametrize("denominator", ["all", "only_negatives"])
def test_all_empty_queue_equals_no_queue(labels_kind, block_size,
                                         denominator):
  features, labels, queue, _ = _case(seed=6)
  labels = labels if labels_kind == "ids" else None
  empty = -np.ones(len(queue), np.int32)
  x = tf.constant(features)
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(x)
    with_queue = losses.supcon_terms(
        x, labels, queue_features=queue, queue_labels=empty,
        block_size=block_size, denominator=denominator)
    without = losses.supcon_terms(x, labels, block_size=block_size,
                                  denominator=denominator)
  # Equal up to float rounding (the matmul is wider).
  np.testing.assert_allclose(with_queue[0].numpy(), without[0].numpy(),
                             rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(with_queue[1].numpy(), without[1].numpy())
  np.testing.assert_allclose(
      tape.gradient(with_queue[0], x).numpy(),
      tape.gradient(without[0], x).numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("contrast_mode,summation,denominator,cap",
                         _OPTIONS[::3])
def test_blockwise_equals_dense(contrast_mode, summation, denominator, cap):
  features, labels, queue, queue_labels = _case(seed=7, batch=9, k=20)
  kwargs = dict(contrast_mode=contrast_mode, summation=summation,
                denominator=denominator, positives_cap=cap,
                queue_features=queue, queue_labels=queue_labels)
  x = tf.constant(features)
  results = []
  for block_size in (0, 4):
    with tf.GradientTape() as tape:
      tape.watch(x)
      loss, valid = losses.supcon_terms(x, labels, block_size=block_size,
                                        **kwargs)
      total = tf.reduce_sum(loss * tf.range(1.0, 10.0))
    results.append((loss.numpy(), valid.numpy(),
                    tape.gradient(total, x).numpy()))
  for a, b in zip(*results):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_automatic_block_path_counts_queue_columns():
  """Enough queue columns switch to the block kernel, with equal values."""
  rng = np.random.default_rng(8)
  features = _normalised(rng, (4, 2, 8))
  labels = np.array([0, 1, 0, 2], np.int32)
  k = 1024 * 1024 // 8 + 1
  queue = _normalised(rng, (k, 8))
  queue_labels = rng.integers(-1, 4, k).astype(np.int32)
  auto = losses.supcon_loss(features, labels, queue_features=queue,
                            queue_labels=queue_labels)
  dense = losses.supcon_loss(features, labels, queue_features=queue,
                             queue_labels=queue_labels, block_size=0)
  np.testing.assert_allclose(auto.numpy(), dense.numpy(), rtol=1e-5)


def test_keras_loss_in_tf_function_with_queue():
  features, labels, queue, queue_labels = _case(seed=9)

  @tf.function
  def graph_loss(x, y, q, ql):
    return losses.supcon_loss(x, y, queue_features=q, queue_labels=ql)

  np.testing.assert_allclose(
      graph_loss(features, labels, queue, queue_labels).numpy(),
      losses.supcon_loss(features, labels, queue_features=queue,
                         queue_labels=queue_labels).numpy(), rtol=1e-6)


@pytest.mark.parametrize("block_size", [0, 3])
def test_mirrored_gather_applies_to_the_batch_only(block_size):
  strategy = conftest.make_mirrored(2)
  features, labels, queue, queue_labels = _case(seed=10, batch=6)
  half = len(labels) // 2

  def shard(x):
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(x[ctx.replica_id_in_sync_group * half:
                                  (ctx.replica_id_in_sync_group + 1) * half]))

  @tf.function
  def step(x, y):
    def replica_fn(x, y):
      with tf.GradientTape() as tape:
        tape.watch(x)
        loss = losses.supcon_loss(
            x, y, gather=True, block_size=block_size,
            queue_features=tf.constant(queue),
            queue_labels=tf.constant(queue_labels))
        total = tf.reduce_sum(loss) / len(labels)
      return loss, tape.gradient(total, x)
    return strategy.run(replica_fn, args=(x, y))

  loss, grads = step(shard(features), shard(labels))
  loss = np.concatenate([t.numpy() for t in
                         strategy.experimental_local_results(loss)])
  grads = np.concatenate([g.numpy() for g in
                          strategy.experimental_local_results(grads)])
  x = tf.constant(features)
  with tf.GradientTape() as tape:
    tape.watch(x)
    want = losses.supcon_loss(x, labels, queue_features=queue,
                              queue_labels=queue_labels, block_size=0)
    total = tf.reduce_sum(want) / len(labels)
  np.testing.assert_allclose(loss, want.numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grads, tape.gradient(total, x).numpy(),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs,expected", [
    (dict(queue_features=np.zeros([3, 4], np.float32)), "queue_labels is None"),
    (dict(queue_labels=np.zeros([3], np.int32)), "queue_features is None"),
    (dict(queue_features=np.zeros([3, 5], np.float32),
          queue_labels=np.zeros([3], np.int32)), "dim = 4"),
    (dict(queue_features=np.zeros([3, 4], np.float32),
          queue_labels=np.zeros([2], np.int32)), r"\[K\] = \[3\]"),
    (dict(queue_features=np.zeros([3, 4], np.float32),
          queue_labels=np.array([0, -2, 1])), "< -1"),
    (dict(queue_features=np.zeros([3, 4], np.float32),
          queue_labels=np.zeros([3], np.int32),
          labels=np.eye(5, dtype=np.int32)), "multi-hot"),
    (dict(queue_features=np.zeros([3, 4], np.float32),
          queue_labels=np.zeros([3], np.int32), labels=None,
          mask=np.eye(5)), "multi-hot"),
])
def test_bad_queue_raises_value_error(kwargs, expected):
  features, labels, _, _ = _case()
  kwargs = {"labels": labels, **kwargs}
  with pytest.raises(ValueError, match=expected):
    losses.supcon_loss(features, **kwargs)


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
