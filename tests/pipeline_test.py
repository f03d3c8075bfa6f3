"""Tests for supcon_tf.pipeline: the stages as a library call."""

import contextlib
import dataclasses
import errno
import json
import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import conftest
from supcon_tf import config as config_lib
from supcon_tf import data
from supcon_tf import evaluation
from supcon_tf import pipeline
from supcon_tf import pretrained
from supcon_tf import rundir


def test_train_ce_reports_the_head_it_trained(tmp_path):
  workdir = str(tmp_path / "run")
  with conftest.mock_tfds(tmp_path, num_examples=16, num_train=20):
    report = pipeline.run(
        "train_ce", workdir, train=conftest.tiny_train("ce"),
        linear=config_lib.LinearEvalConfig(epochs=1, batch_size=8),
        evaluation_config=config_lib.EvalConfig(robustness=False,
                                                max_examples=8,
                                                knn_train_examples=8),
        verbose=False)
    pretrain_dir = rundir.pretrain_dir(workdir)
    config = rundir.load_config(pretrain_dir)
    model = pretrained.restore_ce_model(pretrain_dir, config, num_classes=10)
    test = data.eval_dataset(config.data, "test", batch_size=500)
    assert report["ce_head"]["test_top1"] == evaluation.top1_accuracy(
        model, test)
  assert set(report["ce_head"]) == {"validation_top1", "test_top1"}
  # Cross-entropy has no projection space to retrieve in.
  assert list(report["evaluation"]["retrieval"]) == ["encoder"]
  # The restored head is the trained one, not a fresh initialisation.
  reader = tf.train.load_checkpoint(
      tf.train.latest_checkpoint(rundir.checkpoints_dir(pretrain_dir)))
  [key] = [name for name in reader.get_variable_to_shape_map()
           if name.startswith("head/") and "kernel" in name
           and "OPTIMIZER" not in name]
  np.testing.assert_array_equal(
      model.get_layer("classifier").kernel.numpy(), reader.get_tensor(key))


def test_contrastive_run_retrieves_in_both_spaces(tmp_path):
  workdir = str(tmp_path / "run")
  with conftest.mock_tfds(tmp_path, num_examples=16, num_train=20):
    for mode in ("pretrain", "linear_eval", "evaluate"):
      report = pipeline.run(
          mode, workdir, train=conftest.tiny_train("supcon"),
          linear=config_lib.LinearEvalConfig(epochs=1, batch_size=8),
          evaluation_config=config_lib.EvalConfig(
              robustness=False, max_examples=8, knn_train_examples=8),
          verbose=False)
    pretrain_dir = rundir.pretrain_dir(workdir)
    projection = pretrained.restore_projection(
        pretrain_dir, rundir.load_config(pretrain_dir))
  retrieval = report["evaluation"]["retrieval"]
  assert set(retrieval) == {"encoder", "projection"}
  assert retrieval["projection"]["gallery"] == 8
  with open(rundir.retrieval_path(workdir)) as f:
    assert json.load(f) == retrieval
  assert projection.output_shape == (None, 8)
  # The restored head is the trained one, not a fresh initialisation.
  reader = tf.train.load_checkpoint(
      tf.train.latest_checkpoint(rundir.checkpoints_dir(pretrain_dir)))
  [key] = [name for name in reader.get_variable_to_shape_map()
           if name.startswith("head/projection/_kernel")]
  head = projection.get_layer(index=-1)
  np.testing.assert_array_equal(head.projection.kernel.numpy(),
                                reader.get_tensor(key))


def test_a_longer_rerun_extends_the_run_and_the_report_says_so(tmp_path):
  workdir = str(tmp_path / "run")
  linear = config_lib.LinearEvalConfig(epochs=1, batch_size=8)
  with conftest.mock_tfds(tmp_path, num_examples=16, num_train=20):
    first = pipeline.run("pretrain", workdir,
                         train=conftest.tiny_train("supcon"), linear=linear,
                         verbose=False)
    longer = dataclasses.replace(conftest.tiny_train("supcon"), steps=3)
    report = pipeline.run("pretrain", workdir, train=longer, linear=linear,
                          verbose=False)
  assert "extended_from_steps" not in first["pretrain"]
  assert report["pretrain"]["steps"] == 3
  assert report["pretrain"]["extended_from_steps"] == 2


@pytest.mark.parametrize("failure", ["enospc", "file_size_limit"])
def test_full_disk_at_the_classifier_is_one_line_and_keeps_the_old_one(
    tmp_path, monkeypatch, failure):
  workdir = str(tmp_path / "run")
  linear = config_lib.LinearEvalConfig(epochs=1, batch_size=8)
  path = rundir.classifier_path(workdir)
  with conftest.mock_tfds(tmp_path, num_examples=16, num_train=20):
    pipeline.run("pretrain", workdir, train=conftest.tiny_train("supcon"),
                 linear=linear, verbose=False)
    pipeline.run("linear_eval", workdir, train=conftest.tiny_train("supcon"),
                 linear=linear, verbose=False)
    with open(path, "rb") as f:
      before = f.read()
    if failure == "enospc":
      def full_save(model, filepath, *args, **kwargs):
        del model, args, kwargs
        with open(filepath, "wb") as f:
          f.write(b"PK")  # Part of a zip file, then the disk is full.
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
      monkeypatch.setattr(keras.Model, "save", full_save)
      limit = contextlib.nullcontext()
    else:  # Keras's own writer failing mid-file.
      limit = conftest.file_size_limit(len(before) // 2)
    with limit, pytest.raises(rundir.TrainingError) as error:
      pipeline.run("linear_eval", workdir, train=conftest.tiny_train("supcon"),
                   linear=linear, verbose=False)
  message = str(error.value)
  assert "\n" not in message and path in message, message
  assert "nothing was written there" in message
  if failure == "enospc":
    assert "No space left on device" in message
  with open(path, "rb") as f:
    assert f.read() == before  # The earlier classifier, intact.
  assert not [n for n in os.listdir(os.path.dirname(path)) if ".tmp-" in n]


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))


def test_a_crash_in_a_later_stage_keeps_the_earlier_stages_report(
    tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")

  def crash(*args, **kwargs):
    raise RuntimeError("evaluation crashed")

  monkeypatch.setattr(evaluation, "evaluate_workdir", crash)
  with conftest.mock_tfds(tmp_path, num_examples=16, num_train=20):
    with pytest.raises(RuntimeError, match="evaluation crashed"):
      pipeline.run("all", workdir, train=conftest.tiny_train("supcon"),
                   linear=config_lib.LinearEvalConfig(epochs=1, batch_size=8),
                   verbose=False)
  with open(rundir.report_path(workdir)) as f:
    report = json.load(f)
  assert report["pretrain"]["steps"] == 2
  assert "test_top1" in report["linear_eval"]
  assert report["export"] and "evaluation" not in report
