"""Tests for supcon_tf.randaugment."""

import sys

import numpy as np
import pytest
import tensorflow as tf

from supcon_tf import randaugment

SIZE = 12


def _image(height=14, width=10, seed=(1, 2)):
  return tf.random.stateless_uniform([height, width, 3], seed)


@pytest.mark.parametrize("name", randaugment.OP_NAMES)
def test_ops_in_range_and_level_zero_is_identity(name):
  index = tf.constant(randaugment.OP_NAMES.index(name))
  image = _image(SIZE, SIZE)
  strong = randaugment._apply_op(image, index, tf.constant(1.0),
                                 tf.constant([2, 3])).numpy()
  assert strong.shape == (SIZE, SIZE, 3)
  assert np.all(np.isfinite(strong))
  assert strong.min() >= 0.0 and strong.max() <= 1.0
  weak = randaugment._apply_op(image, index, tf.constant(0.0),
                               tf.constant([2, 3]))
  if name not in ("autocontrast", "posterize"):  # These act at any level.
    np.testing.assert_allclose(weak.numpy(), image.numpy(), atol=1e-5)
  if name != "identity":
    assert np.abs(strong - image.numpy()).max() > 1e-3


def test_solarize_and_posterize_values():
  image = tf.constant([[[0.0, 0.4, 1.0]]])
  index = randaugment.OP_NAMES.index("solarize")
  full = randaugment._apply_op(image, tf.constant(index), tf.constant(1.0),
                               tf.constant([0, 0]))
  np.testing.assert_allclose(full.numpy(), [[[1.0, 0.6, 0.0]]], atol=1e-6)
  index = randaugment.OP_NAMES.index("posterize")
  four_bits = randaugment._apply_op(tf.constant([[[0.45, 0.12, 1.0]]]),
                                    tf.constant(index), tf.constant(1.0),
                                    tf.constant([0, 0]))
  # 4 bits keep multiples of 16 (of 255).
  np.testing.assert_allclose(four_bits.numpy() * 255, [[[112, 16, 240]]],
                             atol=1e-3)


def test_randaugment_rejects_bad_magnitude():
  with pytest.raises(ValueError, match="magnitude"):
    randaugment.randaugment(_image(), tf.constant([0, 0]), size=SIZE,
                            magnitude=11)


AUTOAUGMENT_OPS = ("posterize", "solarize", "autocontrast", "equalize",
                   "invert", "rotate", "shear_x", "color", "contrast",
                   "sharpness")


def test_autoaugment_policy_is_the_imagenet_policy():
  policy = randaugment.AUTOAUGMENT_POLICY
  assert len(policy) == 25 and all(len(sub) == 2 for sub in policy)
  assert policy[0] == (("posterize", 0.4, 8), ("rotate", 0.6, 9))
  assert policy[12] == (("equalize", 0.0, None), ("equalize", 0.8, None))
  assert policy[24] == (("equalize", 0.8, None), ("equalize", 0.6, None))
  ops = [op for sub in policy for op, _, _ in sub]
  assert set(ops) == set(AUTOAUGMENT_OPS)
  # Equalize is the policy's most frequent op (the old stand-in had none).
  assert ops.count("equalize") == 17 and ops.count("invert") == 3
  for sub in policy:
    for op, prob, magnitude_bin in sub:
      assert 0.0 <= prob <= 1.0
      no_magnitude = op in ("autocontrast", "equalize", "invert")
      assert (magnitude_bin is None) == no_magnitude
      if not no_magnitude:
        assert 0 <= magnitude_bin <= 9


def test_autoaugment_magnitudes_are_torchvisions_bins():
  magnitude = randaugment.autoaugment_magnitude
  # torchvision: 8 - (arange(10) / (9 / 4)).round().
  assert [magnitude("posterize", b) for b in range(10)] == [
      8, 8, 7, 7, 6, 6, 5, 5, 4, 4]
  assert magnitude("solarize", 0) == 255 and magnitude("solarize", 9) == 0
  assert magnitude("rotate", 9) == pytest.approx(30)
  assert magnitude("rotate", 3) == pytest.approx(10)
  assert magnitude("shear_x", 9) == pytest.approx(0.3)
  assert magnitude("color", 9) == pytest.approx(0.9)
  assert magnitude("equalize", None) == 0


