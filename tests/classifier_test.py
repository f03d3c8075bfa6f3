"""Tests of supcon_tf.classifier: the linear classifier on a frozen encoder."""

import sys

import keras
import numpy as np
import pytest

import conftest
from supcon_tf import classifier as classifier_lib


def test_build_classifier_freezes_encoder():
  encoder = conftest.tiny_encoder()
  classifier = classifier_lib.build_classifier(encoder, 3)
  images, labels = conftest.colour_data(8, 3, 0)
  logits = classifier(images, training=True)
  assert logits.shape == (8, 3) and logits.dtype == "float32"
  dense = classifier.get_layer("linear")
  assert not encoder.trainable
  assert [id(v) for v in classifier.trainable_weights] == [
      id(v) for v in dense.trainable_weights]
  # training=True reaches the classifier, not the encoder's batch norm.
  np.testing.assert_array_equal(
      logits, classifier(images, training=False))
  before = conftest.snapshot(encoder)
  classifier.compile(keras.optimizers.SGD(0.5),
                     keras.losses.SparseCategoricalCrossentropy(
                         from_logits=True))
  kernel = dense.kernel.numpy().copy()
  classifier.train_on_batch(images, labels)
  conftest.assert_unchanged(before, encoder)
  assert not np.array_equal(kernel, dense.kernel.numpy())


def test_classifier_save_load_round_trip(tmp_path):
  classifier = classifier_lib.build_classifier(conftest.tiny_encoder(), 3)
  images, _ = conftest.colour_data(4, 3, 0)
  path = str(tmp_path / "classifier.keras")
  classifier.save(path)
  restored = keras.models.load_model(path)
  np.testing.assert_allclose(restored(images), classifier(images),
                             rtol=1e-5, atol=1e-6)


def test_build_classifier_rejects_bad_class_count():
  with pytest.raises(ValueError, match="num_classes"):
    classifier_lib.build_classifier(conftest.tiny_encoder(), 0)


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
