"""Checkpoints that survive crashes, full disks and multi-worker saving.

`CheckpointSaver` wraps `tf.train.CheckpointManager` so that every worker
takes part in saving while only the chief keeps files, a failed write leaves
the previous checkpoint the latest and intact, and a damaged newest
checkpoint falls back to the one before it. `restore_newest` is the restore
rule every stage shares.
"""

import os
import shutil
import tempfile

from absl import logging
import tensorflow as tf

from supcon_tf import distributed
from supcon_tf import rundir


class CheckpointSaver:
  """A `CheckpointManager` that is safe under multi-worker training.

  Every worker must take part in saving (it runs collectives); only the
  chief's files are kept, the others write to a temporary directory.
  """

  def __init__(self, checkpoint, directory, strategy, max_to_keep):
    self.chief = distributed.is_chief(strategy)
    self._tmp = None if self.chief else tempfile.mkdtemp(prefix="ckpt-")
    self.manager = tf.train.CheckpointManager(
        checkpoint, directory if self.chief else self._tmp,
        max_to_keep=max_to_keep, checkpoint_name=rundir.CHECKPOINT_NAME)
    self.reader = tf.train.CheckpointManager(
        checkpoint, directory, max_to_keep=max_to_keep,
        checkpoint_name=rundir.CHECKPOINT_NAME)

  def restore(self):
    """Restores the newest readable checkpoint of the chief's directory.

    A newest checkpoint that cannot be read (truncated, garbled, files
    missing) is skipped, with a warning naming it, for the one before it:
    the run then recomputes the steps in between.

    Returns:
      The restored checkpoint's path, or None when the directory holds none.

    Raises:
      TrainingError: no listed checkpoint restores (another model's, or all
        unreadable); the message names the newest.
    """
    checkpoint = self.reader.checkpoint
    return restore_newest(
        self.reader.directory,
        lambda path: checkpoint.restore(path).assert_existing_objects_matched(),
        fallback=True)

  def save(self, step: int):
    """Writes the checkpoint of `step`.

    Raises:
      TrainingError: the write failed (e.g. no space left on the device);
        the checkpoint that was the latest before stays the latest and
        intact, and the files of the failed one are removed.
    """
    directory = self.manager.directory
    try:
      return self.manager.save(checkpoint_number=step)
    except (OSError, tf.errors.OpError) as e:
      # Only files of a checkpoint that no index lists: a failure after
      # TF recorded the new checkpoint keeps it.
      if self.chief and rundir.checkpoint_prefix(directory, step) not in (
          _listed_checkpoints(directory)):
        _remove_checkpoint_files(directory, step)
      latest = _listed_checkpoints(directory)
      raise rundir.TrainingError(
          f"Cannot write the checkpoint of step {step} in {directory} "
          f"({rundir.first_line(e)}); the latest checkpoint is still "
          f"{latest[0] if latest else 'none'}, intact. Free space on the "
          "device (or fix it) and run the same command again to resume."
      ) from None
    finally:
      if self._tmp:
        shutil.rmtree(self._tmp, ignore_errors=True)


# What reading a damaged checkpoint raises: DataLossError (checksums),
# IndexError (a truncated data file), NotFoundError / ValueError (a missing
# file) or a plain OpError (an unreadable index).
_RESTORE_ERRORS = (AssertionError, IndexError, ValueError, tf.errors.OpError)
_DAMAGE_MARKERS = ("checksum", "corrupt", "read less bytes", "truncated",
                   "failed to find any matching files", "unable to read file",
                   "data loss")


def _listed_checkpoints(directory: str):
  """Checkpoints the `checkpoint` index file of `directory` lists, newest first.

  Paths are rebuilt from their base names, so a moved work dir still finds
  its checkpoints.
  """
  try:
    state = tf.train.get_checkpoint_state(directory)
  except (ValueError, tf.errors.OpError) as e:
    logging.warning("Unreadable checkpoint index in %s (%s).", directory,
                    rundir.first_line(e))
    return []
  if state is None:
    return []
  listed = [p for p in state.all_model_checkpoint_paths
            if p != state.model_checkpoint_path]
  listed.append(state.model_checkpoint_path)
  return [os.path.join(directory, os.path.basename(p))
          for p in reversed(listed)]


def _remove_checkpoint_files(directory: str, step: int) -> None:
  prefix = rundir.checkpoint_prefix(directory, step)
  for path in tf.io.gfile.glob(f"{prefix}.*") + tf.io.gfile.glob(
      f"{prefix}_temp*"):
    try:
      if tf.io.gfile.isdir(path):
        tf.io.gfile.rmtree(path)
      else:
        tf.io.gfile.remove(path)
    except (OSError, tf.errors.OpError):
      pass  # Unreferenced files are harmless; a full disk may refuse this.


def restore_newest(directory: str, restore_fn, *, fallback: bool):
  """Calls `restore_fn(path)` on the newest listed checkpoint that restores.

  Args:
    directory: a checkpoints directory.
    restore_fn: restores one checkpoint path; raises on failure.
    fallback: try older checkpoints when the newest fails; False raises at
      once, naming it.

  Returns:
    The restored path, or None when nothing is listed.

  Raises:
    TrainingError: no checkpoint restored; names the newest and why.
  """
  listed = _listed_checkpoints(directory)
  if not listed:
    return None
  newest_error = None
  for path in listed if fallback else listed[:1]:
    try:
      restore_fn(path)
    except _RESTORE_ERRORS as e:
      newest_error = newest_error or e
      logging.warning("Cannot restore checkpoint %s (%s)%s", path,
                      rundir.first_line(e), "; trying the one before it." if (
                          fallback and path != listed[-1]) else ".")
      continue
    if path != listed[0]:
      # The same model restored an older checkpoint: the newest is damaged.
      logging.warning("Resumed from %s instead of the newest, unreadable "
                      "checkpoint %s (%s).", path, listed[0],
                      rundir.first_line(newest_error))
    return path
  reason = rundir.first_line(newest_error)
  if any(m in reason.lower() for m in _DAMAGE_MARKERS):
    if fallback:
      raise rundir.TrainingError(
          f"Checkpoint {listed[0]} is damaged ({reason}) and no earlier one "
          f"restores: delete {directory} to pretrain from the start, or use "
          "a new --workdir.")
    raise rundir.TrainingError(
        f"Checkpoint {listed[0]} is damaged ({reason}): run --mode=pretrain "
        "(or all) again, which resumes from the checkpoint before it and "
        "rewrites this one.")
  raise rundir.TrainingError(
      f"Cannot {'resume from' if fallback else 'restore the encoder from'} "
      f"{listed[0]}: it does not match this model ({reason}). A work dir "
      "holds one experiment: use a new --workdir.")
