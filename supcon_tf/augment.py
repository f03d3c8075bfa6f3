"""View augmentation policies built from stateless TF ops.

Every policy maps one image `[height, width, 3]` (float32 in [0, 1]) and a
seed `[2]` (int32/int64) to one augmented image `[size, size, 3]` (float32 in
[0, 1]). All randomness comes from `tf.random.stateless_*` /
`tf.image.stateless_*` ops keyed by that seed, so a `tf.data` pipeline that
derives the seed from the element index is reproducible run to run and does
not depend on the global or op-level TF seeds.

Policies:
  * `simclr_augment`: the SimCLR / SupCon recipe (random resized crop, flip,
    colour jitter, grayscale, optional Gaussian blur).
  * `randaugment`: crop + flip + a RandAugment-style policy over the op set
    below (`num_ops` ops drawn uniformly, fixed `magnitude`).
  * `autoaugment`: crop + flip + the ImageNet AutoAugment policy (Cubuk et
    al. 2019: 25 sub-policies, their probabilities and magnitudes), with the
    op definitions of torchvision's `AutoAugment(AutoAugmentPolicy.IMAGENET)`.
  * `identity` ("none"): resize (or the evaluation centre crop) only.

`eval_image` is the evaluation view (and that of the exported model's
`serving_bytes`): the short side resized to size / 0.875 and the centre
kept, or the whole image resized.

Random resized crops draw their box as SimCLR's TF code (`simclr`) or as
torchvision's `RandomResizedCrop` (`torchvision`); see `crop_box`.

`make_view_fn` turns a policy name into the per-example function used by
`supcon_tf.data`.
"""

import functools
import math
from typing import Callable, Optional, Sequence, Tuple

import tensorflow as tf

from supcon_tf import config as config_lib

# Colour jitter strengths of the SupCon / SimCLR CIFAR recipe.
_BRIGHTNESS = 0.4
_CONTRAST = 0.4
_SATURATION = 0.4
_HUE = 0.1
_JITTER_PROB = 0.8
_GRAYSCALE_PROB = 0.2
_BLUR_PROB = 0.5
_ASPECT_RANGE = (3.0 / 4.0, 4.0 / 3.0)

# Largest op strengths (reached at magnitude 10) of the RandAugment op set.
_MAX_LEVEL = 10.0
_MAX_ROTATE_DEGREES = 30.0
_MAX_SHEAR = 0.3
_MAX_TRANSLATE = 0.3  # Fraction of the image side.
_MAX_ENHANCE = 0.9  # Enhance factors span [0.1, 1.9].
_FILL_VALUE = 0.5  # Grey fill for pixels moved in from outside the image.


def _to_float(image: tf.Tensor) -> tf.Tensor:
  """uint8 images to float32 in [0, 1]; float images are only cast."""
  image = tf.convert_to_tensor(image)
  if image.dtype == tf.uint8:
    return uint8_to_float(image)  # As evaluation, to the last bit.
  if image.dtype.is_integer:
    return tf.image.convert_image_dtype(image, tf.float32)
  return tf.cast(image, tf.float32)


def _split(seed: tf.Tensor, num: int) -> tf.Tensor:
  """`num` independent seeds `[num, 2]` from one seed `[2]`."""
  return tf.random.experimental.stateless_split(seed, num=num)


def _uniform(seed: tf.Tensor, low: float = 0.0, high: float = 1.0):
  return tf.random.stateless_uniform([], seed, minval=low, maxval=high)


def _random_sign(seed: tf.Tensor) -> tf.Tensor:
  return tf.where(_uniform(seed) < 0.5, -1.0, 1.0)


def _maybe_apply(fn: Callable[[tf.Tensor], tf.Tensor], image: tf.Tensor,
                 prob, seed: tf.Tensor) -> tf.Tensor:
  """Applies `fn` with probability `prob` (python or tensor scalar)."""
  return tf.cond(_uniform(seed) < prob, lambda: fn(image), lambda: image)


def _resize(image: tf.Tensor, size: int) -> tf.Tensor:
  """Resizes `[h, w, 3]` to `[size, size, 3]`; a no-op when already there."""
  static = image.shape[:2]
  if static[0] == size and static[1] == size:
    return image
  height_width = tf.shape(image)[:2]
  same = tf.reduce_all(tf.equal(height_width, size))
  resized = tf.cond(
      same, lambda: image,
      lambda: tf.image.resize(image, [size, size], antialias=True))
  return tf.ensure_shape(resized, [size, size, 3])


