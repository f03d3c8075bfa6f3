"""Tests of supcon_tf.classifier: the linear classifier on a frozen encoder."""

import sys

import keras
import numpy as np
import pytest

from supcon_tf import classifier as classifier_lib
from supcon_tf import models

IMAGE = 8
# Class colours: corners of the RGB cube, pulled towards grey by `spread`.
_CORNERS = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1],
                     [0, 1, 1]], np.float32)


def colour_data(n, num_classes, seed, *, noise=0.01, spread=0.8):
  """Images whose mean colour is their class's colour, plus noise."""
  palette = 0.5 + spread * (_CORNERS[:num_classes] - 0.5)
  rng = np.random.RandomState(seed)
  labels = rng.permutation(np.arange(n) % num_classes).astype(np.int32)
  images = (palette[labels][:, None, None, :] +
            noise * rng.normal(size=(n, IMAGE, IMAGE, 3)))
  return np.clip(images, 0, 1).astype(np.float32), labels


def tiny_encoder(seed=0):
  keras.utils.set_random_seed(seed)
  return models.resnet(18, width=0.0625, input_shape=(IMAGE, IMAGE, 3))


def snapshot(model):
  return [(w.path, np.array(w.numpy())) for w in model.weights]


def assert_unchanged(before, model):
  after = snapshot(model)
  assert [p for p, _ in before] == [p for p, _ in after]
  for (path, old), (_, new) in zip(before, after):
    assert old.tobytes() == new.tobytes(), f"{path} changed"


def test_build_classifier_freezes_encoder():
  encoder = tiny_encoder()
  classifier = classifier_lib.build_classifier(encoder, 3)
  images, labels = colour_data(8, 3, 0)
  logits = classifier(images, training=True)
  assert logits.shape == (8, 3) and logits.dtype == "float32"
  dense = classifier.get_layer("linear")
  assert not encoder.trainable
  assert [id(v) for v in classifier.trainable_weights] == [
      id(v) for v in dense.trainable_weights]
  # training=True reaches the classifier, not the encoder's batch norm.
  np.testing.assert_array_equal(
      logits, classifier(images, training=False))
  before = snapshot(encoder)
  classifier.compile(keras.optimizers.SGD(0.5),
                     keras.losses.SparseCategoricalCrossentropy(
                         from_logits=True))
  kernel = dense.kernel.numpy().copy()
  classifier.train_on_batch(images, labels)
  assert_unchanged(before, encoder)
  assert not np.array_equal(kernel, dense.kernel.numpy())


def test_classifier_save_load_round_trip(tmp_path):
  classifier = classifier_lib.build_classifier(tiny_encoder(), 3)
  images, _ = colour_data(4, 3, 0)
  path = str(tmp_path / "classifier.keras")
  classifier.save(path)
  restored = keras.models.load_model(path)
  np.testing.assert_allclose(restored(images), classifier(images),
                             rtol=1e-5, atol=1e-6)


def test_build_classifier_rejects_bad_class_count():
  with pytest.raises(ValueError, match="num_classes"):
    classifier_lib.build_classifier(tiny_encoder(), 0)


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
