"""Tests for supcon_tf.augment."""

import sys

import numpy as np
import pytest
import tensorflow as tf

from supcon_tf import augment
from supcon_tf import config

SIZE = 12


def _image(height=14, width=10, seed=(1, 2)):
  return tf.random.stateless_uniform([height, width, 3], seed)


@pytest.mark.parametrize("policy", config.AUGMENTATIONS)
@pytest.mark.parametrize("dtype", [tf.uint8, tf.float32])
def test_views_shape_dtype_range_finite(policy, dtype):
  image = _image()
  if dtype == tf.uint8:
    image = tf.cast(image * 255, tf.uint8)
  fn = augment.make_view_fn(policy, size=SIZE, blur=True, num_views=3)
  for seed in range(4):
    views = fn(image, tf.constant([seed, 7], tf.int64)).numpy()
    assert views.shape == (3, SIZE, SIZE, 3)
    assert views.dtype == np.float32
    assert np.all(np.isfinite(views))
    assert views.min() >= 0.0 and views.max() <= 1.0


@pytest.mark.parametrize("policy", ["simclr", "randaugment", "autoaugment"])
def test_same_seed_same_views_other_seed_differs(policy):
  fn = tf.function(augment.make_view_fn(policy, size=SIZE, num_views=2))
  image = _image()
  first = fn(image, tf.constant([3, 4], tf.int64)).numpy()
  again = fn(image, tf.constant([3, 4], tf.int64)).numpy()
  other = fn(image, tf.constant([3, 5], tf.int64)).numpy()
  np.testing.assert_array_equal(first, again)
  assert np.abs(first - other).max() > 1e-3


@pytest.mark.parametrize("policy", ["simclr", "randaugment", "autoaugment"])
def test_views_of_one_image_differ(policy):
  fn = augment.make_view_fn(policy, size=SIZE, num_views=2)
  views = fn(_image(), tf.constant([0, 1], tf.int64)).numpy()
  assert np.abs(views[0] - views[1]).mean() > 1e-3


def test_none_policy_only_resizes():
  image = _image(SIZE, SIZE)
  views = augment.make_view_fn("none", size=SIZE, num_views=2)(
      image, tf.constant([0, 0]))
  np.testing.assert_array_equal(views[0].numpy(), image.numpy())
  np.testing.assert_array_equal(views[1].numpy(), image.numpy())
  resized = augment.identity(_image(20, 16), size=SIZE)
  assert resized.shape == (SIZE, SIZE, 3)


def test_unknown_policy_lists_choices():
  with pytest.raises(ValueError, match="simclr.*randaugment.*autoaugment"):
    augment.make_view_fn("trivialaugment", size=SIZE, num_views=2)


def test_deterministic_inside_dataset_map():
  images = tf.stack([_image(seed=(i, 0)) for i in range(4)])
  fn = augment.make_view_fn("simclr", size=SIZE, num_views=2)

  def run():
    ds = tf.data.Dataset.from_tensor_slices(images).enumerate().map(
        lambda i, x: fn(x, tf.stack([tf.constant(5, tf.int64), i])),
        num_parallel_calls=2)
    return np.stack(list(ds.as_numpy_iterator()))

  np.testing.assert_array_equal(run(), run())


def test_unknown_crop_sampling_lists_choices():
  with pytest.raises(ValueError, match="simclr.*torchvision"):
    augment.make_view_fn("simclr", size=SIZE, crop_sampling="inception")


@pytest.mark.parametrize("policy", ["simclr", "randaugment", "autoaugment"])
def test_crop_sampling_reaches_every_policy(policy):
  image = _image(40, 40)
  seed = tf.constant([3, 4], tf.int64)
  views = {s: augment.make_view_fn(policy, size=SIZE, num_views=1,
                                   crop_sampling=s)(image, seed).numpy()
           for s in config.CROP_SAMPLINGS}
  assert np.abs(views["simclr"] - views["torchvision"]).max() > 1e-3


def _uint8_image(height, width, seed=0):
  rng = np.random.default_rng(seed)
  return tf.constant(rng.integers(0, 256, (height, width, 3), np.uint8))


