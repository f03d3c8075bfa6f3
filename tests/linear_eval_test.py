"""Tests of supcon_tf.linear_eval: frozen encoder, honest selection, resume."""

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
from supcon_tf import linear_backup
from supcon_tf import linear_eval
from supcon_tf import rundir

IMAGE = conftest.COLOUR_IMAGE
BATCH = 16


def batches(images, labels, batch=BATCH):
  return tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch)


def spied(images, labels, name, log, batch=BATCH):
  """A dataset that appends `name` to `log` whenever it is iterated."""

  def generate():
    log.append(name)
    for start in range(0, len(labels), batch):
      yield images[start:start + batch], labels[start:start + batch]

  return tf.data.Dataset.from_generator(generate, output_signature=(
      tf.TensorSpec([None, IMAGE, IMAGE, 3], tf.float32),
      tf.TensorSpec([None], tf.int32)))


def easy_datasets(num_classes=4):
  return dict(train=batches(*conftest.colour_data(64, num_classes, 0)),
              validation=batches(*conftest.colour_data(32, num_classes, 1)),
              test=batches(*conftest.colour_data(32, num_classes, 2)))


def eval_config(**kwargs):
  defaults = dict(epochs=5, batch_size=8, learning_rates=(0.3, 1.0))
  defaults.update(kwargs)
  return config_lib.LinearEvalConfig(**defaults)


def accuracy(classifier, images, labels):
  logits = classifier.predict(images, batch_size=BATCH, verbose=0)
  return float(np.mean(np.argmax(logits, axis=1) == labels))


def test_cached_features_accurate_untouched_and_written(tmp_path):
  encoder = conftest.tiny_encoder()
  before = conftest.snapshot(encoder)
  test_images, test_labels = conftest.colour_data(32, 4, 2)
  classifier, result = linear_eval.linear_eval(
      encoder, config_lib.DataConfig(), eval_config(),
      datasets=easy_datasets(), workdir=str(tmp_path), verbose=False)
  conftest.assert_unchanged(before, encoder)
  assert result.cached_features and result.selected_on == "validation"
  assert result.num_classes == 4 and result.top5_k == 4
  assert result.test_top1 > 0.9
  assert result.test_top5 >= result.test_top1
  assert result.learning_rate in (0.3, 1.0)
  assert 1 <= result.epochs <= 5
  assert [h["learning_rate"] for h in result.history] == [0.3, 1.0]
  assert all(len(h["epochs"]) == 5 for h in result.history)
  # The returned classifier carries the reported weights, end to end.
  assert accuracy(classifier, test_images, test_labels) == pytest.approx(
      result.test_top1)
  with open(tmp_path / linear_eval.RESULT_FILE) as f:
    written = json.load(f)
  assert written["test_top1"] == pytest.approx(result.test_top1)
  assert written["learning_rate"] == result.learning_rate
  assert written["config"]["learning_rates"] == [0.3, 1.0]
  assert not os.path.exists(tmp_path / linear_eval.BACKUP_DIR)


@pytest.mark.parametrize("cache_features", [True, False])
def test_choices_are_made_on_validation_only(cache_features):
  """Validation labels are the flipped test labels on the same images.

  With 2 classes every candidate's test top-1 is then 1 - its validation
  top-1: choosing on validation picks the candidate that is *worst* on test,
  which no selection that peeks at the test split would do.
  """
  encoder = conftest.tiny_encoder()
  before = conftest.snapshot(encoder)
  train_images, train_labels = conftest.colour_data(64, 2, 0, noise=0.3, spread=0.2)
  images, labels = conftest.colour_data(48, 2, 2, noise=0.3, spread=0.2)
  log = []
  datasets = dict(train=spied(train_images, train_labels, "train", log),
                  validation=spied(images, 1 - labels, "validation", log),
                  test=spied(images, labels, "test", log))
  _, result = linear_eval.linear_eval(
      encoder, config_lib.DataConfig(),
      eval_config(epochs=3, learning_rates=(0.01, 0.5),
                  cache_features=cache_features),
      datasets=datasets, verbose=False)
  conftest.assert_unchanged(before, encoder)
  assert log.count("test") == 1 and log[-1] == "test"
  assert "validation" in log and "train" in log

  candidates = [(h["learning_rate"], e["epoch"], e["val_top1"])
                for h in result.history for e in h["epochs"]]
  assert len(candidates) == 6
  best_val = max(c[2] for c in candidates)
  chosen = next(c for c in candidates if c[2] == best_val)
  assert (result.learning_rate, result.epochs) == chosen[:2]
  assert result.val_top1 == pytest.approx(best_val)
  one_example = 1 / len(labels)
  assert result.test_top1 == pytest.approx(1 - best_val, abs=one_example)
  # The case discriminates: peeking at test would have reported more.
  best_test = 1 - min(c[2] for c in candidates)
  assert best_test > result.test_top1 + 2 * one_example


