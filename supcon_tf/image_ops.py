"""Stateless image ops shared by the view policies.

The building blocks of `supcon_tf.augment` and `supcon_tf.randaugment`:
float conversion, seed helpers, resizing, grayscale, blending and the random
resized crop (`crop_box`, `random_resized_crop`, `crop_and_flip`).

Images are `[height, width, 3]` float32 in [0, 1] and seeds `[2]`
(int32/int64). All randomness comes from `tf.random.stateless_*` /
`tf.image.stateless_*` ops keyed by that seed, so a `tf.data` pipeline that
derives the seed from the element index is reproducible run to run and does
not depend on the global or op-level TF seeds. A function that needs several
draws splits its seed with `split_seed`.
"""

import math
from typing import Callable, Tuple

import tensorflow as tf

from supcon_tf import config as config_lib

_ASPECT_RANGE = (3.0 / 4.0, 4.0 / 3.0)


def uint8_to_float(images: tf.Tensor) -> tf.Tensor:
  """uint8 images of any shape -> float32 in [0, 1] (`x * (1 / 255)`).

  Evaluation and the exported model both convert with this function, so
  their float pixels agree bit for bit. A product, not `x / 255`: graph
  optimisation may turn a division by a constant into this product in one
  graph and not in another.
  """
  return tf.cast(images, tf.float32) * (1.0 / 255.0)


def to_float(image: tf.Tensor) -> tf.Tensor:
  """uint8 images to float32 in [0, 1]; float images are only cast."""
  image = tf.convert_to_tensor(image)
  if image.dtype == tf.uint8:
    return uint8_to_float(image)  # As evaluation, to the last bit.
  if image.dtype.is_integer:
    return tf.image.convert_image_dtype(image, tf.float32)
  return tf.cast(image, tf.float32)


def split_seed(seed: tf.Tensor, num: int) -> tf.Tensor:
  """`num` independent seeds `[num, 2]` from one seed `[2]`."""
  return tf.random.experimental.stateless_split(seed, num=num)


def uniform(seed: tf.Tensor, low: float = 0.0, high: float = 1.0):
  """A float32 scalar uniform in [low, high)."""
  return tf.random.stateless_uniform([], seed, minval=low, maxval=high)


def random_sign(seed: tf.Tensor) -> tf.Tensor:
  """-1.0 or 1.0, each with probability 0.5."""
  return tf.where(uniform(seed) < 0.5, -1.0, 1.0)


def maybe_apply(fn: Callable[[tf.Tensor], tf.Tensor], image: tf.Tensor,
                prob, seed: tf.Tensor) -> tf.Tensor:
  """Applies `fn` with probability `prob` (python or tensor scalar)."""
  return tf.cond(uniform(seed) < prob, lambda: fn(image), lambda: image)


def resize(image: tf.Tensor, size: int) -> tf.Tensor:
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


def grayscale_rgb(image: tf.Tensor) -> tf.Tensor:
  """The grayscale of `image` `[h, w, 3]`, repeated in all 3 channels."""
  return tf.tile(tf.image.rgb_to_grayscale(image), [1, 1, 3])


def blend(degenerate: tf.Tensor, image: tf.Tensor, factor) -> tf.Tensor:
  """PIL ImageEnhance: factor 0 gives `degenerate`, 1 gives `image`."""
  return tf.clip_by_value(degenerate + factor * (image - degenerate), 0., 1.)


# ----------------------------------------------------------------------------
# Geometry shared by all policies.


def _simclr_box(shape, seed, crop_scale, aspect_ratio):
  """`(begin [3], size [3])` of TF's `sample_distorted_bounding_box`.

  As SimCLR's TF code: the aspect ratio is uniform and the crop height is
  uniform between the heights of the smallest and largest allowed areas, so
  areas lean small (median 0.46 of a square image at `crop_scale=(0.2, 1)`,
  `tests/image_ops_test.py`).
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
  median of a square image's crops is 0.54 (`tests/image_ops_test.py`).
  """
  height = tf.cast(shape[0], tf.float32)
  width = tf.cast(shape[1], tf.float32)
  seeds = split_seed(seed, 4)
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


def crop_and_flip(image, seed, size, crop_scale, crop_sampling):
  """`random_resized_crop` to `size`, then a random horizontal flip."""
  crop_seed, flip_seed = tf.unstack(split_seed(seed, 2))
  image = random_resized_crop(image, crop_seed, size=size,
                              crop_scale=crop_scale, sampling=crop_sampling)
  return tf.image.stateless_random_flip_left_right(image, flip_seed)

