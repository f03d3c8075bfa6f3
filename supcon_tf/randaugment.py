"""Op-based view policies: RandAugment and AutoAugment.

  * `randaugment`: crop + flip + a RandAugment-style policy over the op set
    `OP_NAMES` (`num_ops` ops drawn uniformly, fixed `magnitude`).
  * `autoaugment`: crop + flip + the ImageNet AutoAugment policy (Cubuk et
    al. 2019: 25 sub-policies, their probabilities and magnitudes), with the
    op definitions of torchvision's `AutoAugment(AutoAugmentPolicy.IMAGENET)`.

Both follow the image and seed convention of `supcon_tf.image_ops` and are
re-exported by `supcon_tf.augment`, where `make_view_fn` picks them by name.
"""

import functools
import math
from typing import Optional, Sequence, Tuple

import tensorflow as tf

from supcon_tf import image_ops

# Largest op strengths (reached at magnitude 10) of the RandAugment op set.
_MAX_LEVEL = 10.0
_MAX_ROTATE_DEGREES = 30.0
_MAX_SHEAR = 0.3
_MAX_TRANSLATE = 0.3  # Fraction of the image side.
_MAX_ENHANCE = 0.9  # Enhance factors span [0.1, 1.9].
_FILL_VALUE = 0.5  # Grey fill for pixels moved in from outside the image.


# ----------------------------------------------------------------------------
# RandAugment op set. Each op maps (image [h, w, 3] in [0, 1],
# level in [0, 1], seed [2]) to an image; the seed only picks the sign of
# signed ops.


def _enhance_factor(level, seed):
  return 1.0 + image_ops.random_sign(seed) * _MAX_ENHANCE * level


def _identity_op(image, level, seed):
  del level, seed
  return image


def _autocontrast(image, level, seed):
  del level, seed
  low = tf.reduce_min(image, axis=[0, 1], keepdims=True)
  high = tf.reduce_max(image, axis=[0, 1], keepdims=True)
  spread = high - low
  # Flat channels are left as they are.
  scaled = (image - low) / tf.where(spread > 0, spread, 1.0)
  return tf.where(spread > 0, scaled, image)


def _brightness(image, level, seed):
  return image_ops.blend(tf.zeros_like(image), image,
                         _enhance_factor(level, seed))


def _color(image, level, seed):
  return image_ops.blend(image_ops.grayscale_rgb(image), image,
                         _enhance_factor(level, seed))


def _contrast(image, level, seed):
  mean = tf.reduce_mean(tf.image.rgb_to_grayscale(image))
  return image_ops.blend(tf.fill(tf.shape(image), mean), image,
                         _enhance_factor(level, seed))


def _sharpness(image, level, seed):
  kernel = tf.constant([[1., 1., 1.], [1., 5., 1.], [1., 1., 1.]]) / 13.0
  kernel = tf.tile(kernel[:, :, tf.newaxis, tf.newaxis], [1, 1, 3, 1])
  padded = tf.pad(image[tf.newaxis], [[0, 0], [1, 1], [1, 1], [0, 0]],
                  mode="REFLECT")
  smooth = tf.nn.depthwise_conv2d(padded, kernel, [1, 1, 1, 1], "VALID")[0]
  return image_ops.blend(smooth, image, _enhance_factor(level, seed))


def _solarize(image, level, seed):
  del seed
  # Threshold above 1 at level 0 (no pixel inverted), 0 at level 1 (all).
  threshold = (1.0 - level) * (256.0 / 255.0)
  return tf.where(image >= threshold, 1.0 - image, image)


def _posterize(image, level, seed):
  del seed
  # 8 bits at level 0 down to 4 bits at level 1.
  shift = tf.floor(level * 4.0)
  step = tf.pow(2.0, shift)
  quantized = tf.floor(tf.round(image * 255.0) / step) * step
  return quantized / 255.0