def _grayscale_rgb(image: tf.Tensor) -> tf.Tensor:
  return tf.tile(tf.image.rgb_to_grayscale(image), [1, 1, 3])


# ----------------------------------------------------------------------------
# Geometry shared by all policies.


def _simclr_box(shape, seed, crop_scale, aspect_ratio):
  """`(begin [3], size [3])` of TF's `sample_distorted_bounding_box`.

  As SimCLR's TF code: the aspect ratio is uniform and the crop height is
  uniform between the heights of the smallest and largest allowed areas, so
  areas lean small (median 0.46 of a square image at `crop_scale=(0.2, 1)`,
  `tests/augment_test.py`).
  """
  whole_image = tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4])
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=whole_image, seed=seed,
      min_object_covered=0.1, aspect_ratio_range=aspect_ratio,
      area_range=crop_scale, max_attempts=100,
      use_image_if_no_bounding_boxes=True)
  return begin, size


def _torchvision_box(shape, seed, crop_scale, aspect_ratio, tries=10):
  """`(begin [3], size [3])` as torchvision's `RandomResizedCrop`.

  Area uniform in `crop_scale`, aspect ratio log-uniform; the first of
  `tries` boxes that fits in the image wins, and when none fits the centre
  crop of the clamped aspect ratio is used. At (0.2, 1) the proposals have
  median area 0.6; large boxes off the square aspect do not fit, so the
  median of a square image's crops is 0.54 (`tests/augment_test.py`).
  """
  height = tf.cast(shape[0], tf.float32)
  width = tf.cast(shape[1], tf.float32)
  seeds = _split(seed, 4)
  area = height * width * tf.random.stateless_uniform(
      [tries], seeds[0], minval=crop_scale[0], maxval=crop_scale[1])
  log_low, log_high = math.log(aspect_ratio[0]), math.log(aspect_ratio[1])
  ratio = tf.exp(tf.random.stateless_uniform(
      [tries], seeds[1], minval=log_low, maxval=log_high))
  # Python's round() in torchvision is half-to-even, as tf.round.
  box_w = tf.round(tf.sqrt(area * ratio))
  box_h = tf.round(tf.sqrt(area / ratio))
  fits = (box_w > 0) & (box_w <= width) & (box_h > 0) & (box_h <= height)
  first = tf.argmax(tf.cast(fits, tf.int32))
  # Offsets uniform over the integer positions [0, side - box].
  top = tf.floor(tf.random.stateless_uniform([tries], seeds[2]) *
                 (height - box_h + 1.0))
  left = tf.floor(tf.random.stateless_uniform([tries], seeds[3]) *
                  (width - box_w + 1.0))
  # Fallback: the whole image, its aspect ratio clamped to `aspect_ratio`.
  in_ratio = width / height
  fallback_w = tf.where(in_ratio > aspect_ratio[1],
                        tf.round(height * aspect_ratio[1]), width)
  fallback_h = tf.where(in_ratio < aspect_ratio[0],
                        tf.round(width / aspect_ratio[0]), height)
  found = tf.reduce_any(fits)
  box = tf.where(
      found,
      tf.stack([top[first], left[first], box_h[first], box_w[first]]),
      tf.stack([tf.floor((height - fallback_h) / 2.0),
                tf.floor((width - fallback_w) / 2.0), fallback_h,
                fallback_w]))
  box = tf.cast(box, tf.int32)
  begin = tf.stack([box[0], box[1], 0])
  size = tf.stack([box[2], box[3], -1])
  return begin, size


