"""Tests for supcon_tf.checkpoints: crash-safe saving and restoring."""

import errno
import logging
import os
import sys
import types

import numpy as np
import pytest
import tensorflow as tf

from supcon_tf import checkpoints
from supcon_tf import rundir


def _checkpoint(value=0.0, shape=(64, 8)):
  return tf.train.Checkpoint(w=tf.Variable(tf.fill(shape, value)),
                             step=tf.Variable(0, dtype=tf.int64))


def _saver(directory, value=0.0, strategy=None, max_to_keep=3):
  checkpoint = _checkpoint(value)
  return checkpoint, checkpoints.CheckpointSaver(
      checkpoint, str(directory), strategy or tf.distribute.get_strategy(),
      max_to_keep=max_to_keep)


def _save_steps(directory, steps, max_to_keep=5):
  """Saves `steps`, the variable holding the step number at each."""
  checkpoint, saver = _saver(directory, max_to_keep=max_to_keep)
  for step in steps:
    checkpoint.w.assign(tf.fill(checkpoint.w.shape, float(step)))
    checkpoint.step.assign(step)
    saver.save(step)
  return checkpoint


def _damage(prefix):
  data_file, = tf.io.gfile.glob(f"{prefix}.data-*")
  os.truncate(data_file, os.path.getsize(data_file) // 2)


def _files(directory):
  return sorted(os.listdir(directory))


def test_save_and_restore_the_newest(tmp_path):
  _save_steps(tmp_path, [2, 4, 6, 8], max_to_keep=3)
  assert tf.train.latest_checkpoint(str(tmp_path)) == str(tmp_path / "ckpt-8")
  # max_to_keep: the oldest is gone, files and listing alike.
  assert not tf.io.gfile.glob(str(tmp_path / "ckpt-2.*"))
  checkpoint, saver = _saver(tmp_path)
  assert saver.restore() == rundir.checkpoint_prefix(str(tmp_path), 8)
  np.testing.assert_array_equal(checkpoint.w.numpy(), 8.0)
  assert int(checkpoint.step.numpy()) == 8


def test_restore_of_an_empty_directory_is_none(tmp_path):
  checkpoint, saver = _saver(tmp_path, value=3.0)
  assert saver.restore() is None
  np.testing.assert_array_equal(checkpoint.w.numpy(), 3.0)
  assert checkpoints.restore_newest(str(tmp_path / "none"), None,
                                    fallback=False) is None


def test_a_damaged_newest_falls_back_with_a_warning(tmp_path, caplog):
  _save_steps(tmp_path, [1, 2])
  newest = rundir.checkpoint_prefix(str(tmp_path), 2)
  _damage(newest)
  checkpoint, saver = _saver(tmp_path)
  with caplog.at_level(logging.WARNING):
    restored = saver.restore()
  assert restored == rundir.checkpoint_prefix(str(tmp_path), 1)
  np.testing.assert_array_equal(checkpoint.w.numpy(), 1.0)
  assert any(newest in r.getMessage() and "instead of the newest" in
             r.getMessage() for r in caplog.records), caplog.text


def test_without_fallback_a_damaged_newest_is_an_error(tmp_path):
  _save_steps(tmp_path, [1, 2])
  newest = rundir.checkpoint_prefix(str(tmp_path), 2)
  _damage(newest)
  tried = []

  def restore(path):
    tried.append(path)
    _checkpoint().restore(path).assert_existing_objects_matched()

  with pytest.raises(rundir.TrainingError, match="is damaged") as error:
    checkpoints.restore_newest(str(tmp_path), restore, fallback=False)
  assert tried == [newest]  # The one before it is not used instead.
  message = str(error.value)
  assert newest in message and "--mode=pretrain" in message
  assert "\n" not in message


def test_every_checkpoint_damaged_names_the_newest(tmp_path):
  _save_steps(tmp_path, [1, 2])
  for step in (1, 2):
    _damage(rundir.checkpoint_prefix(str(tmp_path), step))
  _, saver = _saver(tmp_path)
  with pytest.raises(rundir.TrainingError,
                     match="no earlier one restores") as error:
    saver.restore()
  assert rundir.checkpoint_prefix(str(tmp_path), 2) in str(error.value)


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
  _save_steps(tmp_path, [1])
  other = tf.train.Checkpoint(w=tf.Variable(tf.zeros([3, 3])),
                              step=tf.Variable(0, dtype=tf.int64))
  saver = checkpoints.CheckpointSaver(other, str(tmp_path),
                                      tf.distribute.get_strategy(), 3)
  with pytest.raises(rundir.TrainingError, match="does not match") as error:
    saver.restore()
  assert "new --workdir" in str(error.value)
  np.testing.assert_array_equal(other.w.numpy(), 0.0)


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
  checkpoint, saver = _saver(tmp_path)
  checkpoint.w.assign(tf.fill(checkpoint.w.shape, 1.0))
  saver.save(1)
  before = _files(tmp_path)
  real_save = saver.manager.save

  def full_disk(checkpoint_number):
    # What a full disk leaves: part of the new checkpoint's files.
    prefix = rundir.checkpoint_prefix(str(tmp_path), checkpoint_number)
    with open(f"{prefix}.data-00000-of-00001", "wb") as f:
      f.write(b"\0" * 10)
    os.makedirs(f"{prefix}_temp")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(saver.manager, "save", full_disk)
  with pytest.raises(rundir.TrainingError) as error:
    saver.save(2)
  message = str(error.value)
  assert "checkpoint of step 2" in message and "\n" not in message
  assert rundir.checkpoint_prefix(str(tmp_path), 1) in message
  assert "No space left on device" in message
  assert _files(tmp_path) == before  # The failed one left nothing.
  monkeypatch.setattr(saver.manager, "save", real_save)
  checkpoint.w.assign(tf.fill(checkpoint.w.shape, 2.0))
  saver.save(2)  # With space again, the same saver goes on.
  restored, again = _saver(tmp_path)
  assert again.restore() == rundir.checkpoint_prefix(str(tmp_path), 2)
  np.testing.assert_array_equal(restored.w.numpy(), 2.0)


def test_a_non_chief_worker_saves_but_keeps_nothing(tmp_path):
  resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
      tf.train.ClusterSpec({"worker": ["localhost:1", "localhost:2"]}),
      task_type="worker", task_id=1)
  worker = types.SimpleNamespace(cluster_resolver=resolver)
  _save_steps(tmp_path, [1])
  before = _files(tmp_path)
  checkpoint, saver = _saver(tmp_path, value=5.0, strategy=worker)
  assert not saver.chief
  scratch = saver.manager.directory
  assert scratch != str(tmp_path)
  saver.save(2)
  assert not os.path.exists(scratch)  # Its own files are removed.
  assert _files(tmp_path) == before
  # It restores what the chief wrote.
  assert saver.restore() == rundir.checkpoint_prefix(str(tmp_path), 1)
  np.testing.assert_array_equal(checkpoint.w.numpy(), 1.0)


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