def _transform(image: tf.Tensor, matrix: Sequence[tf.Tensor],
               interpolation: str = "BILINEAR",
               fill: float = _FILL_VALUE) -> tf.Tensor:
  """Projective transform; `matrix` maps output (x, y) to input pixels."""
  transform = tf.reshape(
      tf.stack([tf.cast(v, tf.float32) for v in matrix] + [0.0, 0.0]), [1, 8])
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[tf.newaxis], transforms=transform,
      output_shape=tf.shape(image)[:2],
      fill_value=tf.constant(fill, tf.float32),
      interpolation=interpolation, fill_mode="CONSTANT")
  return tf.ensure_shape(out[0], image.shape)


def _rotate_by(image, degrees, interpolation="BILINEAR", fill=_FILL_VALUE):
  """Rotation by `degrees` about the image centre."""
  angle = degrees * (math.pi / 180.0)
  shape = tf.cast(tf.shape(image), tf.float32)
  height, width = shape[0] - 1.0, shape[1] - 1.0
  cos, sin = tf.cos(angle), tf.sin(angle)
  x_offset = (width - (cos * width - sin * height)) / 2.0
  y_offset = (height - (sin * width + cos * height)) / 2.0
  return _transform(image, [cos, -sin, x_offset, sin, cos, y_offset],
                    interpolation, fill)


def _rotate(image, level, seed):
  return _rotate_by(
      image, image_ops.random_sign(seed) * level * _MAX_ROTATE_DEGREES)


def _shear_x(image, level, seed):
  shear = image_ops.random_sign(seed) * level * _MAX_SHEAR
  height = tf.cast(tf.shape(image)[0], tf.float32) - 1.0
  return _transform(image, [1.0, shear, -shear * height / 2.0, 0.0, 1.0, 0.0])


def _shear_y(image, level, seed):
  shear = image_ops.random_sign(seed) * level * _MAX_SHEAR
  width = tf.cast(tf.shape(image)[1], tf.float32) - 1.0
  return _transform(image, [1.0, 0.0, 0.0, shear, 1.0, -shear * width / 2.0])


def _translate_x(image, level, seed):
  width = tf.cast(tf.shape(image)[1], tf.float32)
  shift = image_ops.random_sign(seed) * level * _MAX_TRANSLATE * width
  return _transform(image, [1.0, 0.0, -shift, 0.0, 1.0, 0.0])


def _translate_y(image, level, seed):
  height = tf.cast(tf.shape(image)[0], tf.float32)
  shift = image_ops.random_sign(seed) * level * _MAX_TRANSLATE * height
  return _transform(image, [1.0, 0.0, 0.0, 0.0, 1.0, -shift])


_OPS = {
    "identity": _identity_op,
    "autocontrast": _autocontrast,
    "brightness": _brightness,
    "color": _color,
    "contrast": _contrast,
    "sharpness": _sharpness,
    "solarize": _solarize,
    "posterize": _posterize,
    "rotate": _rotate,
    "shear_x": _shear_x,
    "shear_y": _shear_y,
    "translate_x": _translate_x,
    "translate_y": _translate_y,
}
OP_NAMES = tuple(_OPS)
_OP_FNS = tuple(_OPS.values())

def _apply_op(image: tf.Tensor, op_index: tf.Tensor, level: tf.Tensor,
              seed: tf.Tensor) -> tf.Tensor:
  """Applies op `OP_NAMES[op_index]` (a scalar int32 tensor)."""
  branches = [functools.partial(fn, image, level, seed) for fn in _OP_FNS]
  return tf.clip_by_value(tf.switch_case(op_index, branches), 0.0, 1.0)