def crop_box(shape: tf.Tensor, seed: tf.Tensor, *,
             crop_scale: Tuple[float, float] = (0.2, 1.0),
             aspect_ratio: Tuple[float, float] = _ASPECT_RANGE,
             sampling: str = "simclr") -> Tuple[tf.Tensor, tf.Tensor]:
  """Samples the box of a random resized crop.

  Args:
    shape: `[3]` int shape `(height, width, channels)` of the image.
    seed: `[2]` int seed.
    crop_scale: range of the box area as a fraction of the image area.
    aspect_ratio: range of the box width / height.
    sampling: `simclr` (TF's `sample_distorted_bounding_box`, as SimCLR's
      TF code: height uniform, areas lean small) or `torchvision`
      (`RandomResizedCrop`: area uniform, aspect log-uniform, 10 tries then
      a centre crop); see `supcon_tf.config.CROP_SAMPLINGS`.

  Returns:
    `(begin, size)`, int32 `[3]` each, for `tf.slice(image, begin, size)`
    (`size[2]` is -1: all channels).

  Raises:
    ValueError: unknown `sampling`.
  """
  if sampling == "simclr":
    return _simclr_box(shape, seed, crop_scale, aspect_ratio)
  if sampling == "torchvision":
    return _torchvision_box(shape, seed, crop_scale, aspect_ratio)
  raise ValueError(f"Unknown crop sampling {sampling!r}; choose one of "
                   f"{list(config_lib.CROP_SAMPLINGS)}.")


def random_resized_crop(image: tf.Tensor, seed: tf.Tensor, *, size: int,
                        crop_scale: Tuple[float, float] = (0.2, 1.0),
                        aspect_ratio: Tuple[float, float] = _ASPECT_RANGE,
                        sampling: str = "simclr") -> tf.Tensor:
  """Crops a random box and resizes it to `[size, size, 3]`.

  Args:
    image: `[height, width, 3]` float32.
    seed: `[2]` int seed.
    size: output side.
    crop_scale: range of the box area as a fraction of the image area.
    aspect_ratio: range of the box width / height.
    sampling: how the box is drawn, `simclr` or `torchvision` (`crop_box`).

  Returns:
    `[size, size, 3]` float32.
  """
  begin, crop_size = crop_box(tf.shape(image), seed, crop_scale=crop_scale,
                              aspect_ratio=aspect_ratio, sampling=sampling)
  crop = tf.slice(image, begin, crop_size)
  crop = tf.image.resize(crop, [size, size], antialias=True)
  return tf.ensure_shape(crop, [size, size, 3])


def _crop_and_flip(image, seed, size, crop_scale, crop_sampling):
  crop_seed, flip_seed = tf.unstack(_split(seed, 2))
  image = random_resized_crop(image, crop_seed, size=size,
                              crop_scale=crop_scale, sampling=crop_sampling)
  return tf.image.stateless_random_flip_left_right(image, flip_seed)


# ----------------------------------------------------------------------------
# SimCLR policy.


