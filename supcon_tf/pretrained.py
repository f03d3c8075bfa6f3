"""The networks a pretraining run trained, restored from its checkpoints.

`restore_encoder` gives the frozen representation that linear evaluation,
export and k-NN read; `restore_projection` a contrastive run's encoder and
projection head (the space its loss shaped); `restore_ce_model` a
cross-entropy run's own classifier. Both build on one device whatever the run trained on, and both
refuse (rather than silently fall back to) a damaged newest checkpoint.
"""

import dataclasses

import keras
import tensorflow as tf

from supcon_tf import checkpoints
from supcon_tf import config as config_lib
from supcon_tf import models
from supcon_tf import objectives
from supcon_tf import precision
from supcon_tf import rundir


def restore_encoder(workdir: str, config: config_lib.TrainConfig,
                    input_shape=None) -> keras.Model:
  """The encoder of the newest checkpoint in `workdir` (built on one device).

  Args:
    workdir: a pretraining work dir.
    config: its `TrainConfig` (see `load_config`).
    input_shape: `(H, W, C)`; defaults to the config's image size.

  Raises:
    TrainingError: no checkpoint, or the newest is damaged or of another
      model (the message names it; no older one is used instead).
  """
  return _restore(workdir, config, input_shape)


def restore_projection(workdir: str, config: config_lib.TrainConfig,
                       input_shape=None) -> keras.Model:
  """A contrastive run's encoder -> projection head, as it trained them.

  Returns a model `[batch, H, W, 3] -> [batch, projection_dim]` float32
  embeddings with unit rows.

  Raises:
    ValueError: `config.method` is `ce` (its head is a classifier; see
      `restore_ce_model`).
    TrainingError: as `restore_encoder`.
  """
  if config.method == "ce":
    raise ValueError("method='ce' has no projection head; its head is the "
                     "classifier of restore_ce_model.")
  return _restore(workdir, config, input_shape, with_head=True)


def restore_ce_model(workdir: str, config: config_lib.TrainConfig,
                     num_classes: int, input_shape=None) -> keras.Model:
  """A cross-entropy run's own classifier: encoder and trained softmax head.

  Returns a model `[batch, H, W, 3] -> [batch, num_classes]` float32 logits,
  the network cross-entropy training ended with (beside the linear probe
  that `linear_eval` fits on its frozen encoder).

  Raises:
    ValueError: `config.method` is not `ce`.
    TrainingError: as `restore_encoder`.
  """
  if config.method != "ce":
    raise ValueError(f"method={config.method!r} has no classifier head; "
                     "only method='ce' trains one.")
  return _restore(workdir, config, input_shape, with_head=True,
                  num_classes=num_classes)


def _restore(workdir, config, input_shape, with_head=False,
             num_classes=None) -> keras.Model:
  """The encoder (or encoder -> the method's head) of the newest checkpoint."""
  input_shape = input_shape or (config.data.image_size,
                                config.data.image_size, 3)
  previous_policy = keras.mixed_precision.global_policy()
  precision.set_global_policy(config.precision)
  try:
    # The checkpoint sets every weight: the starting weights file the run
    # began from is not read again (it need not exist any more).
    encoder = models.build_encoder(
        dataclasses.replace(config.model, encoder_weights=None),
        input_shape=input_shape, num_replicas=1)
    parts = {"encoder": encoder}
    if with_head:
      parts["head"] = objectives.get(config.method).build_head(
          config.model, num_classes)
      parts["head"].build(encoder.output_shape)
  finally:
    keras.mixed_precision.set_global_policy(previous_policy)
  directory = rundir.checkpoints_dir(workdir)
  checkpoint = tf.train.Checkpoint(**parts)
  # No fallback: linear evaluation must see the encoder pretraining ended
  # with, not an older one under its name. Every built variable must come
  # from the checkpoint (a head left at its initial values would look fine).
  if checkpoints.restore_newest(
      directory, lambda path: checkpoint.restore(path).expect_partial()
      .assert_existing_objects_matched(), fallback=False) is None:
    raise rundir.TrainingError(f"No checkpoint in {directory}.")
  if not with_head:
    return encoder
  images = keras.Input(input_shape)
  return keras.Model(images, parts["head"](encoder(images, training=False)),
                     name="ce_classifier" if num_classes else "projection")