def randaugment(image: tf.Tensor, seed: tf.Tensor, *, size: int,
                num_ops: int = 2, magnitude: float = 9,
                crop_scale: Tuple[float, float] = (0.2, 1.0),
                crop_sampling: str = "simclr") -> tf.Tensor:
  """Random resized crop, flip, then `num_ops` ops drawn from `OP_NAMES`.

  Args:
    image: `[height, width, 3]` uint8 or float32 in [0, 1].
    seed: `[2]` int seed.
    size: output side.
    num_ops: ops applied in sequence, each drawn uniformly (with repeats).
    magnitude: strength of every op on a 0-10 scale; signed ops (rotate,
      shear, translate, enhance) pick their sign at random.
    crop_scale: range of the crop area as a fraction of the image area.
    crop_sampling: how the crop box is drawn, `simclr` or `torchvision`
      (see `crop_box`).

  Returns:
    `[size, size, 3]` float32 in [0, 1].
  """
  if not 0 <= magnitude <= _MAX_LEVEL:
    raise ValueError(f"magnitude must be in [0, 10], got {magnitude}.")
  image = image_ops.to_float(image)
  seeds = image_ops.split_seed(seed, num_ops + 2)
  image = image_ops.crop_and_flip(image, seeds[0], size, crop_scale,
                                  crop_sampling)
  op_indices = tf.random.stateless_uniform(
      [num_ops], seeds[1], minval=0, maxval=len(_OP_FNS), dtype=tf.int32)
  level = tf.constant(magnitude / _MAX_LEVEL, tf.float32)
  for i in range(num_ops):
    image = _apply_op(image, op_indices[i], level, seeds[i + 2])
  return image


# ----------------------------------------------------------------------------
# AutoAugment: the ImageNet policy of Cubuk et al., "AutoAugment: Learning
# Augmentation Strategies from Data" (CVPR 2019), with the op definitions,
# magnitude bins and defaults of torchvision's
# `AutoAugment(AutoAugmentPolicy.IMAGENET)`.

# The 25 sub-policies: ((op, probability, magnitude bin 0-9 or None), x2).
AUTOAUGMENT_POLICY = (
    (("posterize", 0.4, 8), ("rotate", 0.6, 9)),
    (("solarize", 0.6, 5), ("autocontrast", 0.6, None)),
    (("equalize", 0.8, None), ("equalize", 0.6, None)),
    (("posterize", 0.6, 7), ("posterize", 0.6, 6)),
    (("equalize", 0.4, None), ("solarize", 0.2, 4)),
    (("equalize", 0.4, None), ("rotate", 0.8, 8)),
    (("solarize", 0.6, 3), ("equalize", 0.6, None)),
    (("posterize", 0.8, 5), ("equalize", 1.0, None)),
    (("rotate", 0.2, 3), ("solarize", 0.6, 8)),
    (("equalize", 0.6, None), ("posterize", 0.4, 6)),
    (("rotate", 0.8, 8), ("color", 0.4, 0)),
    (("rotate", 0.4, 9), ("equalize", 0.6, None)),
    (("equalize", 0.0, None), ("equalize", 0.8, None)),
    (("invert", 0.6, None), ("equalize", 1.0, None)),
    (("color", 0.6, 4), ("contrast", 1.0, 8)),
    (("rotate", 0.8, 8), ("color", 1.0, 2)),
    (("color", 0.8, 8), ("solarize", 0.8, 7)),
    (("sharpness", 0.4, 7), ("invert", 0.6, None)),
    (("shear_x", 0.6, 5), ("equalize", 1.0, None)),
    (("color", 0.4, 0), ("equalize", 0.6, None)),
    (("equalize", 0.4, None), ("solarize", 0.2, 4)),
    (("solarize", 0.6, 5), ("autocontrast", 0.6, None)),
    (("invert", 0.6, None), ("equalize", 1.0, None)),
    (("color", 0.6, 4), ("contrast", 1.0, 8)),
    (("equalize", 0.8, None), ("equalize", 0.6, None)),
)
_AUTOAUGMENT_BINS = 10
# Geometric ops as torchvision's defaults: nearest neighbour, black fill.
_AA_INTERPOLATION = "NEAREST"
_AA_FILL = 0.0