def test_without_validation_trains_the_single_rate():
  log = []
  datasets = easy_datasets(3)
  datasets["validation"] = None
  datasets["test"] = spied(*conftest.colour_data(24, 3, 2), "test", log)
  _, result = linear_eval.linear_eval(
      conftest.tiny_encoder(), config_lib.DataConfig(),
      eval_config(epochs=3, learning_rates=None, learning_rate=0.5),
      datasets=datasets, verbose=False)
  assert result.selected_on == "none"
  assert result.val_top1 is None and result.val_top5 is None
  assert (result.learning_rate, result.epochs) == (0.5, 3)
  assert [e["epoch"] for e in result.history[0]["epochs"]] == [1, 2, 3]
  assert not any("val_top1" in e for e in result.history[0]["epochs"])
  assert log == ["test"]
  with pytest.raises(ValueError, match="validation split"):
    linear_eval.linear_eval(
        conftest.tiny_encoder(), config_lib.DataConfig(), eval_config(epochs=1),
        datasets=datasets, verbose=False)


def test_under_mirrored_strategy():
  strategy = conftest.make_mirrored(2)
  encoder = conftest.tiny_encoder()
  before = conftest.snapshot(encoder)
  classifier, result = linear_eval.linear_eval(
      encoder, config_lib.DataConfig(),
      eval_config(learning_rates=None, learning_rate=1.0),
      strategy=strategy, datasets=easy_datasets(), verbose=False)
  conftest.assert_unchanged(before, encoder)
  assert result.test_top1 > 0.9
  assert result.test_top5 >= result.test_top1
  assert accuracy(classifier, *conftest.colour_data(32, 4, 2)) == pytest.approx(
      result.test_top1)


@pytest.mark.slow
def test_image_path_under_mirrored_strategy():
  strategy = conftest.make_mirrored(2)
  encoder = conftest.tiny_encoder()
  before = conftest.snapshot(encoder)
  classifier, result = linear_eval.linear_eval(
      encoder, config_lib.DataConfig(),
      eval_config(epochs=2, learning_rates=None, learning_rate=1.0,
                  cache_features=False),
      strategy=strategy, datasets=easy_datasets(), verbose=False)
  conftest.assert_unchanged(before, encoder)
  assert not result.cached_features
  assert [e["epoch"] for e in result.history[0]["epochs"]] == [1, 2]
  assert accuracy(classifier, *conftest.colour_data(32, 4, 2)) == pytest.approx(
      result.test_top1)


class _Killed(Exception):
  pass


def test_killed_run_resumes(tmp_path, monkeypatch):
  config = eval_config(epochs=3)
  records = []
  record = linear_backup.Selection.record

  def record_then_die(self, index, epoch, logs, weights):
    record(self, index, epoch, logs, weights)
    records.append((index, epoch))
    if (index, epoch) == (1, 2) and not killed:
      killed.append(True)
      raise _Killed()

  killed = []
  monkeypatch.setattr(linear_backup.Selection, "record", record_then_die)
  encoder = conftest.tiny_encoder()
  with pytest.raises(_Killed):
    linear_eval.linear_eval(encoder, config_lib.DataConfig(), config,
                            datasets=easy_datasets(), workdir=str(tmp_path),
                            verbose=False)
  assert os.path.exists(tmp_path / linear_eval.BACKUP_DIR)
  # Another configuration must not resume this run.
  with pytest.raises(rundir.TrainingError, match="other settings"):
    linear_eval.linear_eval(encoder, config_lib.DataConfig(),
                            eval_config(epochs=4), datasets=easy_datasets(),
                            workdir=str(tmp_path), verbose=False)
  del records[:]
  _, result = linear_eval.linear_eval(
      encoder, config_lib.DataConfig(), config, datasets=easy_datasets(),
      workdir=str(tmp_path), verbose=False)
  # The finished learning rate is not redone; the killed one goes on from
  # its last backed-up epoch (epoch 2 was not backed up: it runs again).
  assert records == [(1, 2), (1, 3)]
  assert [[e["epoch"] for e in h["epochs"]] for h in result.history] == [
      [1, 2, 3], [1, 2, 3]]
  assert result.test_top1 > 0.5
  assert os.path.exists(tmp_path / linear_eval.RESULT_FILE)
  assert not os.path.exists(tmp_path / linear_eval.BACKUP_DIR)


