"""Encoders and heads, built from a `supcon_tf.config.ModelConfig`.

Any Keras model mapping images `[batch, H, W, 3]` to representations
`[batch, dim]` can be used wherever the library takes an encoder;
`build_encoder` is only the convenient way to get the paper's ResNets and
the `keras.applications` / keras-hub backbones of `backbones`.
"""

import re

import keras
import tensorflow as tf

from supcon_tf import config as config_lib
from supcon_tf.models import backbones
from supcon_tf.models.backbones import build_backbone
from supcon_tf.models.heads import ProjectionHead
from supcon_tf.models.resnet import VALID_DEPTHS
from supcon_tf.models.resnet import representation_dim
from supcon_tf.models.resnet import resnet

__all__ = [
    "ProjectionHead",
    "VALID_DEPTHS",
    "build_backbone",
    "build_encoder",
    "build_head",
    "embed_views",
    "representation_dim",
    "resnet",
]


def build_encoder(config: config_lib.ModelConfig,
                  input_shape=(32, 32, 3),
                  num_replicas: int = 1) -> keras.Model:
  """Builds the encoder named by `config.encoder` (e.g. `"resnet50"`).

  Callers with their own architecture can skip this function: any Keras model
  mapping float32 images `[batch, H, W, 3]` to `[batch, dim]` works as an
  encoder.

  Args:
    config: model configuration; `encoder` is `resnet{depth}` with depth
      in `VALID_DEPTHS` (`stem` and `width` apply to these only),
      `keras_applications:<Name>` or `keras_hub:<preset>` (see
      `backbones.build_backbone`); `encoder_weights` an optional local
      weights file to start from.
    input_shape: `(H, W, 3)` of the images.
    num_replicas: replicas of the distribution strategy; with
      `config.sync_batch_norm=None` batch norm is synchronised exactly when
      this is above 1.

  Returns:
    A `keras.Model` mapping images in [0, 1], `[batch, H, W, 3]`, to
    float32 representations `[batch, rep_dim]`; a ResNet is named
    `config.encoder`.

  Raises:
    ValueError: for an unknown encoder name, images too small for the
      backbone, or a missing or mismatched `encoder_weights` file.
  """
  sync = _sync_batch_norm(config, num_replicas)
  if backbones.is_backbone(config.encoder):
    return build_backbone(config.encoder, input_shape=input_shape,
                          weights=config.encoder_weights,
                          sync_batch_norm=sync)
  match = re.fullmatch(r"resnet(\d+)", config.encoder)
  if match is None or int(match.group(1)) not in VALID_DEPTHS:
    valid = [f"resnet{d}" for d in VALID_DEPTHS]
    raise ValueError(
        f"Unknown encoder {config.encoder!r}; use one of {valid}, "
        "keras_applications:<Name> (e.g. keras_applications:ResNet50), "
        "keras_hub:<preset> or pass your own keras.Model as the encoder.")
  encoder = resnet(int(match.group(1)), stem=config.stem, width=config.width,
                   input_shape=input_shape, sync_batch_norm=sync,
                   name=config.encoder)
  if config.encoder_weights is not None:
    backbones.load_weights(encoder, config.encoder_weights,
                           encoder=config.encoder)
  return encoder


def build_head(config: config_lib.ModelConfig,
               num_replicas: int = 1) -> ProjectionHead:
  """Builds the projection head described by `config`.

  Args:
    config: model configuration (`head`, `head_hidden`, `projection_dim`,
      `sync_batch_norm`).
    num_replicas: replicas of the distribution strategy; batch norm in the
      head is synchronised like the encoder's (see `build_encoder`).

  Returns:
    An unbuilt `ProjectionHead` mapping `[batch, rep_dim]` to unit-norm
    float32 embeddings `[batch, projection_dim]`.
  """
  return ProjectionHead(kind=config.head, hidden_dim=config.head_hidden,
                        output_dim=config.projection_dim,
                        sync_batch_norm=_sync_batch_norm(config, num_replicas),
                        name="projection_head")


def _sync_batch_norm(config: config_lib.ModelConfig, num_replicas: int) -> bool:
  """`config.sync_batch_norm`, where None means: with several replicas."""
  if config.sync_batch_norm is None:
    return num_replicas > 1
  return config.sync_batch_norm


def embed_views(encoder, head, views, training=None):
  """Embeds every view of every sample, all views as one encoder batch.

  One batch, so that batch normalisation sees every view.

  Args:
    encoder: Keras model `[n, H, W, C] -> [n, rep_dim]`.
    head: layer `[n, rep_dim] -> [n, dim]`.
    views: `[batch, V, H, W, C]` images, `views[i, v]` view v of sample i.
    training: passed to the encoder and head (batch-norm mode).

  Returns:
    float32 `[batch, V, dim]`.
  """
  batch, num_views = tf.shape(views)[0], views.shape[1]
  # Static image dims where known, so the encoder keeps its shapes.
  image_dims = [d if d is not None else tf.shape(views)[i + 2]
                for i, d in enumerate(views.shape[2:])]
  images = tf.reshape(views, [-1] + image_dims)
  embeddings = tf.cast(head(encoder(images, training=training),
                            training=training), tf.float32)
  return tf.reshape(embeddings, [batch, num_views, embeddings.shape[-1]])
