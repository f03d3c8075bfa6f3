"""Encoders and heads, built from a `supcon_tf.config.ModelConfig`.

Any Keras model mapping images `[batch, H, W, 3]` to representations
`[batch, dim]` can be used wherever the library takes an encoder;
`build_encoder` is only the convenient way to get the paper's ResNets.
"""

import re

import keras
import tensorflow as tf

from supcon_tf import config as config_lib
from supcon_tf.models.heads import ProjectionHead
from supcon_tf.models.resnet import VALID_DEPTHS
from supcon_tf.models.resnet import representation_dim
from supcon_tf.models.resnet import resnet

__all__ = [
    "ProjectionHead",
    "VALID_DEPTHS",
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
    config: model configuration; `encoder` must be `resnet{depth}` with depth
      in `VALID_DEPTHS`.
    input_shape: `(H, W, 3)` of the images.
    num_replicas: replicas of the distribution strategy; with
      `config.sync_batch_norm=None` batch norm is synchronised exactly when
      this is above 1.

  Returns:
    A `keras.Model` named `config.encoder`, mapping images in [0, 1],
    `[batch, H, W, 3]`, to float32 representations `[batch, rep_dim]`.

  Raises:
    ValueError: for an encoder name that is not `resnet{depth}` with a valid
      depth.
  """
  match = re.fullmatch(r"resnet(\d+)", config.encoder)
  if match is None or int(match.group(1)) not in VALID_DEPTHS:
    valid = [f"resnet{d}" for d in VALID_DEPTHS]
    raise ValueError(
        f"Unknown encoder {config.encoder!r}; use one of {valid} or pass your "
        "own keras.Model as the encoder.")
  return resnet(int(match.group(1)), stem=config.stem, width=config.width,
                input_shape=input_shape,
                sync_batch_norm=_sync_batch_norm(config, num_replicas),
                name=config.encoder)


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