def autoaugment_magnitude(op: str, magnitude_bin: Optional[int]) -> float:
  """The strength of `op` at `magnitude_bin` (0-9), as torchvision's table.

  Args:
    op: an op name of `AUTOAUGMENT_POLICY`.
    magnitude_bin: bin index, or None for ops without a magnitude.

  Returns:
    shear_x: shear factor 0-0.3; rotate: degrees 0-30; color / contrast /
    sharpness: enhancement 0-0.9 (factor 1 +- it); posterize: bits kept,
    8 down to 4; solarize: threshold 255 down to 0; others: 0.
  """
  if magnitude_bin is None:
    return 0.0
  fraction = magnitude_bin / (_AUTOAUGMENT_BINS - 1)
  if op == "shear_x":
    return 0.3 * fraction
  if op == "rotate":
    return 30.0 * fraction
  if op in ("color", "contrast", "sharpness"):
    return 0.9 * fraction
  if op == "posterize":
    return float(8 - round(magnitude_bin / ((_AUTOAUGMENT_BINS - 1) / 4)))
  if op == "solarize":
    return 255.0 * (1.0 - fraction)
  raise ValueError(f"AutoAugment op {op!r} takes no magnitude.")


def _uint8_levels(image):
  """[0, 1] floats -> their nearest 0-255 integer levels (int32)."""
  return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 1.0) * 255.0),
                 tf.int32)