def _equalize_reference(levels):
  """PIL's ImageOps.equalize on one uint8 channel, in NumPy."""
  hist = np.bincount(levels.ravel(), minlength=256)
  nonzero = hist[hist > 0]
  step = (nonzero.sum() - nonzero[-1]) // 255
  if step == 0:
    return levels
  lut = (np.cumsum(hist) + step // 2) // step
  lut = np.clip(np.concatenate([[0], lut[:-1]]), 0, 255)
  return lut[levels].astype(np.uint8)


def test_equalize_matches_pil_algorithm():
  rng = np.random.default_rng(0)
  # Dark, skewed histogram in two channels, one flat channel.
  levels = np.stack([
      (rng.beta(2, 8, (20, 18)) * 255).astype(np.uint8),
      rng.integers(40, 90, (20, 18)).astype(np.uint8),
      np.full((20, 18), 77, np.uint8)], axis=-1)
  image = tf.constant(levels, tf.float32) / 255.0
  out = randaugment._equalize(image).numpy()
  expected = np.stack([_equalize_reference(levels[..., c])
                       for c in range(3)], axis=-1)
  np.testing.assert_array_equal(np.round(out * 255).astype(np.uint8),
                                expected)
  np.testing.assert_array_equal(out[..., 2], image.numpy()[..., 2])


def test_autoaugment_pixel_ops():
  levels = np.array([[[0, 127, 128], [200, 255, 115]],
                     [[1, 15, 16], [17, 31, 32]]], np.uint8)
  image = tf.constant(levels, tf.float32) / 255.0
  one = tf.constant(1.0)

  def op(name, value):
    return np.round(randaugment._aa_op(image, name, value, one).numpy() * 255)

  np.testing.assert_array_equal(op("invert", 0.0), 255 - levels)
  np.testing.assert_array_equal(
      op("solarize", 128.0), np.where(levels >= 128, 255 - levels, levels))
  np.testing.assert_array_equal(op("posterize", 4.0), levels // 16 * 16)
  np.testing.assert_array_equal(op("posterize", 8.0), levels)


def test_autoaugment_geometry_and_sharpness():
  image = _image(SIZE, SIZE)
  one = tf.constant(1.0)
  # Shear about the top-left corner: the top row stays.
  sheared = randaugment._aa_op(image, "shear_x", 0.3, one).numpy()
  np.testing.assert_array_equal(sheared[0], image.numpy()[0])
  assert np.abs(sheared - image.numpy()).max() > 0.1
  # Nearest neighbour, black fill: no new values besides 0.
  rotated = randaugment._aa_op(image, "rotate", 30.0, one).numpy()
  assert set(np.unique(rotated)) <= set(np.unique(image.numpy())) | {0.0}
  assert (rotated == 0).all(axis=-1).any()
  np.testing.assert_array_equal(
      randaugment._aa_op(image, "rotate", 0.0, one).numpy(), image.numpy())
  # torchvision's sharpness leaves the 1-pixel border alone.
  sharp = randaugment._aa_op(image, "sharpness", 0.9, one).numpy()
  np.testing.assert_allclose(sharp[0], image.numpy()[0], atol=1e-6)
  np.testing.assert_allclose(sharp[:, -1], image.numpy()[:, -1], atol=1e-6)
  assert np.abs(sharp[1:-1, 1:-1] - image.numpy()[1:-1, 1:-1]).max() > 1e-3


@pytest.mark.parametrize("index", range(25))
def test_every_sub_policy_applies_by_its_probabilities(index):
  # Equalize needs > 255 pixels per channel to act (PIL's rule).
  image = _image(24, 24)
  ops = randaugment.AUTOAUGMENT_POLICY[index]
  signs = tf.constant([1.0, -1.0])
  # Draws at 0: every op with a probability above 0 runs.
  applied = randaugment._apply_sub_policy(image, index,
                                          tf.constant([0.0, 0.0]),
                                          signs).numpy()
  assert applied.min() >= 0.0 and applied.max() <= 1.0
  acting = [op for op, prob, bin_ in ops if prob > 0 and not (
      op == "color" and bin_ == 0)]  # Colour at bin 0 is factor 1.
  assert (np.abs(applied - image.numpy()).max() > 1e-3) == bool(acting)
  # Draws just below 1: only ops of probability 1 run.
  kept = randaugment._apply_sub_policy(image, index,
                                       tf.constant([0.999, 0.999]),
                                       signs).numpy()
  if all(prob < 1.0 for _, prob, _ in ops):
    np.testing.assert_array_equal(kept, image.numpy())


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
