"""Crash-safe state of a linear evaluation: epoch backups and selection.

Everything here lives under `<workdir>/linear_backup/` while a linear
evaluation runs. Each file is replaced atomically, so a kill at any instant
leaves a backup that resumes to the result of an uninterrupted run.
"""

import contextlib
import hashlib
import io
import json
import os
from typing import Any, Dict, List, Optional

import keras
import numpy as np
import tensorflow as tf

from supcon_tf import rundir


def fingerprint(encoder: keras.Model) -> str:
  digest = hashlib.sha256()
  for weight in encoder.weights:
    value = np.asarray(weight.numpy())
    digest.update(str((weight.path, value.shape, value.dtype.str)).encode())
    digest.update(np.ascontiguousarray(value).tobytes())
  return digest.hexdigest()


def check_run(backup_root: str, run: Dict[str, Any]) -> None:
  """Starts a resumable run, or checks that it resumes the same one."""
  path = os.path.join(backup_root, rundir.LINEAR_RUN_FILE)
  changed = sorted({k.split(".")[0]
                    for k in rundir.changed_settings(path, run)})
  if changed:
    raise rundir.TrainingError(
        f"{backup_root} holds an unfinished linear evaluation with other "
        f"settings ({', '.join(changed)} differ). Resuming it would mix "
        "two experiments: use another workdir, restore the settings, or "
        f"delete {backup_root} to start over.")
  if tf.io.gfile.exists(path):
    return
  tf.io.gfile.makedirs(backup_root)
  rundir.atomic_write(path, json.dumps(run, indent=2, sort_keys=True))


class Selection:
  """Per-epoch records of every learning rate and the best weights so far.

  With `select`, "best" is the highest validation top-1 (strictly higher
  wins, so ties keep the earlier learning rate and epoch); without, it is
  the latest epoch. With a `directory`, the state is saved after every
  epoch and loaded when the object is made, so a killed run resumes.
  """

  def __init__(self, learning_rates, select, directory=None):
    self.select = select
    self.directory = directory
    self.history: List[List[Dict[str, float]]] = [[] for _ in learning_rates]
    self.done = [False] * len(learning_rates)
    self.best: Optional[Dict[str, Any]] = None
    self.best_weights = None
    if directory and tf.io.gfile.exists(self._path(rundir.LINEAR_STATE_FILE)):
      with tf.io.gfile.GFile(self._path(rundir.LINEAR_STATE_FILE)) as f:
        state = json.load(f)
      self.history, self.done, self.best = (state["history"], state["done"],
                                            state["best"])
      if self.best is not None:
        with tf.io.gfile.GFile(self._path(self.best["weights_file"]),
                               "rb") as f:
          stored = np.load(io.BytesIO(f.read()))
        self.best_weights = [stored[f"w{i}"] for i in range(len(stored))]

  def _path(self, name):
    return os.path.join(self.directory, name)

  def record(self, index: int, epoch: int, logs: Dict[str, float],
             weights: List[np.ndarray]) -> None:
    """Adds epoch `epoch` (1-based) of learning rate `index`."""
    entry = {"epoch": epoch, **{k: float(v) for k, v in logs.items()}}
    # A resumed run may repeat an epoch: the new record replaces the old.
    self.history[index] = [r for r in self.history[index]
                           if r["epoch"] < epoch] + [entry]
    if self.select and "val_top1" not in entry:
      raise ValueError("Validation metrics are missing from the epoch logs.")
    score = entry["val_top1"] if self.select else epoch
    best = self.best
    redone = best is not None and (best["index"], best["epoch"]) == (index,
                                                                    epoch)
    if best is None or redone or score > best["score"]:
      self.best = {"index": index, "epoch": epoch, "score": score,
                   **{k: entry[k] for k in ("val_top1", "val_top5")
                      if k in entry}}
      self.best_weights = [np.array(w) for w in weights]
      if self.directory:
        self.best["weights_file"] = f"best-lr{index}-epoch{epoch}.npz"
        self._save_weights(self.best["weights_file"])
    self._save()

  def finish(self, index: int) -> None:
    self.done[index] = True
    self._save()

  def _save_weights(self, name):
    # np.savez needs a seekable file, which a GFile in write mode is not.
    buffer = io.BytesIO()
    np.savez(buffer, **{f"w{i}": w for i, w in enumerate(self.best_weights)})
    with _backup_write(self.directory, self.best["epoch"]):
      rundir.atomic_write(self._path(name), buffer.getvalue())

  def _save(self):
    if not self.directory:
      return
    epoch = max((r["epoch"] for h in self.history for r in h), default=0)
    with _backup_write(self.directory, epoch):
      rundir.atomic_write(self._path(rundir.LINEAR_STATE_FILE), json.dumps(
          {"history": self.history, "done": self.done, "best": self.best}))
    keep = self.best and self.best.get("weights_file")
    for name in tf.io.gfile.listdir(self.directory):
      if name.startswith("best-") and name.endswith(".npz") and name != keep:
        tf.io.gfile.remove(self._path(name))