def test_full_disk_while_backing_up_is_one_line_and_resumable(
    tmp_path, monkeypatch):
  config = eval_config(epochs=3, learning_rates=(0.3,))
  encoder = conftest.tiny_encoder()
  _, want = linear_eval.linear_eval(
      encoder, config_lib.DataConfig(), config, datasets=easy_datasets(),
      verbose=False)
  save_weights = keras.Model.save_weights
  calls = []

  def full_disk_at_epoch_2(model, filepath, *args, **kwargs):
    calls.append(filepath)
    if len(calls) < 2:
      return save_weights(model, filepath, *args, **kwargs)
    with open(filepath, "wb") as f:
      f.write(b"\x89HDF")  # Part of a file, then the disk is full.
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(keras.Model, "save_weights", full_disk_at_epoch_2)
  with pytest.raises(rundir.TrainingError) as error:
    linear_eval.linear_eval(encoder, config_lib.DataConfig(), config,
                            datasets=easy_datasets(), workdir=str(tmp_path),
                            verbose=False)
  message = str(error.value)
  assert "\n" not in message, message
  assert "Cannot back up linear evaluation epoch 2" in message
  assert "No space left on device" in message
  backup = tmp_path / linear_eval.BACKUP_DIR / "lr0"
  assert sorted(p for p in os.listdir(backup) if p.endswith(".h5")) == [
      "epoch1.weights.h5"]  # The failed epoch left nothing behind.
  monkeypatch.setattr(keras.Model, "save_weights", save_weights)
  _, got = linear_eval.linear_eval(
      encoder, config_lib.DataConfig(), config, datasets=easy_datasets(),
      workdir=str(tmp_path), verbose=False)
  assert [e["epoch"] for e in got.history[0]["epochs"]] == [1, 2, 3]
  assert got.test_top1 == pytest.approx(want.test_top1, abs=1e-6)
  assert not os.path.exists(tmp_path / linear_eval.BACKUP_DIR)


def mock_cifar10(tmp_path, num_examples=16, num_train=16, num_test=8):
  return conftest.mock_tfds(tmp_path, "cifar10", num_examples, num_train,
                           num_test)


def test_augmented_images_from_tfds_leave_encoder_untouched(tmp_path):
  with mock_cifar10(tmp_path):
    encoder = conftest.tiny_encoder()
    before = conftest.snapshot(encoder)
    data_config = config_lib.DataConfig(
        dataset="cifar10", image_size=IMAGE, validation_fraction=0.25,
        shuffle_buffer=16)
    _, result = linear_eval.linear_eval(
        encoder, data_config,
        eval_config(epochs=2, batch_size=4, augment=True,
                    learning_rates=None),
        verbose=False)
  conftest.assert_unchanged(before, encoder)
  assert not result.cached_features
  assert result.num_classes == 10 and result.top5_k == 5
  assert result.selected_on == "validation"
  assert [e["epoch"] for e in result.history[0]["epochs"]] == [1, 2]
  assert 0 <= result.test_top1 <= result.test_top5 <= 1


def test_learning_rates_config_validation():
  assert config_lib.LinearEvalConfig(
      learning_rates=[0.1, 0.2]).learning_rates == (0.1, 0.2)
  with pytest.raises(ValueError, match="learning_rates"):
    config_lib.LinearEvalConfig(learning_rates=(0.1, -1.0))
  with pytest.raises(ValueError, match="learning_rates"):
    config_lib.LinearEvalConfig(learning_rates=())


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
