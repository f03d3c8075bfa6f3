"""TensorBoard summaries beyond the pretraining scalars.

Every stage writes its own TensorBoard run in the work dir (paths from
`supcon_tf.rundir`), so that `tensorboard --logdir=runs/` over several work
dirs in one parent compares them:

    <workdir>/pretrain/train/       pretraining scalars (`train_lib`) and, at
                                    step 0 of a new run, the image `views`
    <workdir>/linear_eval/lr_<r>/   one run per learning rate: `train/loss`,
                                    `train/top1`, `validation/top1`, ... per
                                    epoch (steps 1..epochs)
    <workdir>/evaluation/           `knn/top1`, `retrieval/<space>/<metric>`,
                                    `robustness/...` (per-severity lists at
                                    step = severity, the rest at step 0)
    <workdir>/hparams/              the HParams session: the main
                                    `TrainConfig` fields and final metrics

Only the chief writes: `train_lib` and `pipeline` call these on the chief
alone, and `LinearEvalCurves` checks the strategy it is given.
"""

from __future__ import annotations

import numbers
import os
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple

import keras
from tensorboard.plugins.hparams import api as hp
import tensorflow as tf

from supcon_tf import config as config_lib
from supcon_tf import data
from supcon_tf import distributed
from supcon_tf import rundir

VIEWS_TAG = "views"
DEFAULT_MAX_IMAGES = 4
# Dotted `TrainConfig` fields shown in the HParams dashboard.
HPARAM_FIELDS = (
    "method", "model.encoder", "model.width", "model.head",
    "model.projection_dim", "batch_size", "epochs", "steps",
    "optimizer.name", "optimizer.learning_rate", "optimizer.weight_decay",
    "optimizer.schedule", "optimizer.warmup_epochs", "loss.temperature",
    "data.dataset", "data.image_size", "data.num_views", "data.augmentation",
    "queue_size", "precision", "seed")
# HParams metric tag -> its place in `report.json`.
FINAL_METRICS = {
    "linear_eval/test_top1": ("linear_eval", "test_top1"),
    "linear_eval/val_top1": ("linear_eval", "val_top1"),
    "evaluation/knn_top1": ("evaluation", "knn_top1"),
    "pretrain/final_loss": ("pretrain", "final_loss"),
}
# Evaluation fields that are settings, not measurements.
_NOT_MEASURED = ("seed", "severities")
_EVENT_FILES = "events.out.tfevents.*"


def _clear_events(logdir: str) -> None:
  """Removes a run's old event files: what follows replaces them."""
  for path in tf.io.gfile.glob(os.path.join(logdir, _EVENT_FILES)):
    tf.io.gfile.remove(path)


# ----------------------------------------------------------------------------
# Pretraining: the augmented views.

def view_grid(views: tf.Tensor, max_images: int = DEFAULT_MAX_IMAGES
              ) -> tf.Tensor:
  """Each image's views side by side, in displayable range.

  Args:
    views: `[batch, V, H, W, C]` float views (the pretraining batch layout).
    max_images: keep the first this many images.

  Returns:
    `[min(batch, max_images), H, V * W, C]` float32 in [0, 1] (augmented
    values outside it, e.g. after colour jitter, are clipped; non-finite
    ones are 0).
  """
  if max_images < 1:
    raise ValueError(f"max_images={max_images!r} must be >= 1.")
  views = tf.convert_to_tensor(views)
  if views.shape.rank != 5:
    raise ValueError(f"views has shape {views.shape}; pass the pretraining "
                     "layout [batch, views, H, W, C].")
  views = tf.cast(views[:max_images], tf.float32)
  views = tf.clip_by_value(
      tf.where(tf.math.is_finite(views), views, 0.0), 0.0, 1.0)
  return tf.concat(tf.unstack(views, axis=1), axis=2)


def first_views(config: config_lib.TrainConfig, num_views: int, *,
                dataset_fn: Optional[Callable] = None,
                max_images: int = DEFAULT_MAX_IMAGES) -> tf.Tensor:
  """The first images' views of a run's first batch.

  Args:
    config: the run.
    num_views: views per image the method trains on.
    dataset_fn: the run's custom `fn(input_context)` of `(views, labels)`
      batches, if any.
    max_images: images to return (at most).

  Returns:
    `[n, num_views, H, W, C]` float32 in [0, 1]. From the TFDS pipeline, a
    batch of only `max_images` (not the run's batch size): its examples and
    augmentations are the first ones of the run's stream.
  """
  if dataset_fn is not None:
    views, _ = next(iter(dataset_fn(tf.distribute.InputContext()).take(1)))
    return views[:max_images]
  dataset = data.pretrain_dataset(
      config.data, global_batch_size=min(max_images, config.batch_size),
      seed=config.seed, num_views=num_views)
  views, _ = next(iter(dataset.take(1)))
  return views


def write_views(logdir: str, views: tf.Tensor, *, step: int = 0,
                max_images: int = DEFAULT_MAX_IMAGES) -> None:
  """Writes the image `views` (`view_grid` of `[batch, V, H, W, C]`)."""
  grid = view_grid(views, max_images)
  writer = tf.summary.create_file_writer(logdir)
  with writer.as_default(step=step):
    tf.summary.image(VIEWS_TAG, grid, max_outputs=int(grid.shape[0]),
                     description="Augmented views of the first images of "
                     "the first batch, one row of views per image.")
  writer.close()


# ----------------------------------------------------------------------------
# Linear evaluation: curves per learning rate.

