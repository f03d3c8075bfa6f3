"""Tests for supcon_tf.linear_backup: a linear evaluation's resume state."""

import errno
import json
import os
import sys

import keras
import numpy as np
import pytest

from supcon_tf import linear_backup
from supcon_tf import rundir


def test_linear_backup_check_run_names_top_level_field(tmp_path):
  root = str(tmp_path / "b")
  linear_backup.check_run(root, {"config": {"lr": 1}, "n": 3})
  linear_backup.check_run(root, {"config": {"lr": 1}, "n": 3})
  with pytest.raises(rundir.TrainingError, match=r"\(config differ\)"):
    linear_backup.check_run(root, {"config": {"lr": 2}, "n": 3})


def test_check_run_stores_the_run_once(tmp_path):
  root = str(tmp_path / "b")
  linear_backup.check_run(root, {"config": {"lr": 1}, "n": 3})
  path = os.path.join(root, rundir.LINEAR_RUN_FILE)
  with open(path) as f:
    assert json.load(f) == {"config": {"lr": 1}, "n": 3}
  before = os.path.getmtime(path), open(path).read()
  with pytest.raises(rundir.TrainingError, match=r"\(n differ\)"):
    linear_backup.check_run(root, {"config": {"lr": 1}, "n": 4})
  assert (os.path.getmtime(path), open(path).read()) == before


def test_selection_keeps_the_best_validation_epoch():
  selection = linear_backup.Selection([0.1, 1.0], select=True)
  weights = [np.array([1.0, 2.0])]
  selection.record(0, 1, {"val_top1": 0.5, "val_top5": 0.9}, weights)
  weights[0][0] = 7.0  # The best weights are a copy.
  np.testing.assert_array_equal(selection.best_weights[0], [1.0, 2.0])
  selection.record(0, 2, {"val_top1": 0.7, "val_top5": 0.8}, [np.zeros(2)])
  selection.record(1, 1, {"val_top1": 0.7}, [np.ones(2)])  # A tie: kept.
  assert selection.best == {"index": 0, "epoch": 2, "score": 0.7,
                            "val_top1": 0.7, "val_top5": 0.8}
  np.testing.assert_array_equal(selection.best_weights[0], np.zeros(2))
  selection.record(1, 2, {"val_top1": 0.75}, [np.full(2, 3.0)])
  assert (selection.best["index"], selection.best["epoch"]) == (1, 2)
  assert [r["epoch"] for r in selection.history[1]] == [1, 2]
  with pytest.raises(ValueError, match="Validation metrics are missing"):
    selection.record(1, 3, {"loss": 0.1}, [np.zeros(2)])


def test_selection_without_validation_keeps_the_latest_epoch():
  selection = linear_backup.Selection([0.1], select=False)
  for epoch in (1, 2, 3):
    selection.record(0, epoch, {"loss": 1.0 / epoch},
                     [np.full(2, float(epoch))])
  assert (selection.best["epoch"], selection.best["score"]) == (3, 3)
  np.testing.assert_array_equal(selection.best_weights[0], [3.0, 3.0])


def _best_files(directory):
  return sorted(n for n in os.listdir(directory) if n.startswith("best-"))


def test_selection_resumes_from_its_directory(tmp_path):
  directory = str(tmp_path)
  first = linear_backup.Selection([0.1, 1.0], select=True,
                                  directory=directory)
  first.record(0, 1, {"val_top1": 0.6}, [np.arange(3.0), np.ones(1)])
  first.record(0, 2, {"val_top1": 0.4}, [np.zeros(3), np.zeros(1)])
  first.finish(0)
  assert _best_files(directory) == ["best-lr0-epoch1.npz"]

  resumed = linear_backup.Selection([0.1, 1.0], select=True,
                                    directory=directory)
  assert resumed.history == first.history
  assert resumed.done == [True, False]
  assert resumed.best == first.best
  np.testing.assert_array_equal(resumed.best_weights[0], np.arange(3.0))
  np.testing.assert_array_equal(resumed.best_weights[1], np.ones(1))
  resumed.record(1, 1, {"val_top1": 0.8}, [np.full(3, 5.0), np.zeros(1)])
  assert _best_files(directory) == ["best-lr1-epoch1.npz"]  # Old one gone.


