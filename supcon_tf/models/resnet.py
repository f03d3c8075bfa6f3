"""ResNet v1 encoders (He et al., 2016) as Keras 3 functional models.

The encoder maps images to the global-average-pooled representation that the
projection head and the linear classifier consume. Two stems are provided:
the CIFAR stem used by the SupCon paper for 32x32 images (3x3 stride-1 conv, no
max-pool) and the ImageNet stem (7x7 stride-2 conv + 3x3 stride-2 max-pool).

Bottleneck blocks put the stride on the 3x3 convolution (the "v1.5" layout of
torchvision and of the official SupCon code), so the parameter counts match
torchvision's ResNets without their final classifier.
"""

import keras
import tensorflow as tf

# depth -> (block kind, blocks per stage).
_SPECS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}
VALID_DEPTHS = tuple(sorted(_SPECS))
STEMS = ("cifar", "imagenet")

_STAGE_FILTERS = (64, 128, 256, 512)
_STAGE_STRIDES = (1, 2, 2, 2)
_BOTTLENECK_EXPANSION = 4
_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5


@keras.saving.register_keras_serializable(package="supcon_tf")
class FusedBatchNormalization(keras.layers.BatchNormalization):
  """`keras.layers.BatchNormalization` with a fused training kernel.

  Keras 3's TensorFlow backend runs training-mode batch norm as separate ops
  (moments, then elementwise normalisation, and their gradients), which took
  about half the step of the width-0.25 ResNet-18 on a 2-core CPU;
  `FusedBatchNormV3` is one oneDNN kernel each way (1.8x samples/s for
  that encoder, experiments/PROFILE.md). Same variables, names, moving
  statistics (biased batch variance) and inference path as the parent.
  Synchronized layers and inputs other than `[batch, H, W, C]` use the
  parent's code.
  """

  def call(self, inputs, training=None, mask=None):
    if (not training or self.synchronized or mask is not None
        or len(inputs.shape) != 4 or self.axis not in (-1, 3)
        or not (self.center and self.scale)):
      return super().call(inputs, training=training, mask=mask)
    y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
        inputs, tf.cast(self.gamma, tf.float32),
        tf.cast(self.beta, tf.float32), epsilon=self.epsilon,
        is_training=True)
    # The kernel returns the Bessel-corrected variance; Keras keeps the
    # biased one in its moving statistics.
    count = tf.cast(tf.size(inputs) // tf.shape(inputs)[-1], tf.float32)
    variance = variance * (count - 1.0) / tf.maximum(count, 1.0)
    m = self.momentum
    self.moving_mean.assign(self.moving_mean * m + mean * (1.0 - m))
    self.moving_variance.assign(self.moving_variance * m
                                + variance * (1.0 - m))
    return tf.cast(y, self.compute_dtype)


def representation_dim(depth: int, width: float = 1.0) -> int:
  """Width of the pooled representation of `resnet(depth, width=width)`.

  Args:
    depth: one of `VALID_DEPTHS`.
    width: channel multiplier.

  Returns:
    512 * width for depths 18/34, 2048 * width for 50 and deeper (rounded,
    at least 1).
  """
  kind, _ = _spec(depth)
  base = _STAGE_FILTERS[-1]
  if kind == "bottleneck":
    base *= _BOTTLENECK_EXPANSION
  return _scale(base, width)


def resnet(depth: int,
           *,
           stem: str = "cifar",
           width: float = 1.0,
           input_shape=(32, 32, 3),
           sync_batch_norm: bool = False,
           zero_init_residual: bool = True,
           name=None) -> keras.Model:
  """Builds a ResNet v1 encoder without its classification layer.

  Every layer follows the global Keras dtype policy, so
  `keras.mixed_precision.set_global_policy("mixed_bfloat16")` before the call
  gives a mixed-precision encoder; the pooled output is always float32.

  Args:
    depth: 18 or 34 (basic blocks), 50, 101, 152 or 200 (bottleneck blocks).
    stem: `"cifar"` (3x3 stride-1 conv, no max-pool; for small images) or
      `"imagenet"` (7x7 stride-2 conv + 3x3 stride-2 max-pool).
    width: multiplier of every convolution's channel count (rounded, at least
      1); e.g. 0.0625 makes a tiny model for tests.
    input_shape: `(H, W, 3)` of the images (H, W may be None).
    sync_batch_norm: use `BatchNormalization(synchronized=True)` so that
      replicas of a `tf.distribute` strategy share batch statistics.
    zero_init_residual: start the last batch norm of each residual branch with
      gamma = 0, so every block begins as the identity (Goyal et al., 2017).
    name: model name; defaults to `resnet{depth}`.

  Returns:
    A `keras.Model` mapping float32 images in [0, 1], `[batch, H, W, 3]`, to
    float32 representations `[batch, representation_dim(depth, width)]`.

  Raises:
    ValueError: for an unknown depth or stem, or a non-positive width.
  """
  kind, blocks = _spec(depth)
  if stem not in STEMS:
    raise ValueError(f"stem={stem!r} is not one of {list(STEMS)}.")
  if width is None or width <= 0:
    raise ValueError(f"width must be > 0, got {width!r}.")
  builder = _Builder(width, sync_batch_norm, zero_init_residual)

  inputs = keras.Input(shape=tuple(input_shape), name="images")
  # Centre [0, 1] inputs to [-1, 1] inside the model so callers and the
  # exported model feed plain images.
  x = keras.layers.Rescaling(2.0, offset=-1.0, name="rescale")(inputs)
  if stem == "cifar":
    x = builder.conv_bn(x, 64, 3, 1, "stem", relu=True)
  else:
    x = builder.conv_bn(x, 64, 7, 2, "stem", relu=True)
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same",
                                  name="stem_pool")(x)

  block = builder.basic_block if kind == "basic" else builder.bottleneck_block
  for stage, (filters, stride, count) in enumerate(
      zip(_STAGE_FILTERS, _STAGE_STRIDES, blocks), start=1):
    for index in range(count):
      x = block(x, filters, stride if index == 0 else 1,
                f"stage{stage}_block{index + 1}")

  x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
  # Mixed precision leaves the pooled features in the compute dtype; the
  # loss, all_gather and the linear head all expect float32.
  outputs = keras.layers.Activation("linear", dtype="float32",
                                    name="representation")(x)
  return keras.Model(inputs, outputs, name=name or f"resnet{depth}")


