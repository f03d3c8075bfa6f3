"""Tests for supcon_tf.models.heads: the projection heads."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest

from supcon_tf import models
from supcon_tf.models import heads


@pytest.mark.parametrize("kind,hidden_dim,kernels", [
    ("mlp", None, [(24, 24), (24, 8)]),
    ("mlp", 16, [(24, 16), (16, 8)]),
    ("mlp_bn", 16, [(24, 16), (16, 8)]),
    ("linear", None, [(24, 8)]),
])
def test_head_shapes_and_unit_norm(kind, hidden_dim, kernels):
  head = models.ProjectionHead(kind=kind, hidden_dim=hidden_dim, output_dim=8)
  x = np.random.default_rng(1).normal(size=(5, 24)).astype("float32")
  z = np.asarray(head(x))
  assert z.shape == (5, 8)
  np.testing.assert_allclose(np.linalg.norm(z, axis=-1), 1.0, atol=1e-6)
  shapes = [tuple(w.shape) for w in head.trainable_weights if w.ndim == 2]
  assert shapes == kernels


def test_head_unit_norm_float32_under_mixed_bfloat16(mixed_bfloat16):
  head = models.ProjectionHead(kind="mlp", output_dim=8)
  x = np.random.default_rng(2).normal(size=(4, 16)).astype("float32")
  z = head(x)
  assert head.compute_dtype == "bfloat16"
  assert head.hidden.compute_dtype == "bfloat16"
  assert z.dtype == "float32"
  np.testing.assert_allclose(np.linalg.norm(np.asarray(z), axis=-1), 1.0,
                             atol=1e-6)
  symbolic = head(keras.Input((16,)))
  assert symbolic.dtype == "float32"


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_head_projection_runs_in_float32(mixed_bfloat16, kind):
  head = models.ProjectionHead(kind=kind, output_dim=8)
  # bfloat16 values, so the head's cast of its input loses nothing.
  x = np.asarray(keras.ops.cast(keras.ops.cast(
      np.random.default_rng(4).normal(size=(6, 16)), "bfloat16"), "float32"))
  z = np.asarray(head(x))
  assert head.projection.compute_dtype == "float32"
  # The same last layer on the same input, computed in float64 by hand.
  inputs = x if head.hidden is None else np.asarray(
      keras.ops.cast(head.hidden(x), "float32"))
  y = (inputs.astype(np.float64) @ head.projection.kernel.numpy()
       + head.projection.bias.numpy())
  want = y / np.linalg.norm(y, axis=-1, keepdims=True)
  np.testing.assert_allclose(z, want, rtol=1e-5, atol=1e-6)


def test_mlp_bn_head_centres_the_hidden_layer_in_training():
  """Inputs that all point one way still give spread embeddings."""
  keras.utils.set_random_seed(0)
  head = models.ProjectionHead(kind="mlp_bn", hidden_dim=32, output_dim=8)
  rng = np.random.default_rng(5)
  # Post-ReLU features of a fresh network: a large shared part, small spread.
  x = (5.0 + 0.1 * rng.normal(size=(64, 24))).astype("float32")
  head.build(x.shape)
  assert head.hidden is not None and not head.hidden.use_bias
  hidden = np.asarray(head.hidden_norm(head.hidden(x), training=True))
  np.testing.assert_allclose(hidden.mean(axis=0), 0.0, atol=1e-4)
  # Unit variance up to batch norm's epsilon against this small spread.
  assert np.all((hidden.std(axis=0) > 0.5) & (hidden.std(axis=0) < 1.0))
  z = np.asarray(head(x, training=True))
  cosine = z @ z.T
  plain = models.ProjectionHead(kind="mlp", hidden_dim=32, output_dim=8)
  z_plain = np.asarray(plain(x))
  off = ~np.eye(len(x), dtype=bool)
  # The plain head keeps them parallel (mean cosine 0.999 over seeds 0-9);
  # batch norm spreads them (0.14-0.50).
  assert cosine[off].mean() < 0.75
  assert (z_plain @ z_plain.T)[off].mean() > 0.99
  # Inference uses the moving statistics, which one call has barely moved.
  assert not np.allclose(np.asarray(head(x, training=False)), z)


def test_head_zero_vector_is_finite():
  head = models.ProjectionHead(kind="linear", output_dim=4)
  head.build((None, 3))
  head.projection.kernel.assign(np.zeros((3, 4), "float32"))
  z = np.asarray(head(np.ones((2, 3), "float32")))
  assert np.all(np.isfinite(z))


def test_head_config_round_trip():
  head = models.ProjectionHead(kind="mlp", hidden_dim=12, output_dim=6,
                               name="proj")
  config = head.get_config()
  for key, value in [("kind", "mlp"), ("hidden_dim", 12), ("output_dim", 6),
                     ("name", "proj")]:
    assert config[key] == value
  clone = models.ProjectionHead.from_config(config)
  assert clone.get_config() == config
  x = np.random.default_rng(3).normal(size=(3, 10)).astype("float32")
  head(x)
  clone(x)
  clone.set_weights(head.get_weights())
  np.testing.assert_array_equal(np.asarray(head(x)), np.asarray(clone(x)))
  serialized = keras.saving.serialize_keras_object(head)
  assert serialized["registered_name"] == "supcon_tf>ProjectionHead"


def test_head_rejects_bad_arguments():
  with pytest.raises(ValueError, match="kind='deep'"):
    models.ProjectionHead(kind="deep")
  with pytest.raises(ValueError, match="output_dim must be > 0"):
    models.ProjectionHead(output_dim=0)


def test_hidden_width_must_be_positive_and_known():
  with pytest.raises(ValueError, match="hidden_dim must be > 0"):
    heads.ProjectionHead(hidden_dim=0)
  head = heads.ProjectionHead(kind="mlp", output_dim=4)
  with pytest.raises(ValueError, match="known input width"):
    head.build((None, None))


def test_any_leading_dims_and_linear_head_ignores_hidden_dim():
  head = heads.ProjectionHead(kind="linear", hidden_dim=5, output_dim=3)
  x = np.random.default_rng(6).normal(size=(2, 4, 7)).astype("float32")
  z = np.asarray(head(x))
  assert z.shape == (2, 4, 3)
  np.testing.assert_allclose(np.linalg.norm(z, axis=-1), 1.0, atol=1e-6)
  assert head.hidden is None and head.hidden_norm is None
  assert [tuple(w.shape) for w in head.trainable_weights] == [(7, 3), (3,)]
  # Each row is its own linear map, normalised: the head works row by row.
  np.testing.assert_allclose(z[1, 2], np.asarray(head(x[1:2, 2]))[0],
                             rtol=1e-6)


def test_mlp_bn_moving_statistics_change_only_in_training():
  keras.utils.set_random_seed(1)
  head = heads.ProjectionHead(kind="mlp_bn", hidden_dim=6, output_dim=4)
  x = (3.0 + np.random.default_rng(7).normal(size=(16, 5))).astype("float32")
  head(x, training=False)
  norm = head.hidden_norm
  assert not norm.synchronized
  # No bias before the batch norm: its beta is the hidden layer's offset.
  assert [w.path.split("/")[-1] for w in head.hidden.weights] == ["kernel"]
  np.testing.assert_array_equal(norm.moving_mean.numpy(), 0.0)
  np.testing.assert_array_equal(norm.moving_variance.numpy(), 1.0)
  head(x, training=True)
  hidden = np.asarray(head.hidden(x), np.float64)
  # Keras' default momentum 0.99: one step towards the batch statistics.
  np.testing.assert_allclose(norm.moving_mean.numpy(),
                             0.01 * hidden.mean(0), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(norm.moving_variance.numpy(),
                             0.99 + 0.01 * hidden.var(0), rtol=1e-4)
  moved = norm.moving_mean.numpy()
  head(x, training=False)
  np.testing.assert_array_equal(norm.moving_mean.numpy(), moved)


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