def _color_jitter(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Brightness, contrast, saturation and hue jitter in a random order."""
  seeds = _split(seed, 5)
  brightness = _uniform(seeds[0], 1.0 - _BRIGHTNESS, 1.0 + _BRIGHTNESS)
  contrast = _uniform(seeds[1], 1.0 - _CONTRAST, 1.0 + _CONTRAST)
  saturation = _uniform(seeds[2], 1.0 - _SATURATION, 1.0 + _SATURATION)
  hue = _uniform(seeds[3], -_HUE, _HUE)
  # Multiplicative brightness, as in torchvision and SimCLR v2.
  transforms = [
      lambda x: x * brightness,
      lambda x: tf.image.adjust_contrast(x, contrast),
      lambda x: tf.image.adjust_saturation(x, saturation),
      lambda x: tf.image.adjust_hue(x, hue),
  ]
  order = tf.argsort(tf.random.stateless_uniform([4], seeds[4]))
  for i in range(4):
    branches = [functools.partial(lambda f, x: tf.clip_by_value(f(x), 0., 1.),
                                  fn, image) for fn in transforms]
    image = tf.switch_case(order[i], branches)
  return image


def _gaussian_blur(image: tf.Tensor, seed: tf.Tensor, size: int) -> tf.Tensor:
  """Separable Gaussian blur, kernel ~10% of `size`, sigma in [0.1, 2]."""
  radius = (size // 10) // 2
  if radius == 0:
    return image
  sigma = _uniform(seed, 0.1, 2.0)
  x = tf.range(-radius, radius + 1, dtype=tf.float32)
  kernel = tf.exp(-tf.square(x) / (2.0 * tf.square(sigma)))
  kernel /= tf.reduce_sum(kernel)
  # Reflect padding keeps the borders from darkening.
  padded = tf.pad(image[tf.newaxis],
                  [[0, 0], [radius, radius], [radius, radius], [0, 0]],
                  mode="REFLECT")
  vertical = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, 3, 1])
  horizontal = tf.tile(tf.reshape(kernel, [1, -1, 1, 1]), [1, 1, 3, 1])
  blurred = tf.nn.depthwise_conv2d(padded, vertical, [1, 1, 1, 1], "VALID")
  blurred = tf.nn.depthwise_conv2d(blurred, horizontal, [1, 1, 1, 1], "VALID")
  return blurred[0]


def simclr_augment(image: tf.Tensor, seed: tf.Tensor, *, size: int,
                   blur: bool = False,
                   crop_scale: Tuple[float, float] = (0.2, 1.0),
                crop_sampling: str = "simclr") -> tf.Tensor:
  """The SimCLR / SupCon view augmentation.

  Random resized crop (area `crop_scale`, aspect 3/4-4/3) resized to `size`,
  horizontal flip (p=0.5), colour jitter (p=0.8; brightness, contrast,
  saturation 0.4, hue 0.1, applied in a random order), grayscale (p=0.2),
  optionally Gaussian blur (p=0.5, sigma 0.1-2.0, kernel ~10% of `size`).

  Args:
    image: `[height, width, 3]` uint8 or float32 in [0, 1].
    seed: `[2]` int seed; equal seeds give equal outputs.
    size: output side.
    blur: apply the Gaussian blur (ImageNet recipe; off for CIFAR).
    crop_scale: range of the crop area as a fraction of the image area.
    crop_sampling: how the crop box is drawn, `simclr` or `torchvision`
      (see `crop_box`).

  Returns:
    `[size, size, 3]` float32 in [0, 1].
  """
  image = _to_float(image)
  seeds = _split(seed, 6)
  image = _crop_and_flip(image, seeds[0], size, crop_scale,
                         crop_sampling)
  image = _maybe_apply(lambda x: _color_jitter(x, seeds[1]), image,
                       _JITTER_PROB, seeds[2])
  image = _maybe_apply(_grayscale_rgb, image, _GRAYSCALE_PROB, seeds[3])
  if blur:
    image = _maybe_apply(lambda x: _gaussian_blur(x, seeds[4], size), image,
                         _BLUR_PROB, seeds[5])
  return tf.clip_by_value(image, 0.0, 1.0)


# ----------------------------------------------------------------------------
# RandAugment op set. Each op maps (image [h, w, 3] in [0, 1],
# level in [0, 1], seed [2]) to an image; the seed only picks the sign of
# signed ops.


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor) -> tf.Tensor:
  """PIL ImageEnhance: factor 0 gives `degenerate`, 1 gives `image`."""
  return tf.clip_by_value(degenerate + factor * (image - degenerate), 0., 1.)


def _enhance_factor(level, seed):
  return 1.0 + _random_sign(seed) * _MAX_ENHANCE * level


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
  return _blend(tf.zeros_like(image), image, _enhance_factor(level, seed))


def _color(image, level, seed):
  return _blend(_grayscale_rgb(image), image, _enhance_factor(level, seed))


def _contrast(image, level, seed):
  mean = tf.reduce_mean(tf.image.rgb_to_grayscale(image))
  return _blend(tf.fill(tf.shape(image), mean), image,
                _enhance_factor(level, seed))


def _sharpness(image, level, seed):
  kernel = tf.constant([[1., 1., 1.], [1., 5., 1.], [1., 1., 1.]]) / 13.0
  kernel = tf.tile(kernel[:, :, tf.newaxis, tf.newaxis], [1, 1, 3, 1])
  padded = tf.pad(image[tf.newaxis], [[0, 0], [1, 1], [1, 1], [0, 0]],
                  mode="REFLECT")
  smooth = tf.nn.depthwise_conv2d(padded, kernel, [1, 1, 1, 1], "VALID")[0]
  return _blend(smooth, image, _enhance_factor(level, seed))


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
  return _rotate_by(image, _random_sign(seed) * level * _MAX_ROTATE_DEGREES)


def _shear_x(image, level, seed):
  shear = _random_sign(seed) * level * _MAX_SHEAR
  height = tf.cast(tf.shape(image)[0], tf.float32) - 1.0
  return _transform(image, [1.0, shear, -shear * height / 2.0, 0.0, 1.0, 0.0])


def _shear_y(image, level, seed):
  shear = _random_sign(seed) * level * _MAX_SHEAR
  width = tf.cast(tf.shape(image)[1], tf.float32) - 1.0
  return _transform(image, [1.0, 0.0, 0.0, shear, 1.0, -shear * width / 2.0])


def _translate_x(image, level, seed):
  width = tf.cast(tf.shape(image)[1], tf.float32)
  shift = _random_sign(seed) * level * _MAX_TRANSLATE * width
  return _transform(image, [1.0, 0.0, -shift, 0.0, 1.0, 0.0])


def _translate_y(image, level, seed):
  height = tf.cast(tf.shape(image)[0], tf.float32)
  shift = _random_sign(seed) * level * _MAX_TRANSLATE * height
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
  image = _to_float(image)
  seeds = _split(seed, num_ops + 2)
  image = _crop_and_flip(image, seeds[0], size, crop_scale,
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
  return _blend(degenerate, image, factor)


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
    return _blend(_grayscale_rgb(image), image, 1.0 + signed)
  if op == "contrast":
    mean = tf.reduce_mean(tf.image.rgb_to_grayscale(image))
    return _blend(tf.fill(tf.shape(image), mean), image, 1.0 + signed)
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
  image = _to_float(image)
  seeds = _split(seed, 4)
  image = _crop_and_flip(image, seeds[0], size, crop_scale, crop_sampling)
  choice = tf.random.stateless_uniform(
      [], seeds[1], minval=0, maxval=len(AUTOAUGMENT_POLICY), dtype=tf.int32)
  draws = tf.random.stateless_uniform([2], seeds[2])  # Apply op i?
  signs = tf.where(tf.random.stateless_uniform([2], seeds[3]) < 0.5, -1.0, 1.0)

  out = _apply_sub_policy(image, choice, draws, signs)
  return tf.ensure_shape(out, [size, size, 3])


# ----------------------------------------------------------------------------
# Evaluation images (shared with `supcon_tf.export`, so that evaluation and
# serving see the same pixels).

EVAL_CROP_FRACTION = 0.875  # 224 of 256, the standard ImageNet protocol.


def _check_eval_crop(crop: str) -> None:
  if crop not in ("center", "resize"):
    raise ValueError(f"eval crop must be 'center' or 'resize', got {crop!r} "
                     "('auto' is settled by DataConfig.resolved_eval_crop).")


def _eval_geometry(image: tf.Tensor, size: int, crop: str) -> tf.Tensor:
  """Float `[h, w, 3]` -> float `[size, size, 3]` (values not rounded).

  `center`: the short side is resized to round(size / EVAL_CROP_FRACTION)
  and the long side by the same factor (truncated), bilinear with
  antialiasing, then the centre `size x size` is kept (offsets rounded half
  to even), as torchvision's `Resize(256)` + `CenterCrop(224)`. `resize`:
  the whole image is resized to `size x size` (untouched when already so).
  """
  _check_eval_crop(crop)
  if crop == "resize":
    return _resize(image, size)
  side = int(round(size / EVAL_CROP_FRACTION))
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  short, long = tf.minimum(height, width), tf.maximum(height, width)
  long = side * long // short
  new_height = tf.where(height <= width, side, long)
  new_width = tf.where(height <= width, long, side)
  resized = tf.image.resize(image, tf.stack([new_height, new_width]),
                            method="bilinear", antialias=True)

  def offset(length):
    return tf.cast(tf.round(tf.cast(length - size, tf.float32) / 2.0),
                   tf.int32)

  crop_box = tf.slice(resized, tf.stack([offset(new_height),
                                         offset(new_width), 0]),
                      [size, size, -1])
  return tf.ensure_shape(crop_box, [size, size, 3])


def eval_image(image: tf.Tensor, *, size: int, crop: str) -> tf.Tensor:
  """The evaluation (and serving) view of one uint8 image.

  Args:
    image: `[height, width, 3]` uint8, any size.
    size: output side.
    crop: `center` (resize the short side to round(size / 0.875), keep the
      centre) or `resize` (resize the whole image); see `_eval_geometry`.

  Returns:
    `[size, size, 3]` uint8: resized pixels are rounded to the nearest
    integer, as an 8-bit image library would store them. An image already
    `size x size` passes unchanged under `resize`.

  Raises:
    TypeError: `image` is not uint8.
    ValueError: unknown `crop`.
  """
  image = tf.convert_to_tensor(image)
  if image.dtype != tf.uint8:
    raise TypeError(f"eval_image needs a uint8 image, got {image.dtype.name}.")
  _check_eval_crop(crop)
  if crop == "resize" and tuple(image.shape[:2]) == (size, size):
    return image
  # Resizing is linear, so it can work on the 0-255 values directly.
  out = _eval_geometry(tf.cast(image, tf.float32), size, crop)
  return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)


def uint8_to_float(images: tf.Tensor) -> tf.Tensor:
  """uint8 images of any shape -> float32 in [0, 1] (`x * (1 / 255)`).

  Evaluation and the exported model both convert with this function, so
  their float pixels agree bit for bit. A product, not `x / 255`: graph
  optimisation may turn a division by a constant into this product in one
  graph and not in another.
  """
  return tf.cast(images, tf.float32) * (1.0 / 255.0)


def identity(image: tf.Tensor, seed: Optional[tf.Tensor] = None, *,
             size: int, crop: str = "resize") -> tf.Tensor:
  """No augmentation: `[size, size, 3]` float32 in [0, 1].

  `crop` is `resize` (resize the whole image) or `center` (the evaluation
  centre crop of `eval_image`, without its rounding to 8 bits).
  """
  del seed
  return _eval_geometry(_to_float(image), size, crop)


def make_view_fn(policy: str, *, size: int, blur: bool = False,
                 num_views: int = 2, crop_sampling: str = "simclr",
                 eval_crop: str = "resize"
                 ) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
  """Builds the per-example multi-view augmentation.

  Args:
    policy: one of `supcon_tf.config.AUGMENTATIONS` (`simclr`, `randaugment`,
      `autoaugment`, `none`).
    size: output side of each view.
    blur: Gaussian blur in the `simclr` policy.
    num_views: views per image; each gets its own seed (the per-example seed
      with the view index folded in), so views differ.
    crop_sampling: how random resized crops draw their box, one of
      `supcon_tf.config.CROP_SAMPLINGS` (`simclr`, `torchvision`; see
      `crop_box`).
    eval_crop: how the `none` policy brings images to `size`: `resize` or
      `center` (see `identity`).

  Returns:
    `fn(image, seed)` mapping `[height, width, 3]` uint8 or float32 in [0, 1]
    and a `[2]` int seed to views `[num_views, size, size, 3]` float32 in
    [0, 1].

  Raises:
    ValueError: unknown `policy` or `crop_sampling`, or `num_views` / `size`
      below 1.
  """
  if crop_sampling not in config_lib.CROP_SAMPLINGS:
    raise ValueError(f"Unknown crop sampling {crop_sampling!r}; choose one of "
                     f"{list(config_lib.CROP_SAMPLINGS)}.")
  crop = dict(size=size, crop_sampling=crop_sampling)
  policies = {
      "simclr": functools.partial(simclr_augment, blur=blur, **crop),
      "randaugment": functools.partial(randaugment, **crop),
      "autoaugment": functools.partial(autoaugment, **crop),
      "none": functools.partial(identity, size=size, crop=eval_crop),
  }
  if policy not in config_lib.AUGMENTATIONS or policy not in policies:
    raise ValueError(f"Unknown augmentation policy {policy!r}; choose one of "
                     f"{list(config_lib.AUGMENTATIONS)}.")
  if num_views < 1:
    raise ValueError(f"num_views must be >= 1, got {num_views}.")
  if size < 1:
    raise ValueError(f"size must be >= 1, got {size}.")
  augment_one = policies[policy]

  # Plain TF ops throughout (tf.cond / tf.switch_case), so autograph has
  # nothing to convert; skipping it makes tracing inside Dataset.map faster.
  @tf.autograph.experimental.do_not_convert
  def view_fn(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    image = _to_float(image)
    seed = tf.convert_to_tensor(seed)
    views = [
        augment_one(image, tf.random.experimental.stateless_fold_in(seed, v))
        for v in range(num_views)
    ]
    return tf.ensure_shape(tf.stack(views), [num_views, size, size, 3])

  return view_fn