def _spec(depth):
  if depth not in _SPECS:
    raise ValueError(
        f"Unknown ResNet depth {depth!r}; valid depths are "
        f"{list(VALID_DEPTHS)}.")
  return _SPECS[depth]


def _scale(channels, width):
  return max(1, int(round(channels * width)))


class _Builder:
  """Adds named conv / batch-norm / block layers with shared settings."""

  def __init__(self, width, sync_batch_norm, zero_init_residual):
    self.width = width
    self.sync_batch_norm = bool(sync_batch_norm)
    self.zero_init_residual = zero_init_residual

  def conv_bn(self, x, filters, kernel_size, stride, name, relu,
              zero_gamma=False):
    """Conv (no bias, the BN beta replaces it) -> BN -> optional ReLU."""
    x = keras.layers.Conv2D(
        _scale(filters, self.width), kernel_size, strides=stride,
        padding="same", use_bias=False, kernel_initializer="he_normal",
        name=f"{name}_conv")(x)
    x = FusedBatchNormalization(
        momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON,
        gamma_initializer="zeros" if zero_gamma else "ones",
        synchronized=self.sync_batch_norm, name=f"{name}_bn")(x)
    if relu:
      x = keras.layers.ReLU(name=f"{name}_relu")(x)
    return x

  def _shortcut(self, x, filters, stride, name):
    if stride == 1 and x.shape[-1] == _scale(filters, self.width):
      return x
    return self.conv_bn(x, filters, 1, stride, f"{name}_shortcut", relu=False)

  def _merge(self, shortcut, residual, name):
    x = keras.layers.Add(name=f"{name}_add")([shortcut, residual])
    return keras.layers.ReLU(name=f"{name}_out")(x)

  def basic_block(self, x, filters, stride, name):
    """Two 3x3 convs; output has `filters * width` channels."""
    shortcut = self._shortcut(x, filters, stride, name)
    r = self.conv_bn(x, filters, 3, stride, f"{name}_1", relu=True)
    r = self.conv_bn(r, filters, 3, 1, f"{name}_2", relu=False,
                     zero_gamma=self.zero_init_residual)
    return self._merge(shortcut, r, name)

  def bottleneck_block(self, x, filters, stride, name):
    """1x1 reduce, 3x3 (strided), 1x1 expand to `4 * filters * width`."""
    out_filters = filters * _BOTTLENECK_EXPANSION
    shortcut = self._shortcut(x, out_filters, stride, name)
    r = self.conv_bn(x, filters, 1, 1, f"{name}_1", relu=True)
    r = self.conv_bn(r, filters, 3, stride, f"{name}_2", relu=True)
    r = self.conv_bn(r, out_filters, 1, 1, f"{name}_3", relu=False,
                     zero_gamma=self.zero_init_residual)
    return self._merge(shortcut, r, name)