def _curve_tag(key: str) -> str:
  """A Keras log key's tag: `val_top1` -> `validation/top1`, `loss` ->
  `train/loss`."""
  if key.startswith("val_"):
    return f"validation/{key[len('val_'):]}"
  return f"train/{key}"


class LinearEvalCurves(keras.callbacks.Callback):
  """Writes every epoch's Keras logs to one learning rate's TensorBoard run.

  Steps are epochs counted from 1 (as in `LinearEvalResult.history`). When
  epoch 1 is written, earlier event files of the run are removed: a rate
  trained again from the start replaces its old curves; a resumed rate adds
  the epochs it trains.

  Args:
    logdir: `rundir.linear_curves_dir(...)`.
    strategy: the strategy linear evaluation runs under; only its chief
      writes (default: always write).
  """

  def __init__(self, logdir: str,
               strategy: Optional[tf.distribute.Strategy] = None):
    super().__init__()
    self.logdir = logdir
    self.chief = strategy is None or distributed.is_chief(strategy)
    self._writer = None

  def on_epoch_end(self, epoch, logs=None):
    if not self.chief:
      return
    if self._writer is None:
      if epoch == 0:
        _clear_events(self.logdir)
      self._writer = tf.summary.create_file_writer(self.logdir)
    with self._writer.as_default(step=epoch + 1):
      for key, value in sorted((logs or {}).items()):
        if isinstance(value, numbers.Number) or tf.is_tensor(value):
          tf.summary.scalar(_curve_tag(key), float(value))
    self._writer.flush()  # A killed run keeps its finished epochs.

  def on_train_end(self, logs=None):
    if self._writer is not None:
      self._writer.close()
      self._writer = None


# ----------------------------------------------------------------------------
# Evaluation scalars.

def evaluation_scalars(result: Mapping[str, Any]
                       ) -> Iterator[Tuple[str, int, float]]:
  """`(tag, step, value)` of an `evaluate_workdir` result's measurements.

  `knn_top1` becomes `knn/top1`; the `retrieval` and `robustness` dicts
  give a tag per float leaf, named by its path (`retrieval/encoder/map@r`,
  `robustness/mean_top1/gaussian_noise`). A list as long as the nearest
  `severities` above it becomes a curve with step = severity
  (`robustness/top1/gaussian_noise`); other values sit at step 0. Integer
  counts, seeds and non-numbers are left out.
  """
  if isinstance(result.get("knn_top1"), float):
    yield "knn/top1", 0, result["knn_top1"]
  for name in ("retrieval", "robustness"):
    if isinstance(result.get(name), Mapping):
      yield from _leaves(name, result[name], None)


def _leaves(prefix, value, severities):
  if isinstance(value, Mapping):
    severities = value.get("severities", severities)
    for key, item in value.items():
      if key not in _NOT_MEASURED:
        yield from _leaves(f"{prefix}/{key}", item, severities)
  elif isinstance(value, float):
    yield prefix, 0, value
  elif (isinstance(value, (list, tuple)) and severities is not None
        and len(value) == len(severities)
        and all(isinstance(v, float) for v in value)):
    for severity, item in zip(severities, value):
      yield prefix, int(severity), item


def write_evaluation(logdir: str, result: Mapping[str, Any]) -> None:
  """Writes `evaluation_scalars(result)` as the run in `logdir` (replaced)."""
  _clear_events(logdir)
  writer = tf.summary.create_file_writer(logdir)
  with writer.as_default():
    for tag, step, value in evaluation_scalars(result):
      tf.summary.scalar(tag, value, step=step)
  writer.close()


# ----------------------------------------------------------------------------
# HParams.

def hparams_of(config: config_lib.TrainConfig) -> Dict[str, Any]:
  """`HPARAM_FIELDS` of `config`: bools, numbers, strings; None left out."""
  flat = rundir.flatten(config_lib.to_dict(config))
  values = {}
  for field in HPARAM_FIELDS:
    value = flat.get(field)
    if value is not None:
      values[field] = (value if isinstance(value, (bool, int, float, str))
                       else str(value))
  return values


def final_metrics(report: Mapping[str, Any]) -> Dict[str, float]:
  """The `FINAL_METRICS` that `report` (as in `report.json`) holds."""
  metrics = {}
  for tag, (stage, key) in FINAL_METRICS.items():
    value = (report.get(stage) or {}).get(key)
    if isinstance(value, numbers.Number) and not isinstance(value, bool):
      metrics[tag] = float(value)
  return metrics


def write_hparams(workdir: str, report: Mapping[str, Any]) -> bool:
  """Writes the work dir's HParams session, replacing an earlier one.

  The hyperparameters are those of the stored pretraining configuration,
  the metrics the `final_metrics` of `report`, as scalars at step 0 of the
  same run, where TensorBoard's HParams dashboard looks for them.

  Returns:
    False (nothing written) when the work dir holds no pretraining
    configuration.
  """
  pretrain_dir = rundir.pretrain_dir(workdir)
  if not tf.io.gfile.exists(rundir.config_path(pretrain_dir)):
    return False
  logdir = rundir.hparams_dir(workdir)
  _clear_events(logdir)
  writer = tf.summary.create_file_writer(logdir)
  with writer.as_default(step=0):
    hp.hparams(hparams_of(rundir.load_config(pretrain_dir)))
    for tag, value in final_metrics(report).items():
      tf.summary.scalar(tag, value)
  writer.close()
  return True
