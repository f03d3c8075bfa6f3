"""Tests for supcon_tf.models: ResNet encoders, projection head, builders."""

import importlib
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf

from supcon_tf import config as config_lib
from supcon_tf import models

TINY = 0.0625

# torchvision ResNets without their final fc layer (parameters only, i.e.
# conv kernels and BN gamma/beta; BN moving statistics are buffers there).
TORCHVISION_PARAMS = {
    (18, "imagenet"): 11_689_512 - (512 * 1000 + 1000),
    (34, "imagenet"): 21_797_672 - (512 * 1000 + 1000),
    (50, "imagenet"): 25_557_032 - (2048 * 1000 + 1000),
    (101, "imagenet"): 44_549_160 - (2048 * 1000 + 1000),
    (152, "imagenet"): 60_192_808 - (2048 * 1000 + 1000),
}
# The CIFAR stem swaps the 7x7x3x64 conv for a 3x3x3x64 one.
TORCHVISION_PARAMS[(18, "cifar")] = (
    TORCHVISION_PARAMS[(18, "imagenet")] - (7 * 7 - 3 * 3) * 3 * 64)


def _trainable_params(model):
  return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def _layers_of(model, cls):
  return [layer for layer in model.layers if isinstance(layer, cls)]


def _images(batch, size, seed=0):
  return np.random.default_rng(seed).random(
      (batch, size, size, 3), dtype=np.float32)


@pytest.fixture
def mixed_bfloat16():
  keras.mixed_precision.set_global_policy("mixed_bfloat16")
  try:
    yield
  finally:
    keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("depth,stem,size,rep_dim", [
    (18, "cifar", 16, 32),
    (18, "imagenet", 32, 32),
    (50, "cifar", 16, 128),
    (50, "imagenet", 32, 128),
])
def test_output_shape_and_dtype(depth, stem, size, rep_dim):
  model = models.resnet(depth, stem=stem, width=TINY,
                        input_shape=(size, size, 3))
  out = model(_images(2, size))
  assert tuple(out.shape) == (2, rep_dim)
  assert out.dtype == "float32"
  assert np.all(np.isfinite(np.asarray(out)))
  assert model.name == f"resnet{depth}"
  assert rep_dim == models.representation_dim(depth, TINY)


@pytest.mark.parametrize("stem,final_side", [("cifar", 4), ("imagenet", 1)])
def test_stem_downsampling(stem, final_side):
  # 32x32 input: three stride-2 stages give 4x4; the ImageNet stem adds 4x.
  model = models.resnet(18, stem=stem, width=TINY)
  assert model.get_layer("avg_pool").input.shape[1:3] == (final_side,
                                                          final_side)
  has_pool = any(isinstance(layer, keras.layers.MaxPooling2D)
                 for layer in model.layers)
  assert has_pool == (stem == "imagenet")
  kernel = model.get_layer("stem_conv").kernel.shape
  assert tuple(kernel[:2]) == ((3, 3) if stem == "cifar" else (7, 7))


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152, 200])
def test_layer_counts(depth):
  # depth - 1 convs on the main path (the fc layer is the last "layer" of the
  # depth) plus one projection shortcut per stage whose shape changes.
  model = models.resnet(depth, width=TINY, stem="imagenet")
  convs = _layers_of(model, keras.layers.Conv2D)
  projections = 3 if depth in (18, 34) else 4
  assert len(convs) == depth - 1 + projections
  assert len(_layers_of(model, keras.layers.BatchNormalization)) == len(convs)
  assert model.output.shape[-1] == models.representation_dim(depth, TINY)


@pytest.mark.parametrize("depth,stem", sorted(TORCHVISION_PARAMS))
def test_parameter_count_matches_torchvision(depth, stem):
  model = models.resnet(depth, stem=stem, input_shape=(None, None, 3))
  assert _trainable_params(model) == TORCHVISION_PARAMS[(depth, stem)]


@pytest.mark.parametrize("depth", [18, 50])
def test_width_multiplier_scales_parameters(depth):
  full = models.resnet(depth, width=0.25)
  half = models.resnet(depth, width=0.125)
  # Conv kernels scale with width^2 except the stem conv (3 input channels);
  # BN gamma/beta scale with width.
  expected = 0
  for layer in full.layers:
    for weight in layer.trainable_weights:
      n = int(np.prod(weight.shape))
      if isinstance(layer, keras.layers.Conv2D) and layer.name != "stem_conv":
        expected += n // 4
      else:
        expected += n // 2
  assert _trainable_params(half) == expected
  assert half.output.shape[-1] * 2 == full.output.shape[-1]