class EpochBackup(keras.callbacks.Callback):
  """Saves the model (weights and optimizer state) after every epoch.

  Used instead of `keras.callbacks.BackupAndRestore` (Keras 3.15), which
  overwrites its weights file in place and then writes the epoch count to a
  second file: a kill during a save leaves a truncated weights file (the
  resume fails) or new weights beside the old count (the resume trains an
  epoch twice). Here each epoch's weights go to a new file, and one
  atomically replaced state file names it with the epochs it holds.

  Args:
    directory: the backup's directory (created on the first save).
  """

  def __init__(self, directory: str):
    super().__init__()
    self.directory = directory
    # Names the newest epoch's weights file and the epochs it holds.
    self.state_path = os.path.join(directory, rundir.LINEAR_EPOCH_BACKUP_FILE)

  def restore(self, model: keras.Model) -> int:
    """Loads the backup into compiled `model`; returns its finished epochs.

    Returns 0 and leaves `model` as it is when there is no backup.
    """
    if not tf.io.gfile.exists(self.state_path):
      return 0
    with tf.io.gfile.GFile(self.state_path) as f:
      state = json.load(f)
    if not model.optimizer.built:
      model.optimizer.build(model.trainable_variables)
    model.load_weights(os.path.join(self.directory, state["weights"]))
    return int(state["epochs"])

  def on_epoch_end(self, epoch, logs=None):
    name = f"epoch{epoch + 1}.weights.h5"
    path = os.path.join(self.directory, name)
    with _backup_write(self.directory, epoch + 1):
      tf.io.gfile.makedirs(self.directory)
      try:
        self.model.save_weights(path, overwrite=True)
      except BaseException:
        # No state file names it yet; a partial file would only take space.
        if tf.io.gfile.exists(path):
          tf.io.gfile.remove(path)
        raise
      rundir.atomic_write(self.state_path,
                          json.dumps({"epochs": epoch + 1, "weights": name}))
    for old in tf.io.gfile.listdir(self.directory):
      if old.endswith(".weights.h5") and old != name:
        tf.io.gfile.remove(os.path.join(self.directory, old))


@contextlib.contextmanager
def _backup_write(directory: str, epoch: int):
  """A failed backup write (e.g. a full disk) as one TrainingError line.

  Every backup file is new or atomically replaced, so the backup of the
  epoch before stays whole and a rerun resumes from it.
  """
  try:
    yield
  except (OSError, tf.errors.OpError) as e:
    raise rundir.TrainingError(
        f"Cannot back up linear evaluation epoch {epoch} in {directory} "
        f"({rundir.first_line(e)}); the backup before it is intact. Free "
        "space on the device (or fix it) and run the same command again to "
        "resume.") from None


class EpochRecorder(keras.callbacks.Callback):
  """Hands every epoch's metrics and linear weights to a `Selection`."""

  def __init__(self, selection: Selection, index: int,
               dense: keras.layers.Layer):
    super().__init__()
    self.selection = selection
    self.index = index
    self.dense = dense

  def on_epoch_end(self, epoch, logs=None):
    self.selection.record(self.index, epoch + 1, dict(logs or {}),
                          self.dense.get_weights())