def test_a_redone_best_epoch_replaces_its_record(tmp_path):
  # A kill after the record of epoch 2 and before its backup: the rerun of
  # epoch 2 is what the run holds, even if it scores lower.
  selection = linear_backup.Selection([0.1], select=True,
                                      directory=str(tmp_path))
  selection.record(0, 1, {"val_top1": 0.5}, [np.zeros(2)])
  selection.record(0, 2, {"val_top1": 0.9}, [np.ones(2)])
  resumed = linear_backup.Selection([0.1], select=True,
                                    directory=str(tmp_path))
  resumed.record(0, 2, {"val_top1": 0.6}, [np.full(2, 2.0)])
  assert [r["val_top1"] for r in resumed.history[0]] == [0.5, 0.6]
  assert (resumed.best["epoch"], resumed.best["score"]) == (2, 0.6)
  np.testing.assert_array_equal(resumed.best_weights[0], [2.0, 2.0])


def _model(seed=0):
  keras.utils.set_random_seed(seed)
  model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
  model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                loss="mse")
  return model


def _data():
  rng = np.random.default_rng(0)
  return (rng.normal(size=(8, 3)).astype(np.float32),
          rng.normal(size=(8, 2)).astype(np.float32))


def test_epoch_backup_restores_weights_and_optimizer_state(tmp_path):
  directory = str(tmp_path / "backup")
  model = _model()
  x, y = _data()
  model.fit(x, y, batch_size=4, epochs=2, verbose=0,
            callbacks=[linear_backup.EpochBackup(directory)])
  with open(os.path.join(directory, rundir.LINEAR_EPOCH_BACKUP_FILE)) as f:
    assert json.load(f) == {"epochs": 2, "weights": "epoch2.weights.h5"}
  assert sorted(os.listdir(directory)) == [rundir.LINEAR_EPOCH_BACKUP_FILE,
                                           "epoch2.weights.h5"]
  fresh = _model(seed=1)
  assert linear_backup.EpochBackup(directory).restore(fresh) == 2
  for got, want in zip(fresh.weights, model.weights):
    np.testing.assert_array_equal(got.numpy(), want.numpy())
  assert int(fresh.optimizer.iterations.numpy()) == 4
  for got, want in zip(fresh.optimizer.variables, model.optimizer.variables):
    np.testing.assert_array_equal(got.numpy(), want.numpy())
  # Resumed training continues as the uninterrupted run would.
  model.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
  fresh.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
  for got, want in zip(fresh.weights, model.weights):
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6)


def test_epoch_backup_without_a_backup_restores_nothing(tmp_path):
  model = _model()
  before = [w.numpy().copy() for w in model.weights]
  assert linear_backup.EpochBackup(str(tmp_path / "none")).restore(model) == 0
  for got, want in zip(model.weights, before):
    np.testing.assert_array_equal(got.numpy(), want)


def test_a_failed_backup_keeps_the_previous_one(tmp_path, monkeypatch):
  directory = str(tmp_path)
  model = _model()
  model.optimizer.build(model.trainable_variables)
  backup = linear_backup.EpochBackup(directory)
  backup.set_model(model)
  backup.on_epoch_end(0)

  def full_disk(self, path, overwrite=True):
    del self, overwrite
    with open(path, "wb") as f:
      f.write(b"\0" * 10)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(type(model), "save_weights", full_disk)
  with pytest.raises(rundir.TrainingError, match="epoch 2") as error:
    backup.on_epoch_end(1)
  assert "\n" not in str(error.value)
  assert "No space left on device" in str(error.value)
  assert sorted(os.listdir(directory)) == [rundir.LINEAR_EPOCH_BACKUP_FILE,
                                           "epoch1.weights.h5"]
  monkeypatch.undo()
  assert linear_backup.EpochBackup(directory).restore(_model(seed=2)) == 1


def test_fingerprint_changes_with_any_weight():
  model = _model(seed=3)
  original = linear_backup.fingerprint(model)
  assert linear_backup.fingerprint(model) == original  # Deterministic.
  kernel = model.layers[0].kernel
  value = kernel.numpy()
  kernel.assign(np.nextafter(value, np.inf))  # One ulp.
  assert linear_backup.fingerprint(model) != original
  kernel.assign(value)
  assert linear_backup.fingerprint(model) == original


def test_epoch_recorder_hands_metrics_and_weights_to_the_selection():
  selection = linear_backup.Selection([0.1, 1.0], select=True)
  dense = keras.layers.Dense(2)
  dense.build((None, 3))
  recorder = linear_backup.EpochRecorder(selection, 1, dense)
  recorder.on_epoch_end(0, {"val_top1": 0.3, "loss": np.float32(1.5)})
  assert selection.history == [[], [{"epoch": 1, "val_top1": 0.3,
                                      "loss": 1.5}]]
  for got, want in zip(selection.best_weights, dense.get_weights()):
    np.testing.assert_array_equal(got, want)


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