def _rounded_resize(image, height, width):
  out = tf.image.resize(tf.cast(image, tf.float32), [height, width],
                        method="bilinear", antialias=True)
  return np.clip(np.round(out.numpy()), 0, 255).astype(np.uint8)


def test_eval_center_crop_is_resize_short_side_then_centre():
  # size 14: short side to round(14 / 0.875) = 16, long side 40 * 16 // 30
  # = 21; offsets round(3.5) = 4 (half to even, as Python) and 1.
  image = _uint8_image(40, 30)
  out = augment.eval_image(image, size=14, crop="center").numpy()
  assert out.dtype == np.uint8
  np.testing.assert_array_equal(out, _rounded_resize(image, 21, 16)[4:18,
                                                                    1:15])
  # ImageNet: 256 short side, 224 centre; a wide image is cut left and right.
  wide = _uint8_image(300, 400, seed=1)
  out = augment.eval_image(wide, size=224, crop="center").numpy()
  np.testing.assert_array_equal(
      out, _rounded_resize(wide, 256, 341)[16:240, 58:282])


def test_eval_resize_keeps_images_of_the_right_size():
  image = _uint8_image(SIZE, SIZE)
  np.testing.assert_array_equal(
      augment.eval_image(image, size=SIZE, crop="resize"), image)
  other = _uint8_image(20, 16)
  np.testing.assert_array_equal(
      augment.eval_image(other, size=SIZE, crop="resize"),
      _rounded_resize(other, SIZE, SIZE))


def test_eval_image_rejects_float_and_unknown_crop():
  with pytest.raises(TypeError, match="uint8"):
    augment.eval_image(_image(), size=SIZE, crop="center")
  with pytest.raises(ValueError, match="center.*resize"):
    augment.eval_image(_uint8_image(8, 8), size=SIZE, crop="auto")


def test_none_policy_uses_the_eval_crop():
  image = _uint8_image(40, 30)
  views = augment.make_view_fn("none", size=14, num_views=1,
                               eval_crop="center")(image, tf.constant([0, 0]))
  expected = augment.eval_image(image, size=14, crop="center")
  # The same geometry; only the rounding to 8 bits differs.
  np.testing.assert_allclose(views[0].numpy() * 255.0,
                             expected.numpy().astype(np.float32), atol=0.5)


@pytest.mark.parametrize("size,crop,resolved", [
    (32, "auto", "resize"), (96, "auto", "resize"), (224, "auto", "center"),
    (128, "auto", "center"), (32, "center", "center"),
    (224, "resize", "resize")])
def test_resolved_eval_crop(size, crop, resolved):
  cfg = config.DataConfig(image_size=size, eval_crop=crop)
  assert cfg.resolved_eval_crop == resolved


def test_simclr_grayscale_and_jitter_rates():
  # Grayscale (p=0.2) shows as equal channels; jitter changes colour balance.
  image = _image(SIZE, SIZE)
  gray = 0
  trials = 60
  fn = tf.function(lambda s: augment.simclr_augment(image, s, size=SIZE))
  for s in range(trials):
    out = fn(tf.constant([s, 11])).numpy()
    gray += np.allclose(out[..., 0], out[..., 1], atol=1e-5) and np.allclose(
        out[..., 1], out[..., 2], atol=1e-5)
  assert 2 <= gray <= 25, gray


def test_blur_smooths():
  noise = _image(40, 40)
  blur_views = augment.make_view_fn("simclr", size=40, blur=True, num_views=1)
  plain_views = augment.make_view_fn("simclr", size=40, blur=False,
                                     num_views=1)
  blurred = augment._gaussian_blur(noise, tf.constant([0, 0]), 40).numpy()
  # Neighbouring pixels become closer after blurring.
  assert (np.abs(np.diff(blurred, axis=0)).mean() <
          0.8 * np.abs(np.diff(noise.numpy(), axis=0)).mean())
  seed = tf.constant([4, 4])
  assert blur_views(noise, seed).shape == plain_views(noise, seed).shape


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
