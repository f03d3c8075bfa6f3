"""Tests of the cross-replica helpers under 2- and 4-replica strategies."""

import sys

import numpy as np
import pytest
import tensorflow as tf

import conftest
from supcon_tf import distributed


@pytest.mark.parametrize("replicas", [2, 4])
def test_all_gather_offset_and_sum(replicas):
  strategy = conftest.make_mirrored(replicas)

  def step():
    ctx = tf.distribute.get_replica_context()
    rid = ctx.replica_id_in_sync_group
    # Uneven batches: replica r holds r + 1 rows valued r.
    local = tf.fill([rid + 1, 2], tf.cast(rid, tf.float32))
    gathered = distributed.all_gather(local)
    return gathered, distributed.replica_offset(tf.shape(local)[0]), \
        distributed.all_reduce_sum(tf.reduce_sum(local))

  gathered, offsets, sums = strategy.run(tf.function(step))
  expected = np.concatenate(
      [np.full([r + 1, 2], r, np.float32) for r in range(replicas)])
  total = float(expected.sum())
  starts = np.cumsum([0] + [r + 1 for r in range(replicas)])[:-1]
  for r in range(replicas):
    np.testing.assert_array_equal(strategy.experimental_local_results(
        gathered)[r], expected)
    assert int(strategy.experimental_local_results(offsets)[r]) == starts[r]
    assert float(strategy.experimental_local_results(sums)[r]) == total


def test_helpers_are_identity_outside_a_strategy():
  x = tf.constant([[1.0, 2.0]])
  np.testing.assert_array_equal(distributed.all_gather(x), x)
  assert float(distributed.all_reduce_sum(tf.constant(3.0))) == 3.0


def test_agree_on_finite():
  grads = [tf.constant([1.0, 2.0]), None]
  assert distributed.agree_on_finite(grads) is grads
  strategy = conftest.make_mirrored(2)

  def step(bad_replica):
    rid = tf.distribute.get_replica_context().replica_id_in_sync_group
    grad = tf.where(tf.equal(rid, bad_replica), float("inf"), 1.0)
    return distributed.agree_on_finite([tf.fill([3], grad), None])[0]

  for bad_replica, want in ((-1, 1.0), (1, np.nan)):
    out = strategy.run(tf.function(step), args=(bad_replica,))
    for local in strategy.experimental_local_results(out):
      np.testing.assert_array_equal(local.numpy(), [want] * 3)


def test_is_chief_without_cluster():
  assert distributed.is_chief(tf.distribute.get_strategy())
  assert distributed.is_chief(conftest.make_mirrored(2))


def test_make_strategy_errors(monkeypatch):
  with pytest.raises(ValueError, match="Unknown strategy 'tpu'"):
    distributed.make_strategy("tpu")
  monkeypatch.delenv("TF_CONFIG", raising=False)
  with pytest.raises(ValueError, match="TF_CONFIG"):
    distributed.make_strategy("multi_worker")


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
