"""Tests of supcon_tf.objectives on their own (no training loop).

That every objective trains the same on replicas as on one device, and that
the Keras path's step equals the custom loop's, is tested in train_lib_test
and keras_model_test.
"""

import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from supcon_tf import config as config_lib
from supcon_tf import objectives


def test_every_method_has_an_objective():
  assert set(objectives.OBJECTIVES) == set(config_lib.METHODS)
  for method in config_lib.METHODS:
    assert objectives.get(method).name == method
  with pytest.raises(ValueError, match=r"method='supcom'.*'supcon'"):
    objectives.get("supcom")


@pytest.mark.parametrize("method,views", [
    ("supcon", 2), ("simclr", 2), ("npairs", 1), ("ce", 1)])
def test_views_each_method_trains_on(method, views):
  assert objectives.get(method).num_views(2) == views


def test_health_counts_positives_and_nearest_neighbours():
  # Samples 0 and 1 share a label; sample 2's nearest embedding is sample 0.
  e = np.array([[[1, 0], [1, 0]],
                [[0, 1], [0, 1]],
                [[0.8, 0.6], [-1, 0]]], np.float32)
  labels = tf.constant([0, 0, 1])
  supervised = objectives.contrastive_health(tf.constant(e), labels)
  # Positives: 3 (other view + sample 1's two), 3, 1 (own other view).
  np.testing.assert_allclose(supervised["positives"], 7 / 3, rtol=1e-6)
  # Anchor 0's nearest is its own second view, 1's too, 2's is sample 0.
  np.testing.assert_allclose(supervised["nn_top1"], 2 / 3, rtol=1e-6)
  unsupervised = objectives.contrastive_health(tf.constant(e), labels,
                                               supervised=False)
  np.testing.assert_allclose(unsupervised["positives"], 1.0)
  np.testing.assert_allclose(unsupervised["nn_top1"], 2 / 3, rtol=1e-6)


def test_cross_entropy_terms_and_label_check():
  logits = tf.constant([[[2.0, 0.0, 0.0]], [[0.0, 1.0, 3.0]]])
  labels = tf.constant([0, 1])
  objective = objectives.get("ce")
  per_sample, valid, metrics = objective.terms(
      logits, labels, loss_config=config_lib.LossConfig(), num_classes=3)
  want = keras.losses.sparse_categorical_crossentropy(
      labels, logits[:, 0], from_logits=True)
  np.testing.assert_allclose(per_sample, want, rtol=1e-6)
  assert valid.numpy().all()
  assert float(metrics["accuracy"]) == 0.5
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r"labels in \[0, num_classes=3\)"):
    objective.terms(logits, tf.constant([0, 3]),
                    loss_config=config_lib.LossConfig(), num_classes=3)


@pytest.mark.parametrize("loss_scaled", [False, True])
def test_minimize_takes_one_step_and_returns_aux(loss_scaled):
  w = tf.Variable(1.0)
  optimizer = keras.optimizers.SGD(0.1)
  if loss_scaled:
    optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
  optimizer.build([w])
  aux = objectives.minimize(optimizer, lambda: (w * w, "aux"),
                            lambda: [w])
  assert aux == "aux"
  np.testing.assert_allclose(w.numpy(), 1.0 - 0.1 * 2.0, rtol=1e-6)


def test_minimize_skips_a_non_finite_step_and_halves_the_scale():
  w = tf.Variable(1.0)
  optimizer = keras.optimizers.LossScaleOptimizer(
      keras.optimizers.SGD(0.1), initial_scale=2.0**10)
  optimizer.build([w])
  objectives.minimize(optimizer, lambda: (w * np.inf, None), lambda: [w])
  assert w.numpy() == 1.0
  assert float(optimizer.dynamic_scale) == 2.0**9


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