def test_width_rounds_to_at_least_one_channel():
  model = models.resnet(18, width=0.001, input_shape=(8, 8, 3))
  for conv in _layers_of(model, keras.layers.Conv2D):
    assert conv.filters == 1
  assert tuple(model(_images(1, 8)).shape) == (1, 1)


def test_inputs_are_centred():
  model = models.resnet(18, width=TINY)
  centred = model.get_layer("rescale")(np.array([[0.0, 0.5, 1.0]], "float32"))
  np.testing.assert_allclose(np.asarray(centred), [[-1.0, 0.0, 1.0]])


@pytest.mark.parametrize("sync", [True, False])
def test_sync_batch_norm_reaches_every_layer(sync):
  model = models.resnet(50, width=TINY, sync_batch_norm=sync)
  bns = _layers_of(model, keras.layers.BatchNormalization)
  assert bns
  assert all(bn.synchronized is sync for bn in bns)
  assert all(bn.momentum == 0.9 and bn.epsilon == 1e-5 for bn in bns)


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16"])
def test_fused_batch_norm_matches_keras(precision):
  previous = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy(precision)
  try:
    x = np.random.default_rng(0).normal(
        1.0, 2.0, (4, 5, 5, 6)).astype("float32")
    fused = importlib.import_module(
        "supcon_tf.models.resnet").FusedBatchNormalization(momentum=0.9)
    plain = keras.layers.BatchNormalization(momentum=0.9)
    for layer in (fused, plain):
      layer.build(x.shape)
      layer.gamma.assign(np.linspace(0.5, 1.5, 6))
      layer.beta.assign(np.linspace(-1.0, 1.0, 6))
    tol = 1e-5 if precision == "float32" else 3e-2
    got, want = fused(x, training=True), plain(x, training=True)
    assert got.dtype == want.dtype
    np.testing.assert_allclose(np.asarray(got, "float32"),
                               np.asarray(want, "float32"), atol=tol)
    for name in ("moving_mean", "moving_variance"):
      np.testing.assert_allclose(getattr(fused, name).numpy(),
                                 getattr(plain, name).numpy(), rtol=1e-5,
                                 atol=1e-6)
    np.testing.assert_allclose(np.asarray(fused(x, training=False), "float32"),
                               np.asarray(plain(x, training=False), "float32"),
                               atol=tol)
  finally:
    keras.mixed_precision.set_global_policy(previous)


@pytest.mark.parametrize("config_sync,replicas,expected", [
    (None, 1, False), (None, 2, True), (True, 1, True), (False, 4, False)])
def test_build_encoder_sync_policy(config_sync, replicas, expected):
  config = config_lib.ModelConfig(encoder="resnet18", width=TINY,
                                  sync_batch_norm=config_sync)
  model = models.build_encoder(config, input_shape=(16, 16, 3),
                               num_replicas=replicas)
  assert model.name == "resnet18"
  bns = _layers_of(model, keras.layers.BatchNormalization)
  assert all(bn.synchronized is expected for bn in bns)


def test_build_encoder_follows_config():
  config = config_lib.ModelConfig(encoder="resnet50", stem="imagenet",
                                  width=TINY)
  model = models.build_encoder(config, input_shape=(32, 32, 3))
  assert model.name == "resnet50"
  assert tuple(model.input.shape) == (None, 32, 32, 3)
  assert model.output.shape[-1] == 128
  assert model.get_layer("stem_conv").kernel.shape[0] == 7


@pytest.mark.parametrize("depth", [19, 0, "50"])
def test_unknown_depth(depth):
  with pytest.raises(ValueError, match=r"valid depths are \[18, 34, 50, "
                     r"101, 152, 200\]") as info:
    models.resnet(depth)
  assert repr(depth) in str(info.value)


@pytest.mark.parametrize("name", ["resnet19", "vgg16", "resnet"])
def test_build_encoder_unknown_name(name):
  config = config_lib.ModelConfig(encoder=name)
  with pytest.raises(ValueError, match=f"'{name}'.*resnet18"):
    models.build_encoder(config)


def test_bad_stem_and_width():
  with pytest.raises(ValueError, match="stem='tiny'"):
    models.resnet(18, stem="tiny")
  with pytest.raises(ValueError, match="width must be > 0"):
    models.resnet(18, width=0)


def test_encoder_mixed_precision(mixed_bfloat16):
  model = models.resnet(18, width=TINY, input_shape=(16, 16, 3))
  conv = model.get_layer("stem_conv")
  assert conv.compute_dtype == "bfloat16"
  assert conv.variable_dtype == "float32"
  out = model(_images(2, 16))
  assert out.dtype == "float32"
  assert model.output.dtype == "float32"


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
  x = _images(3, 16, seed=5)
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
  views = tf.constant(_images(6, 16, seed=6).reshape(3, 2, 16, 16, 3))
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
