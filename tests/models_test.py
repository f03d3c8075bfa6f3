"""Tests for supcon_tf.models: the builders and `embed_views`.

The ResNet encoders and the projection heads have their own tests
(`resnet_test.py`, `heads_test.py`).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf

import conftest
from supcon_tf import config as config_lib
from supcon_tf import models

TINY = 0.0625


@pytest.mark.parametrize("config_sync,replicas,expected", [
    (None, 1, False), (None, 2, True), (True, 1, True), (False, 4, False)])
def test_build_encoder_sync_policy(config_sync, replicas, expected):
  config = config_lib.ModelConfig(encoder="resnet18", width=TINY,
                                  sync_batch_norm=config_sync)
  model = models.build_encoder(config, input_shape=(16, 16, 3),
                               num_replicas=replicas)
  assert model.name == "resnet18"
  bns = conftest.layers_of(model, keras.layers.BatchNormalization)
  assert all(bn.synchronized is expected for bn in bns)


def test_build_encoder_follows_config():
  config = config_lib.ModelConfig(encoder="resnet50", stem="imagenet",
                                  width=TINY)
  model = models.build_encoder(config, input_shape=(32, 32, 3))
  assert model.name == "resnet50"
  assert tuple(model.input.shape) == (None, 32, 32, 3)
  assert model.output.shape[-1] == 128
  assert model.get_layer("stem_conv").kernel.shape[0] == 7


@pytest.mark.parametrize("name", ["resnet19", "vgg16", "resnet"])
def test_build_encoder_unknown_name(name):
  config = config_lib.ModelConfig(encoder=name)
  with pytest.raises(ValueError, match=f"'{name}'.*resnet18"):
    models.build_encoder(config)


def test_build_head_synchronises_batch_norm_with_replicas():
  config = config_lib.ModelConfig(head="mlp_bn")
  assert not models.build_head(config).sync_batch_norm
  assert models.build_head(config, num_replicas=2).sync_batch_norm
  forced = config_lib.ModelConfig(head="mlp_bn", sync_batch_norm=False)
  assert not models.build_head(forced, num_replicas=2).sync_batch_norm
  head = models.build_head(config, num_replicas=2)
  head.build((None, 8))
  assert head.hidden_norm.synchronized
  clone = models.ProjectionHead.from_config(head.get_config())
  assert clone.sync_batch_norm


def test_build_head_follows_config():
  config = config_lib.ModelConfig(head="linear", projection_dim=7)
  head = models.build_head(config)
  assert isinstance(head, models.ProjectionHead)
  assert (head.kind, head.hidden_dim, head.output_dim) == ("linear", None, 7)


def test_keras_save_reload_round_trip(tmp_path):
  encoder = models.resnet(18, width=TINY, input_shape=(16, 16, 3),
                          zero_init_residual=False)
  head = models.ProjectionHead(kind="mlp", hidden_dim=16, output_dim=8)
  inputs = keras.Input((16, 16, 3))
  model = keras.Model(inputs, head(encoder(inputs)))
  # Perturb every weight, BN moving statistics included (variances kept
  # positive), so a weight that fails to reload changes the output.
  rng = np.random.default_rng(4)
  for weight in model.weights:
    value = weight.numpy() + rng.normal(0.0, 0.1, weight.shape)
    if "moving_variance" in weight.path:
      value = np.abs(value) + 0.5
    weight.assign(value.astype("float32"))
  x = conftest.random_images(3, 16, seed=5)
  expected = np.asarray(model(x, training=False))

  path = str(tmp_path / "tiny.keras")
  model.save(path)
  reloaded = keras.models.load_model(path)
  got = np.asarray(reloaded(x, training=False))
  np.testing.assert_array_equal(got, expected)
  assert got.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-6)


def test_embed_views_puts_every_view_through_one_batch():
  encoder = models.resnet(18, width=TINY, input_shape=(16, 16, 3))
  head = models.ProjectionHead(kind="linear", output_dim=8)
  views = tf.constant(
      conftest.random_images(6, 16, seed=6).reshape(3, 2, 16, 16, 3))
  got = models.embed_views(encoder, head, views, training=True)
  assert got.shape == (3, 2, 8) and got.dtype == tf.float32
  # Training-mode batch norm normalises over all six images at once.
  images = tf.reshape(views, [6, 16, 16, 3])
  want = head(encoder(images, training=True), training=True)
  np.testing.assert_allclose(got, tf.reshape(want, [3, 2, 8]), rtol=1e-5,
                             atol=1e-6)
  per_view = head(encoder(views[:, 0], training=True), training=True)
  assert np.abs(got[:, 0] - per_view).max() > 1e-3


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
