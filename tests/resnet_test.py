"""Tests for supcon_tf.models.resnet: ResNet encoders, fused batch norm."""

import importlib
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest

import conftest
from supcon_tf import models
# The package exports the function `resnet` under the submodule's name.
from supcon_tf.models.resnet import FusedBatchNormalization
from supcon_tf.models.resnet import STEMS

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


@pytest.mark.parametrize("depth,stem,size,rep_dim", [
    (18, "cifar", 16, 32),
    (18, "imagenet", 32, 32),
    (50, "cifar", 16, 128),
    (50, "imagenet", 32, 128),
])
def test_output_shape_and_dtype(depth, stem, size, rep_dim):
  model = models.resnet(depth, stem=stem, width=TINY,
                        input_shape=(size, size, 3))
  out = model(conftest.random_images(2, size))
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
  convs = conftest.layers_of(model, keras.layers.Conv2D)
  projections = 3 if depth in (18, 34) else 4
  assert len(convs) == depth - 1 + projections
  bns = conftest.layers_of(model, keras.layers.BatchNormalization)
  assert len(bns) == len(convs)
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
  for conv in conftest.layers_of(model, keras.layers.Conv2D):
    assert conv.filters == 1
  assert tuple(model(conftest.random_images(1, 8)).shape) == (1, 1)


def test_inputs_are_centred():
  model = models.resnet(18, width=TINY)
  centred = model.get_layer("rescale")(np.array([[0.0, 0.5, 1.0]], "float32"))
  np.testing.assert_allclose(np.asarray(centred), [[-1.0, 0.0, 1.0]])


@pytest.mark.parametrize("sync", [True, False])
def test_sync_batch_norm_reaches_every_layer(sync):
  model = models.resnet(50, width=TINY, sync_batch_norm=sync)
  bns = conftest.layers_of(model, keras.layers.BatchNormalization)
  assert bns
  assert all(bn.synchronized is sync for bn in bns)
  assert all(bn.momentum == 0.9 and bn.epsilon == 1e-5 for bn in bns)


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16"])
def test_fused_batch_norm_matches_keras(precision):
  with conftest.global_policy(precision):
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


@pytest.mark.parametrize("depth", [19, 0, "50"])
def test_unknown_depth(depth):
  with pytest.raises(ValueError, match=r"valid depths are \[18, 34, 50, "
                     r"101, 152, 200\]") as info:
    models.resnet(depth)
  assert repr(depth) in str(info.value)


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
  out = model(conftest.random_images(2, 16))
  assert out.dtype == "float32"
  assert model.output.dtype == "float32"


def _expected_params(depth, stem, width):
  """`(trainable, non-trainable)` parameter counts of a ResNet, by formula.

  Every conv has no bias and is followed by a batch norm with gamma, beta
  (trainable) and moving mean, variance (not trainable); channel counts are
  `round(channels * width)`, at least 1.
  """
  def channels(base):
    return max(1, int(round(base * width)))

  kind, blocks = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
                  50: ("bottleneck", (3, 4, 6, 3))}[depth]
  convs = [(3 if stem == "cifar" else 7, 3, channels(64))]  # (k, in, out)
  inputs = channels(64)
  for stage, (base, count) in enumerate(zip((64, 128, 256, 512), blocks)):
    for index in range(count):
      if kind == "basic":
        out = channels(base)
        convs += [(3, inputs, out), (3, out, out)]
      else:
        mid, out = channels(base), channels(4 * base)
        convs += [(1, inputs, mid), (3, mid, mid), (1, mid, out)]
      if (stage > 0 and index == 0) or inputs != out:  # projection shortcut
        convs.append((1, inputs, out))
      inputs = out
  batch_norm = sum(2 * out for _, _, out in convs)
  return sum(k * k * i * o for k, i, o in convs) + batch_norm, batch_norm


def test_parameter_formula_agrees_with_torchvision():
  for depth, stem in [(18, "imagenet"), (18, "cifar"), (34, "imagenet"),
                      (50, "imagenet")]:
    assert _expected_params(depth, stem, 1.0)[0] == TORCHVISION_PARAMS[
        (depth, stem)], (depth, stem)


@pytest.mark.parametrize("depth,stem,rep_dim", [
    (18, "cifar", 154), (18, "imagenet", 154), (50, "cifar", 614)])
def test_parameter_counts_at_a_width_that_rounds(depth, stem, rep_dim):
  # 0.3 rounds every stage's width (64 -> 19, 2048 -> 614, not 4 * 154).
  model = models.resnet(depth, stem=stem, width=0.3)
  trainable, moving = _expected_params(depth, stem, 0.3)
  assert _trainable_params(model) == trainable
  assert sum(int(np.prod(w.shape)) for w in model.non_trainable_weights) == (
      moving)
  assert model.output.shape[-1] == rep_dim
  assert models.representation_dim(depth, 0.3) == rep_dim


@pytest.mark.parametrize("stem", STEMS)
def test_images_of_any_size_with_unknown_spatial_dims(stem):
  model = models.resnet(18, stem=stem, width=TINY,
                            input_shape=(None, None, 3))
  for size in (8, 20):
    out = model(conftest.random_images(3, size, seed=size))
    assert tuple(out.shape) == (3, models.representation_dim(18, TINY))
    assert np.all(np.isfinite(np.asarray(out)))


@pytest.mark.parametrize("zero_init", [True, False])
def test_zero_init_residual_starts_blocks_as_the_identity(zero_init):
  model = models.resnet(18, width=TINY, input_shape=(16, 16, 3),
                            zero_init_residual=zero_init)
  last = [layer for layer in model.layers
          if layer.name.startswith("stage") and layer.name.endswith("_2_bn")]
  assert len(last) == 8  # One per basic block.
  for bn in last:
    np.testing.assert_array_equal(bn.gamma.numpy(), 0.0 if zero_init else 1.0)
  # stage1_block2 has an identity shortcut and a ReLU'd (>= 0) input: with
  # its residual at zero it passes that input on unchanged.
  probe = keras.Model(model.input,
                      [model.get_layer("stage1_block1_out").output,
                       model.get_layer("stage1_block2_out").output])
  block_in, block_out = (
      np.asarray(t) for t in probe(conftest.random_images(2, 16),
                                   training=False))
  if zero_init:
    np.testing.assert_array_equal(block_out, block_in)
  else:
    assert np.abs(block_out - block_in).max() > 1e-3


def test_fused_batch_norm_uses_keras_for_other_ranks():
  x = np.random.default_rng(1).normal(2.0, 3.0, (6, 4)).astype("float32")
  fused = FusedBatchNormalization(momentum=0.5)
  plain = keras.layers.BatchNormalization(momentum=0.5)
  for layer in (fused, plain):
    layer.build(x.shape)
  np.testing.assert_allclose(np.asarray(fused(x, training=True)),
                             np.asarray(plain(x, training=True)), atol=1e-6)
  np.testing.assert_allclose(fused.moving_variance.numpy(),
                             plain.moving_variance.numpy(), rtol=1e-6)
  # Normalised over the batch: zero mean, unit (biased) variance per column.
  y = np.asarray(fused(x, training=True))
  np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(y.var(0), 1.0, rtol=1e-3)


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
