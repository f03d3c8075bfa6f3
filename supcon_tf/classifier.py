"""The linear classifier on a frozen encoder and the features it is fit on.

`build_classifier` puts a trainable Dense layer on a `FrozenEncoder`, which
runs the encoder frozen and in inference mode; `extract_features` gives the
encoder's representations that `supcon_tf.linear_eval` fits the Dense layer
on when features are cached.
"""

from typing import Optional, Tuple

import keras
import numpy as np
import tensorflow as tf


@keras.saving.register_keras_serializable(package="supcon_tf")
class FrozenEncoder(keras.layers.Layer):
  """Runs an encoder frozen and in inference mode, whatever the caller says.

  A functional model hands its own `training` flag to every layer it calls,
  overriding a `training=False` written when the model was built, so
  `model.fit` would run the encoder's batch norm in training mode. This
  layer's `call` takes no `training` argument and always calls the encoder
  with `training=False`. The encoder (and this layer) are set
  `trainable=False`.

  Args:
    encoder: a built Keras model `[batch, H, W, C] -> [batch, dim]`; its
      `trainable` attribute is set to False.
    **kwargs: base `keras.layers.Layer` arguments (`name`, ...).

  Example:

  ```python
  frozen = FrozenEncoder(encoder)
  features = frozen(images)  # == encoder(images, training=False)
  ```
  """

  def __init__(self, encoder, **kwargs):
    super().__init__(**kwargs)
    encoder.trainable = False
    self.encoder = encoder
    self.trainable = False

  def call(self, images):
    """Encodes images.

    Args:
      images: `[batch, H, W, C]` float32 in [0, 1].

    Returns:
      The encoder's representation `[batch, dim]`.
    """
    return self.encoder(images, training=False)

  def get_config(self):
    config = super().get_config()
    config["encoder"] = keras.saving.serialize_keras_object(self.encoder)
    return config

  @classmethod
  def from_config(cls, config):
    config = dict(config)
    config["encoder"] = keras.saving.deserialize_keras_object(
        config["encoder"])
    return cls(**config)


def build_classifier(encoder: keras.Model, num_classes: int, *,
                     name: str = "linear_classifier") -> keras.Model:
  """A linear classifier on top of a frozen encoder.

  Only the Dense layer named `"linear"` is trainable
  (`classifier.get_layer("linear")`); the encoder is wrapped in a
  `FrozenEncoder` layer named `"frozen_encoder"`, so it is set
  `trainable=False` and always runs with `training=False`.

  Args:
    encoder: a built Keras model mapping images `[batch, H, W, 3]` to
      representations `[batch, dim]`.
    num_classes: number of classes (>= 1).
    name: name of the returned model.

  Returns:
    A `keras.Model` mapping float32 images in [0, 1], `[batch, H, W, 3]`, to
    float32 logits `[batch, num_classes]`.

  Raises:
    ValueError: for `num_classes < 1` or an encoder without a known input
      shape.
  """
  if num_classes is None or int(num_classes) < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes!r}.")
  inputs = keras.Input(shape=_image_shape(encoder), name="images")
  features = FrozenEncoder(encoder, name="frozen_encoder")(inputs)
  logits = keras.layers.Dense(int(num_classes), dtype="float32",
                              name="linear")(features)
  return keras.Model(inputs, logits, name=name)


def _image_shape(encoder: keras.Model) -> Tuple[Optional[int], ...]:
  try:
    shape = encoder.input_shape
  except (AttributeError, ValueError):
    shape = None
  if not shape or isinstance(shape, list):
    raise ValueError(
        f"Encoder {encoder.name!r} has no single known input shape (got "
        f"{shape!r}); build it with one image input, e.g. as a functional "
        "model on keras.Input(shape=(H, W, 3)).")
  return tuple(shape[1:])


def extract_features(encoder: keras.Model, dataset: tf.data.Dataset, *,
                     progress: bool = False
                     ) -> Tuple[np.ndarray, np.ndarray]:
  """The encoder's representation of every example of a dataset.

  Runs the encoder batch by batch in inference mode (`training=False`), so
  its weights and batch-norm statistics are left as they are.

  Args:
    encoder: Keras model `[batch, H, W, C] -> [batch, dim]`.
    dataset: finite dataset of `(images [batch, H, W, C], labels [batch])`.
    progress: show a progress bar over the batches.

  Returns:
    `(features [n, dim]` float32, `labels [n]` int32), in dataset order.

  Raises:
    ValueError: for an empty dataset.
  """
  features, labels = [], []
  batches = int(dataset.cardinality())
  bar = keras.utils.Progbar(batches if batches >= 0 else None,
                            verbose=int(progress), unit_name="batch")
  for images, batch_labels in dataset:
    # predict_on_batch runs with training=False and reuses the model's
    # cached predict function across calls.
    features.append(np.asarray(encoder.predict_on_batch(images), np.float32))
    labels.append(np.asarray(batch_labels))
    bar.add(1)
  if not features:
    raise ValueError("Cannot extract features of an empty dataset.")
  return (np.concatenate(features).astype(np.float32),
          np.concatenate(labels).astype(np.int32))
