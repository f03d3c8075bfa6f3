"""Tests for supcon_tf.image_ops: the stateless ops of the view policies."""

import sys

import numpy as np
import pytest
import tensorflow as tf

from supcon_tf import config
from supcon_tf import image_ops

SIZE = 12


def _image(height=14, width=10, seed=(1, 2)):
  return tf.random.stateless_uniform([height, width, 3], seed)


def test_full_area_crop_keeps_image():
  image = _image(SIZE, SIZE)
  crop = image_ops.random_resized_crop(image, tf.constant([1, 1]),
                                       size=SIZE, crop_scale=(1.0, 1.0))
  np.testing.assert_allclose(crop.numpy(), image.numpy(), atol=1e-6)


def _boxes(sampling, shape, num=2000, **kwargs):
  """`[num, 4]` (top, left, height, width) of `crop_box` for seeds 0..num-1."""

  @tf.function
  def boxes(seeds):
    def one(seed):
      begin, size = image_ops.crop_box(tf.constant(shape), seed,
                                       sampling=sampling, **kwargs)
      return tf.concat([begin[:2], size[:2]], 0)
    return tf.map_fn(one, seeds, fn_output_signature=tf.int32)

  return boxes(tf.stack([tf.range(num), tf.fill([num], 7)], axis=1)).numpy()


def _torchvision_reference_areas(num, side, scale=(0.2, 1.0),
                                 ratio=(3 / 4, 4 / 3)):
  """Crop areas of torchvision's RandomResizedCrop.get_params, in NumPy."""
  rng = np.random.default_rng(0)
  areas = []
  for _ in range(num):
    for _ in range(10):
      target = side * side * rng.uniform(*scale)
      aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
      w = round(np.sqrt(target * aspect))
      h = round(np.sqrt(target / aspect))
      if 0 < w <= side and 0 < h <= side:
        areas.append(w * h / side**2)
        break
    else:
      areas.append(1.0)  # Centre crop of a square image: all of it.
  return np.array(areas)


def test_crop_area_distribution_of_each_sampling():
  side = 256
  areas = {}
  for sampling in config.CROP_SAMPLINGS:
    boxes = _boxes(sampling, [side, side, 3])
    assert np.all(boxes[:, :2] >= 0)
    assert np.all(boxes[:, 0] + boxes[:, 2] <= side)
    assert np.all(boxes[:, 1] + boxes[:, 3] <= side)
    aspect = boxes[:, 3] / boxes[:, 2]
    assert aspect.min() > 0.73 and aspect.max() < 1.37  # 3/4-4/3, rounded.
    areas[sampling] = boxes[:, 2] * boxes[:, 3] / side**2
    assert areas[sampling].min() > 0.19 and areas[sampling].max() <= 1.0
  reference = np.median(_torchvision_reference_areas(20_000, side))
  assert abs(reference - 0.54) < 0.01
  assert abs(np.median(areas["torchvision"]) - reference) < 0.02
  # Uniform heights lean small: SimCLR's TF sampling has the smaller median.
  assert abs(np.median(areas["simclr"]) - 0.46) < 0.02
  # Area uniform in [0.2, 1] up to boxes that do not fit: the lower quartile
  # of torchvision's areas is near 0.2 + 0.25 * 0.8 = 0.4.
  assert abs(np.quantile(areas["torchvision"], 0.25) - 0.4) < 0.03


def test_torchvision_sampling_falls_back_to_centre_crop():
  # No box of 90-100 % of a 10 x 200 image has an aspect ratio in 3/4-4/3.
  boxes = _boxes("torchvision", [10, 200, 3], num=5, crop_scale=(0.9, 1.0))
  # Whole height, width clamped to 4/3 of it, centred.
  np.testing.assert_array_equal(boxes, [[0, 93, 10, 13]] * 5)
  boxes = _boxes("torchvision", [200, 10, 3], num=5, crop_scale=(0.9, 1.0))
  np.testing.assert_array_equal(boxes, [[93, 0, 13, 10]] * 5)


def test_uint8_to_float_is_a_product_by_one_255th():
  pixels = np.arange(256, dtype=np.uint8)
  got = image_ops.uint8_to_float(tf.constant(pixels)).numpy()
  assert got.dtype == np.float32
  np.testing.assert_array_equal(
      got, pixels.astype(np.float32) * np.float32(1.0 / 255.0))
  assert got[0] == 0.0 and abs(got[255] - 1.0) < 1e-7
  np.testing.assert_array_equal(image_ops.to_float(tf.constant(pixels)), got)


def test_to_float_scales_integers_and_casts_floats():
  wide = tf.constant([[[0, 32768, 65535]]], tf.uint16)
  np.testing.assert_allclose(image_ops.to_float(wide).numpy(),
                             [[[0.0, 32768 / 65535, 1.0]]], rtol=1e-6)
  floats = tf.constant([[[0.25, 2.0, -1.0]]], tf.float64)
  got = image_ops.to_float(floats)
  assert got.dtype == tf.float32
  np.testing.assert_array_equal(got.numpy(), [[[0.25, 2.0, -1.0]]])


