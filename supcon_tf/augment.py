"""View augmentation policies built from stateless TF ops.

Every policy maps one image `[height, width, 3]` (float32 in [0, 1]) and a
seed `[2]` (int32/int64) to one augmented image `[size, size, 3]` (float32 in
[0, 1]); equal seeds give equal images (the seed convention is that of
`supcon_tf.image_ops`, which holds the shared ops).

Policies:
  * `simclr_augment` (here): the SimCLR / SupCon recipe (random resized
    crop, flip, colour jitter, grayscale, optional Gaussian blur).
  * `randaugment` (`supcon_tf.randaugment`): crop + flip + a
    RandAugment-style policy over the op set `OP_NAMES` (`num_ops` ops drawn
    uniformly, fixed `magnitude`).
  * `autoaugment` (`supcon_tf.randaugment`): crop + flip + the ImageNet
    AutoAugment policy (Cubuk et al. 2019: 25 sub-policies, their
    probabilities and magnitudes), with the op definitions of torchvision's
    `AutoAugment(AutoAugmentPolicy.IMAGENET)`.
  * `identity` ("none", here): resize (or the evaluation centre crop) only.

`eval_image` is the evaluation view (and that of the exported model's
`serving_bytes`): the short side resized to size / 0.875 and the centre
kept, or the whole image resized.

Random resized crops draw their box as SimCLR's TF code (`simclr`) or as
torchvision's `RandomResizedCrop` (`torchvision`); see `crop_box`
(`supcon_tf.image_ops`).

`make_view_fn` turns a policy name into the per-example function used by
`supcon_tf.data`. The public names of `supcon_tf.image_ops` and
`supcon_tf.randaugment` that callers use as `augment.X` are re-exported.
"""

import functools
from typing import Callable, Optional, Tuple

import tensorflow as tf

from supcon_tf import config as config_lib
from supcon_tf import image_ops
# Re-exported: callers use these as `augment.X`.
from supcon_tf.image_ops import crop_box, random_resized_crop, uint8_to_float
from supcon_tf.randaugment import (AUTOAUGMENT_POLICY, OP_NAMES, autoaugment,
                                   autoaugment_magnitude, randaugment)

__all__ = [
    "AUTOAUGMENT_POLICY",
    "EVAL_CROP_FRACTION",
    "OP_NAMES",
    "autoaugment",
    "autoaugment_magnitude",
    "crop_box",
    "eval_image",
    "identity",
    "make_view_fn",
    "randaugment",
    "random_resized_crop",
    "simclr_augment",
    "uint8_to_float",
]

# Colour jitter strengths of the SupCon / SimCLR CIFAR recipe.
_BRIGHTNESS = 0.4
_CONTRAST = 0.4
_SATURATION = 0.4
_HUE = 0.1
_JITTER_PROB = 0.8
_GRAYSCALE_PROB = 0.2
_BLUR_PROB = 0.5


# ----------------------------------------------------------------------------
# SimCLR policy.


def _color_jitter(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Brightness, contrast, saturation and hue jitter in a random order."""
  seeds = image_ops.split_seed(seed, 5)
  brightness = image_ops.uniform(seeds[0], 1.0 - _BRIGHTNESS, 1.0 + _BRIGHTNESS)
  contrast = image_ops.uniform(seeds[1], 1.0 - _CONTRAST, 1.0 + _CONTRAST)
  saturation = image_ops.uniform(seeds[2], 1.0 - _SATURATION, 1.0 + _SATURATION)
  hue = image_ops.uniform(seeds[3], -_HUE, _HUE)
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
  sigma = image_ops.uniform(seed, 0.1, 2.0)
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
  image = image_ops.to_float(image)
  seeds = image_ops.split_seed(seed, 6)
  image = image_ops.crop_and_flip(image, seeds[0], size, crop_scale,
                                  crop_sampling)
  image = image_ops.maybe_apply(lambda x: _color_jitter(x, seeds[1]), image,
                                _JITTER_PROB, seeds[2])
  image = image_ops.maybe_apply(image_ops.grayscale_rgb, image,
                                _GRAYSCALE_PROB, seeds[3])
  if blur:
    image = image_ops.maybe_apply(lambda x: _gaussian_blur(x, seeds[4], size),
                                  image, _BLUR_PROB, seeds[5])
  return tf.clip_by_value(image, 0.0, 1.0)


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
    return image_ops.resize(image, size)
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


def identity(image: tf.Tensor, seed: Optional[tf.Tensor] = None, *,
             size: int, crop: str = "resize") -> tf.Tensor:
  """No augmentation: `[size, size, 3]` float32 in [0, 1].

  `crop` is `resize` (resize the whole image) or `center` (the evaluation
  centre crop of `eval_image`, without its rounding to 8 bits).
  """
  del seed
  return _eval_geometry(image_ops.to_float(image), size, crop)


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
    image = image_ops.to_float(image)
    seed = tf.convert_to_tensor(seed)
    views = [
        augment_one(image, tf.random.experimental.stateless_fold_in(seed, v))
        for v in range(num_views)
    ]
    return tf.ensure_shape(tf.stack(views), [num_views, size, size, 3])

  return view_fn
