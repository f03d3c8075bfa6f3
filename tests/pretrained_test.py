"""Tests for supcon_tf.pretrained: the networks of a run, from checkpoints."""

import dataclasses
import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import conftest
from supcon_tf import models
from supcon_tf import objectives
from supcon_tf import pretrained
from supcon_tf import rundir


def test_contrastive_runs_have_no_ce_head(tmp_path):
  with pytest.raises(ValueError, match="only method='ce'"):
    pretrained.restore_ce_model(str(tmp_path), conftest.tiny_train("supcon"),
                                10)
  with pytest.raises(ValueError, match="no projection head"):
    pretrained.restore_projection(str(tmp_path), conftest.tiny_train("ce"))


IMAGE = 16


def _write_run(workdir, config, steps=(1,), num_classes=10, width=None):
  """Checkpoints `steps` of randomly perturbed networks of `config`.

  Returns the encoder and head of the last one, as a pretraining run leaves
  them (`width` overrides the encoder's, for a checkpoint of another model).
  """
  model_config = config.model if width is None else dataclasses.replace(
      config.model, width=width)
  encoder = models.build_encoder(model_config, (IMAGE, IMAGE, 3))
  head = objectives.get(config.method).build_head(model_config, num_classes)
  head.build(encoder.output_shape)
  manager = tf.train.CheckpointManager(
      tf.train.Checkpoint(encoder=encoder, head=head, step=tf.Variable(0)),
      rundir.checkpoints_dir(workdir), max_to_keep=5,
      checkpoint_name=rundir.CHECKPOINT_NAME)
  rng = np.random.default_rng(0)
  for step in steps:
    for weight in encoder.weights + head.weights:
      value = weight.numpy() + rng.normal(0.0, 0.1, weight.shape)
      if "moving_variance" in weight.path:
        value = np.abs(value) + 0.5
      weight.assign(value.astype(np.float32))
    manager.save(checkpoint_number=step)
  return encoder, head


def _images(seed=0):
  return np.random.default_rng(seed).random((3, IMAGE, IMAGE, 3),
                                            dtype=np.float32)


def test_restore_encoder_gives_the_newest_checkpoint(tmp_path):
  config = conftest.tiny_train("supcon")
  encoder, _ = _write_run(str(tmp_path), config, steps=(1, 2))
  restored = pretrained.restore_encoder(str(tmp_path), config,
                                        (IMAGE, IMAGE, 3))
  assert [w.path for w in restored.weights] == [w.path for w in
                                                encoder.weights]
  for got, want in zip(restored.weights, encoder.weights):
    np.testing.assert_array_equal(got.numpy(), want.numpy())
  np.testing.assert_array_equal(
      np.asarray(restored(_images(), training=False)),
      np.asarray(encoder(_images(), training=False)))


def test_restore_projection_is_encoder_then_head(tmp_path):
  config = conftest.tiny_train("supcon")
  encoder, head = _write_run(str(tmp_path), config)
  projection = pretrained.restore_projection(str(tmp_path), config,
                                             (IMAGE, IMAGE, 3))
  assert projection.name == "projection"
  assert projection.output_shape == (None, 8)
  got = np.asarray(projection(_images(1)))
  want = np.asarray(head(encoder(_images(1), training=False),
                         training=False))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-6)


def test_restore_ce_model_gives_the_trained_classifier(tmp_path):
  config = conftest.tiny_train("ce")
  encoder, head = _write_run(str(tmp_path), config, num_classes=7)
  model = pretrained.restore_ce_model(str(tmp_path), config, 7,
                                      (IMAGE, IMAGE, 3))
  assert model.name == "ce_classifier" and model.output_shape == (None, 7)
  np.testing.assert_allclose(
      np.asarray(model(_images(2))),
      np.asarray(head(encoder(_images(2), training=False))), rtol=1e-5,
      atol=1e-6)


def test_no_checkpoint_is_an_error(tmp_path):
  with pytest.raises(rundir.TrainingError, match="No checkpoint in"):
    pretrained.restore_encoder(str(tmp_path), conftest.tiny_train("supcon"))


def test_a_damaged_newest_checkpoint_is_refused_not_replaced(tmp_path):
  config = conftest.tiny_train("supcon")
  _write_run(str(tmp_path), config, steps=(1, 2))
  newest = rundir.checkpoint_prefix(rundir.checkpoints_dir(str(tmp_path)), 2)
  data_file, = tf.io.gfile.glob(f"{newest}.data-*")
  os.truncate(data_file, os.path.getsize(data_file) // 2)
  with pytest.raises(rundir.TrainingError, match="is damaged") as error:
    pretrained.restore_encoder(str(tmp_path), config, (IMAGE, IMAGE, 3))
  assert newest in str(error.value) and "\n" not in str(error.value)


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
  config = conftest.tiny_train("supcon")
  _write_run(str(tmp_path), config, width=0.125)
  with pytest.raises(rundir.TrainingError, match="does not match"):
    pretrained.restore_encoder(str(tmp_path), config, (IMAGE, IMAGE, 3))


def test_builds_with_the_run_precision_and_restores_the_policy(tmp_path):
  config = conftest.tiny_train("supcon")
  encoder, _ = _write_run(str(tmp_path), config)
  mixed = dataclasses.replace(config, precision="mixed_bfloat16")
  assert keras.mixed_precision.global_policy().name == "float32"
  restored = pretrained.restore_encoder(str(tmp_path), mixed,
                                        (IMAGE, IMAGE, 3))
  assert keras.mixed_precision.global_policy().name == "float32"
  assert restored.get_layer("stem_conv").compute_dtype == "bfloat16"
  np.testing.assert_array_equal(
      restored.get_layer("stem_conv").kernel.numpy(),
      encoder.get_layer("stem_conv").kernel.numpy())


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