def test_seed_helpers_are_stateless():
  seed = tf.constant([3, 4], tf.int64)
  seeds = image_ops.split_seed(seed, 3).numpy()
  assert seeds.shape == (3, 2) and len({tuple(s) for s in seeds}) == 3
  np.testing.assert_array_equal(image_ops.split_seed(seed, 3), seeds)
  draws = [float(image_ops.uniform(tf.constant([i, 0]), 2.0, 3.0))
           for i in range(50)]
  assert all(2.0 <= d < 3.0 for d in draws) and len(set(draws)) == 50
  assert float(image_ops.uniform(tf.constant([7, 0]), 2.0, 3.0)) == draws[7]
  signs = [float(image_ops.random_sign(tf.constant([i, 1])))
           for i in range(200)]
  assert set(signs) == {-1.0, 1.0}
  assert 0.35 < signs.count(1.0) / 200 < 0.65


def test_maybe_apply_by_probability():
  image = tf.fill([2, 2, 3], 0.25)

  def invert(x):
    return 1.0 - x

  for seed in range(5):
    seed = tf.constant([seed, 2])
    np.testing.assert_array_equal(
        image_ops.maybe_apply(invert, image, 0.0, seed), image)
    np.testing.assert_array_equal(
        image_ops.maybe_apply(invert, image, 1.0, seed), 1.0 - image)
  applied = [float(image_ops.maybe_apply(invert, image, 0.3,
                                         tf.constant([i, 3]))[0, 0, 0]) == 0.75
             for i in range(300)]
  assert 0.2 < np.mean(applied) < 0.4


def test_resize_is_a_no_op_at_the_size():
  image = _image(SIZE, SIZE)
  assert image_ops.resize(image, SIZE) is image
  resize = tf.function(lambda x: image_ops.resize(x, SIZE),
                       input_signature=[tf.TensorSpec([None, None, 3])])
  np.testing.assert_array_equal(resize(image), image)
  out = resize(tf.fill([5, 7, 3], 0.3))
  assert out.shape == (SIZE, SIZE, 3)
  np.testing.assert_allclose(out.numpy(), 0.3, atol=1e-6)


def test_grayscale_and_blend_by_hand():
  image = tf.constant([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
                       [[0.0, 0.0, 1.0], [0.5, 0.5, 0.5]]])
  gray = image_ops.grayscale_rgb(image).numpy()
  assert gray.shape == (2, 2, 3)
  # ITU-R 601 luma, repeated in every channel.
  np.testing.assert_allclose(gray[..., 0], [[0.2989, 0.587], [0.114, 0.4999]],
                             atol=1e-4)
  np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
  degenerate, target = tf.fill([1, 1, 1], 0.2), tf.fill([1, 1, 1], 0.6)
  for factor, want in [(0.0, 0.2), (1.0, 0.6), (0.5, 0.4), (2.0, 1.0),
                       (-1.0, 0.0)]:
    np.testing.assert_allclose(
        image_ops.blend(degenerate, target, factor).numpy().item(), want,
        atol=1e-6, err_msg=f"factor={factor}")


def test_crop_box_layout_and_unknown_sampling():
  for sampling in config.CROP_SAMPLINGS:
    begin, size = image_ops.crop_box(tf.constant([30, 20, 3]),
                                     tf.constant([5, 6]), sampling=sampling)
    assert begin.dtype == size.dtype == tf.int32
    begin, size = begin.numpy(), size.numpy()
    assert begin[2] == 0 and size[2] == -1
    assert 0 <= begin[0] and begin[0] + size[0] <= 30
    assert 0 <= begin[1] and begin[1] + size[1] <= 20
  with pytest.raises(ValueError, match="'inception'.*simclr.*torchvision"):
    image_ops.crop_box(tf.constant([8, 8, 3]), tf.constant([0, 0]),
                       sampling="inception")


def test_random_resized_crop_is_keyed_by_its_seed():
  image = _image(30, 30)
  crop = image_ops.random_resized_crop(image, tf.constant([1, 5]), size=SIZE)
  assert crop.shape == (SIZE, SIZE, 3)
  np.testing.assert_array_equal(
      crop, image_ops.random_resized_crop(image, tf.constant([1, 5]),
                                          size=SIZE))
  other = image_ops.random_resized_crop(image, tf.constant([2, 5]), size=SIZE)
  assert np.abs(crop.numpy() - other.numpy()).max() > 1e-3


def test_crop_and_flip_whole_image_is_the_image_or_its_mirror():
  image = _image(SIZE, SIZE).numpy()
  flipped = []
  for i in range(20):
    out = image_ops.crop_and_flip(tf.constant(image), tf.constant([i, 9]),
                                  SIZE, (1.0, 1.0), "simclr").numpy()
    mirrored = np.abs(out - image[:, ::-1]).max() < 1e-6
    assert mirrored or np.abs(out - image).max() < 1e-6
    flipped.append(mirrored)
  assert 0 < sum(flipped) < 20


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