def _equalize(image):
  """Histogram equalisation per channel, as PIL / torchvision `equalize`."""
  levels = _uint8_levels(image)
  channels = []
  for c in range(3):
    channel = levels[..., c]
    hist = tf.math.bincount(tf.reshape(channel, [-1]), minlength=256,
                            maxlength=256, dtype=tf.int32)
    nonzero = tf.boolean_mask(hist, hist > 0)
    # Spread the pixels of all but the brightest occupied level evenly.
    step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255
    safe_step = tf.maximum(step, 1)
    lut = (tf.cumsum(hist) + safe_step // 2) // safe_step
    lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
    equalized = tf.cast(tf.gather(lut, channel), tf.float32) / 255.0
    # One occupied level (step 0): left as it is.
    channels.append(tf.where(step > 0, equalized, image[..., c]))
  return tf.stack(channels, axis=-1)


def _aa_sharpness(image, factor):
  """torchvision `adjust_sharpness`: the 1-pixel border is kept as is."""
  kernel = tf.constant([[1., 1., 1.], [1., 5., 1.], [1., 1., 1.]]) / 13.0
  kernel = tf.tile(kernel[:, :, tf.newaxis, tf.newaxis], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(image[tf.newaxis], kernel, [1, 1, 1, 1],
                                  "VALID")[0]
  smooth = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  shape = tf.shape(image)
  rows = tf.range(shape[0])[:, tf.newaxis, tf.newaxis]
  cols = tf.range(shape[1])[tf.newaxis, :, tf.newaxis]
  inner = ((rows > 0) & (rows < shape[0] - 1) & (cols > 0) &
           (cols < shape[1] - 1))
  degenerate = tf.where(inner, smooth, image)
  return image_ops.blend(degenerate, image, factor)


def _aa_posterize(image, bits):
  """Keeps the top `bits` (scalar, 4-8) bits of each 8-bit level."""
  step = tf.pow(2.0, 8.0 - tf.round(bits))
  levels = tf.cast(_uint8_levels(image), tf.float32)
  return tf.floor(levels / step) * step / 255.0


def _aa_solarize(image, threshold):
  """Inverts levels >= `threshold` (0-255)."""
  return tf.where(tf.cast(_uint8_levels(image), tf.float32) >= threshold,
                  1.0 - image, image)


def _aa_op(image, op, value, sign):
  """`op` of `AUTOAUGMENT_POLICY` at strength `value` (signed by `sign`).

  `value` and `sign` are scalars (Python or tensors); `sign` is +-1.
  """
  if op == "identity":
    return image
  if op == "posterize":
    return _aa_posterize(image, value)
  if op == "solarize":
    return _aa_solarize(image, value)
  if op == "autocontrast":
    return _autocontrast(image, None, None)
  if op == "equalize":
    return _equalize(image)
  if op == "invert":
    return 1.0 - image
  signed = sign * value
  if op == "rotate":
    return _rotate_by(image, signed, _AA_INTERPOLATION, _AA_FILL)
  if op == "shear_x":
    # About the top-left corner, as the original (1, level, 0, 0, 1, 0).
    return _transform(image, [1.0, signed, 0.0, 0.0, 1.0, 0.0],
                      _AA_INTERPOLATION, _AA_FILL)
  if op == "color":
    return image_ops.blend(image_ops.grayscale_rgb(image), image, 1.0 + signed)
  if op == "contrast":
    mean = tf.reduce_mean(tf.image.rgb_to_grayscale(image))
    return image_ops.blend(tf.fill(tf.shape(image), mean), image, 1.0 + signed)
  if op == "sharpness":
    return _aa_sharpness(image, 1.0 + signed)
  raise ValueError(f"Unknown AutoAugment op {op!r}.")


# Branch 0 (identity) stands for an op that was not drawn to run.
_AA_OP_NAMES = ("identity", "posterize", "solarize", "autocontrast",
                "equalize", "invert", "rotate", "shear_x", "color",
                "contrast", "sharpness")


def _apply_sub_policy(image: tf.Tensor, index, draws: tf.Tensor,
                      signs: tf.Tensor) -> tf.Tensor:
  """Sub-policy `AUTOAUGMENT_POLICY[index]` on `image` `[h, w, 3]`.

  Op i runs when `draws[i]` (uniform in [0, 1)) is below its probability;
  `signs` `[2]` (+-1) sign the signed ops. Tables and one `switch_case` per
  op slot rather than a branch per sub-policy: far faster to trace.
  """
  ops = tf.constant([[_AA_OP_NAMES.index(op) for op, _, _ in sub]
                     for sub in AUTOAUGMENT_POLICY], tf.int32)
  probs = tf.constant([[p for _, p, _ in sub] for sub in AUTOAUGMENT_POLICY],
                      tf.float32)
  values = tf.constant([[autoaugment_magnitude(op, m) for op, _, m in sub]
                        for sub in AUTOAUGMENT_POLICY], tf.float32)
  for i in range(2):
    op_index = tf.where(draws[i] < probs[index, i], ops[index, i], 0)
    branches = [functools.partial(_aa_op, image, name, values[index, i],
                                  signs[i]) for name in _AA_OP_NAMES]
    image = tf.clip_by_value(tf.switch_case(op_index, branches), 0.0, 1.0)
  return image


def autoaugment(image: tf.Tensor, seed: tf.Tensor, *, size: int,
                crop_scale: Tuple[float, float] = (0.2, 1.0),
                crop_sampling: str = "simclr") -> tf.Tensor:
  """Random resized crop, flip, then the ImageNet AutoAugment policy.

  One of the 25 sub-policies of `AUTOAUGMENT_POLICY` is drawn uniformly;
  each of its two ops is applied with its probability at the strength of
  its magnitude bin (`autoaugment_magnitude`), signed ops (rotate, shear,
  colour, contrast, sharpness) with a random sign, as torchvision's
  `AutoAugment(AutoAugmentPolicy.IMAGENET)` with its default nearest
  interpolation and black fill. One difference: the image stays float
  between ops, where torchvision rounds to 8 bits after each op.

  Args:
    image: `[height, width, 3]` uint8 or float32 in [0, 1].
    seed: `[2]` int seed.
    size: output side.
    crop_scale: range of the crop area as a fraction of the image area.
    crop_sampling: how the crop box is drawn, `simclr` or `torchvision`
      (see `crop_box`).

  Returns:
    `[size, size, 3]` float32 in [0, 1].
  """
  image = image_ops.to_float(image)
  seeds = image_ops.split_seed(seed, 4)
  image = image_ops.crop_and_flip(image, seeds[0], size, crop_scale,
                                  crop_sampling)
  choice = tf.random.stateless_uniform(
      [], seeds[1], minval=0, maxval=len(AUTOAUGMENT_POLICY), dtype=tf.int32)
  draws = tf.random.stateless_uniform([2], seeds[2])  # Apply op i?
  signs = tf.where(tf.random.stateless_uniform([2], seeds[3]) < 0.5, -1.0, 1.0)

  out = _apply_sub_policy(image, choice, draws, signs)
  return tf.ensure_shape(out, [size, size, 3])

