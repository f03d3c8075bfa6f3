"""Linear evaluation: a linear classifier fitted on a frozen encoder.

Protocol (honest model selection):

  * Every choice -- the learning rate among `LinearEvalConfig.learning_rates`
    and the epoch whose weights are kept -- is made on the "validation" split
    held out from the training data (`DataConfig.validation_fraction`), by
    best validation top-1 accuracy (ties: the earlier learning rate, then the
    earlier epoch).
  * The test split is read once, at the very end, with the chosen weights.
    It never takes part in a choice: nothing reports "best test accuracy over
    epochs".
  * Without a validation split (`validation_fraction=0`) nothing is chosen:
    the classifier trains `epochs` epochs at the single learning rate and the
    final weights are tested (`LinearEvalResult.selected_on == "none"`).

The encoder is frozen: it is never trained and always runs in inference mode
(batch norm uses, and never updates, its moving statistics). Without
augmentation its features are computed once per split and only the linear
layer is fitted on them (`cache_features`), which is much faster than
pushing images through the encoder every epoch. The classifier and the
feature extraction are `supcon_tf.classifier`'s.

With a `workdir`, a killed run resumes: the learning rate in progress from
its last finished epoch (weights and optimizer, saved after every epoch),
finished learning rates and the best weights so far through a small state
file, all under `<workdir>/linear_backup/` (removed once `linear_eval.json`
is written). Every file there is replaced atomically, so a kill at any
instant leaves a consistent backup, and the resumed epochs read the batches
an uninterrupted run would have read. With deterministic ops
(`tf.config.experimental.enable_op_determinism`) a resumed run gives the
same result as an uninterrupted one, bit for bit; given `datasets`, that
also needs a "train" dataset that yields the same batches each time it is
iterated.
"""

import dataclasses
import json
from typing import Any, Dict, List, Optional, Tuple

from absl import logging
import keras
import tensorflow as tf

from supcon_tf import classifier as classifier_lib
from supcon_tf import config as config_lib
from supcon_tf import data
from supcon_tf import linear_backup
from supcon_tf import rundir
from supcon_tf import summaries

RESULT_FILE = rundir.LINEAR_EVAL_FILE
BACKUP_DIR = rundir.LINEAR_BACKUP_DIR
SELECTED_ON = ("validation", "none")


@dataclasses.dataclass
class LinearEvalResult:
  """Outcome of `linear_eval`.

  Attributes:
    val_top1 / val_top5: validation accuracy of the chosen weights (None
      without a validation split). Optimistic: these numbers chose them.
    test_top1 / test_top5: test accuracy of the chosen weights, measured
      once.
    learning_rate: the chosen learning rate.
    epochs: epochs of training behind the chosen weights (1..config.epochs).
    history: one entry per learning rate tried, in order:
      `{"learning_rate": lr, "epochs": [{"epoch": e, "loss": ...,
      "top1": ..., "top5": ..., "val_loss": ..., "val_top1": ...,
      "val_top5": ...}, ...]}` (training metrics are on the training data,
      augmented when `augment`; no `val_*` keys without validation).
    selected_on: `"validation"` or `"none"` (no validation split: final
      weights of the single learning rate).
    num_classes: classes of the classifier.
    top5_k: the k of the "top-5" metrics (5, or fewer classes).
    cached_features: whether the linear layer was fitted on cached features.
  """
  val_top1: Optional[float]
  val_top5: Optional[float]
  test_top1: float
  test_top5: float
  learning_rate: float
  epochs: int
  history: List[Dict[str, Any]]
  selected_on: str
  num_classes: int
  top5_k: int
  cached_features: bool

  def to_dict(self) -> Dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass
class _Splits:
  """What training reads.

  `train` is a finite dataset of images (given `datasets`), None (images
  from a `DataConfig`: `linear_eval` builds the pipeline) or a
  `(features, labels)` pair of arrays (cached path); `validation` is a
  dataset of images or an array pair, or None; `test` is always a dataset
  of images, touched only by the final evaluation.
  """
  train: Any
  validation: Any
  test: tf.data.Dataset
  steps_per_epoch: Optional[int]  # Set for images from a `DataConfig`.


def linear_eval(encoder: keras.Model,
                data_config: config_lib.DataConfig,
                config: config_lib.LinearEvalConfig, *,
                strategy: Optional[tf.distribute.Strategy] = None,
                workdir: Optional[str] = None,
                datasets: Optional[Dict[str, Optional[tf.data.Dataset]]] = None,
                num_classes: Optional[int] = None,
                verbose: bool = True
                ) -> Tuple[keras.Model, LinearEvalResult]:
  """Fits and tests a linear classifier on a frozen encoder.

  See the module docstring for the protocol. For each learning rate the
  linear layer starts from the same initial weights and trains
  `config.epochs` epochs with SGD + momentum, a cosine learning-rate decay
  over those epochs and decoupled weight decay (not on the bias), on the
  softmax cross-entropy; validation top-1 / top-5 are measured after every
  epoch and the best (learning rate, epoch) weights are kept.

  Args:
    encoder: a built Keras model `[batch, H, W, 3] -> [batch, dim]`, e.g.
      from `pretrained.restore_encoder`. It is set `trainable=False`; its
      weights (batch-norm statistics included) are not changed.
    data_config: where the data comes from (unused with `datasets`, except
      that the image path reads its augmentation settings).
    config: the linear-evaluation settings.
    strategy: a `tf.distribute.Strategy` to build, compile and fit under
      (default: the current strategy). Cached features are computed with
      `encoder.predict_on_batch`, under the strategy the encoder was built
      in.
    workdir: optional directory; makes the run resumable and receives
      `linear_eval.json` with the result and per-rate TensorBoard curves.
    datasets: optional `{"train": ds, "validation": ds or None, "test": ds}`
      of `(images [batch, H, W, 3]` float32 in [0, 1], `labels [batch]`
      int) batches replacing the `data_config` pipelines; used as given
      (shuffle and augment "train" yourself). Each must be finite.
    num_classes: number of classes; default: from the dataset's metadata, or
      with `datasets`, the largest training/validation label + 1.
    verbose: show Keras progress bars and log a summary per learning rate.

  Returns:
    `(classifier, result)`: the `classifier.build_classifier` model carrying
    the chosen weights (images -> logits), and a `LinearEvalResult`.

  Raises:
    ValueError: several learning rates but no validation split, a batch
      size larger than the training split, bad `datasets`, or any dataset
      error of `data.dataset_info`.
    rundir.TrainingError: `workdir` holds an unfinished linear evaluation
      of another encoder or configuration.
  """
  strategy = strategy or tf.distribute.get_strategy()
  keras.utils.set_random_seed(config.seed)
  cached = bool(config.cache_features and not config.augment)
  learning_rates = tuple(float(r) for r in
                         (config.learning_rates or (config.learning_rate,)))
  splits, num_classes = _prepare_splits(encoder, data_config, config,
                                        datasets, num_classes, cached,
                                        verbose)
  select = splits.validation is not None
  _check_selectable(learning_rates, select)
  top5_k = min(5, num_classes)

  with strategy.scope():
    classifier = classifier_lib.build_classifier(encoder, num_classes)
    dense = classifier.get_layer("linear")
    model = (_on_features(dense, splits.train[0].shape[1]) if cached
             else classifier)
  initial_weights = dense.get_weights()

  backup_root = _backup_root(workdir, encoder, data_config, config, datasets,
                             num_classes, cached)
  selection = linear_backup.Selection(learning_rates, select, backup_root)
  steps_per_epoch, validation = _epoch_and_validation(splits, config, cached)
  for index, learning_rate in enumerate(learning_rates):
    if selection.done[index]:
      continue
    if verbose:
      logging.info("Linear eval: learning rate %g (%d/%d), %d epochs.",
                   learning_rate, index + 1, len(learning_rates),
                   config.epochs)
    dense.set_weights(initial_weights)
    _fit_learning_rate(
        model, dense, index, learning_rate, strategy=strategy, config=config,
        selection=selection, backup_root=backup_root, top5_k=top5_k,
        train=_train_stream(splits, config, data_config, cached,
                            custom=datasets is not None),
        steps_per_epoch=steps_per_epoch, validation=validation,
        verbose=verbose, curves_dir=workdir and rundir.linear_curves_dir(
            workdir, learning_rate))
    if verbose:
      logging.info("Linear eval: learning rate %g done; best so far: %s.",
                   learning_rate, selection.best)

  # The one and only look at the test split.
  result = _test_chosen(classifier, dense, selection, splits.test,
                        learning_rates, strategy=strategy, select=select,
                        num_classes=num_classes, top5_k=top5_k, cached=cached,
                        verbose=verbose)
  if workdir:
    _write_result(workdir, result, config, backup_root)
  return classifier, result


def _on_features(dense, dim: int) -> keras.Model:
  """`dense` on cached features `[batch, dim]`: trains the classifier's layer."""
  features = keras.Input(shape=(dim,), name="features")
  return keras.Model(features, dense(features), name="linear_on_features")


def _train_stream(splits, config, data_config, cached, custom):
  """A new pipeline of the training batches, repeating forever.

  One per learning rate: a reshuffling `shuffle` carries its state over to
  the next iterator of the same dataset, so a shared pipeline would make
  each learning rate's batches depend on the ones before it, and a resumed
  run differ from an uninterrupted one.
  """
  if cached:
    ds = tf.data.Dataset.from_tensor_slices(splits.train).shuffle(
        len(splits.train[1]), seed=config.seed,
        reshuffle_each_iteration=True).batch(config.batch_size)
  elif not custom:
    return data.supervised_dataset(
        data_config, global_batch_size=config.batch_size, seed=config.seed,
        augment=config.augment, repeat=True)
  else:
    ds = splits.train
  # One iterator for the whole fit instead of one per epoch (costly under a
  # MirroredStrategy); each repetition is one epoch.
  return ds.repeat()


def _epoch_and_validation(splits, config, cached):
  """`(steps per epoch, validation dataset or None)` for `fit`."""
  validation = splits.validation
  if cached and validation is not None:
    validation = tf.data.Dataset.from_tensor_slices(validation).batch(
        config.batch_size)
  steps_per_epoch = splits.steps_per_epoch or _count_batches(
      tf.data.Dataset.from_tensor_slices(splits.train[1]).batch(
          config.batch_size) if cached else splits.train)
  return steps_per_epoch, validation


def _fit_learning_rate(model, dense, index, learning_rate, *, strategy,
                       config, selection, backup_root, top5_k, train,
                       steps_per_epoch, validation, verbose, curves_dir=None):
  """Trains the linear layer at one learning rate, resuming its backup.

  Every epoch's validation scores go to `selection` (which keeps the best
  weights); with `backup_root`, every epoch is backed up under
  `lr<index>/` and a rerun continues after the last backed-up epoch. With
  `curves_dir`, every epoch's metrics go to TensorBoard there.
  """
  with strategy.scope():
    _compile(model, _optimizer(config, learning_rate,
                               steps_per_epoch * config.epochs), top5_k)
  callbacks = [linear_backup.EpochRecorder(selection, index, dense)]
  if curves_dir:
    callbacks.insert(0, summaries.LinearEvalCurves(curves_dir, strategy))
  done = 0
  if backup_root:
    backup = linear_backup.EpochBackup(
        rundir.learning_rate_backup_dir(backup_root, index))
    with strategy.scope():  # Optimizer variables made here are mirrored.
      done = backup.restore(model)
    # After the recorder, so that a kill between the two re-runs the epoch
    # rather than losing its record.
    callbacks.append(backup)
  # Skipping the finished epochs' batches gives the resumed epochs the
  # batches (and shuffles) of an uninterrupted run.
  model.fit(train.skip(done * steps_per_epoch), epochs=config.epochs,
            initial_epoch=done, callbacks=callbacks, shuffle=False,
            verbose=1 if verbose else 0, steps_per_epoch=steps_per_epoch,
            validation_data=validation)
  selection.finish(index)
  if backup_root:
    tf.io.gfile.rmtree(backup.directory)



def _check_selectable(learning_rates, select) -> None:
  """Several learning rates can only be chosen among on a validation split."""
  if not select and len(learning_rates) > 1:
    raise ValueError(
        f"learning_rates={learning_rates} can only be chosen on a validation "
        "split, and there is none (validation_fraction=0 or "
        "datasets['validation'] is None). Set DataConfig.validation_fraction "
        "> 0, or give a single learning rate.")


def _backup_root(workdir, encoder, data_config, config, datasets,
                 num_classes, cached) -> Optional[str]:
  """The run's backup directory (None without `workdir`), checked to be its."""
  backup_root = rundir.linear_backup_dir(workdir) if workdir else None
  if backup_root:
    linear_backup.check_run(backup_root, {
        "config": config_lib.to_dict(config),
        "data": (config_lib.to_dict(data_config) if datasets is None
                 else "custom datasets"),
        "encoder_sha256": linear_backup.fingerprint(encoder),
        "num_classes": num_classes,
        "cached_features": cached,
    })
  return backup_root


def _test_chosen(classifier, dense, selection, test_dataset, learning_rates,
                 *, strategy, select, num_classes, top5_k, cached,
                 verbose) -> "LinearEvalResult":
  """Tests the chosen weights on `test_dataset`, once, and gives the result."""
  dense.set_weights(selection.best_weights)
  with strategy.scope():
    _compile(classifier, None, top5_k)
  test = classifier.evaluate(test_dataset, return_dict=True,
                             verbose=1 if verbose else 0)
  result = _result(selection, test, learning_rates, select=select,
                   num_classes=num_classes, top5_k=top5_k, cached=cached)
  if verbose:
    logging.info("Linear eval: lr %g, %d epochs (chosen on %s): test top-1 "
                 "%.4f, top-%d %.4f.", result.learning_rate, result.epochs,
                 result.selected_on, result.test_top1, top5_k,
                 result.test_top5)
  return result


def _write_result(workdir, result, config, backup_root) -> None:
  """Writes `linear_eval.json`, then removes the backup it supersedes."""
  rundir.atomic_write(
      rundir.linear_result_path(workdir),
      json.dumps(dict(result.to_dict(), config=config_lib.to_dict(config)),
                 indent=2, sort_keys=True))
  tf.io.gfile.rmtree(backup_root)

def _result(selection, test, learning_rates, *, select, num_classes, top5_k,
            cached) -> "LinearEvalResult":
  best = selection.best
  return LinearEvalResult(
      val_top1=best.get("val_top1") if select else None,
      val_top5=best.get("val_top5") if select else None,
      test_top1=float(test["top1"]), test_top5=float(test["top5"]),
      learning_rate=learning_rates[best["index"]], epochs=best["epoch"],
      history=[{"learning_rate": rate, "epochs": records}
               for rate, records in zip(learning_rates, selection.history)],
      selected_on="validation" if select else "none",
      num_classes=num_classes, top5_k=top5_k, cached_features=cached)


def _prepare_splits(encoder, data_config, config, datasets, num_classes,
                    cached, verbose) -> Tuple[_Splits, int]:
  """Builds (or checks) the splits and settles the class count."""
  steps_per_epoch = None
  if datasets is None:
    info = data.dataset_info(data_config)
    num_classes = num_classes or info.num_classes
    test = data.eval_dataset(data_config, "test",
                             batch_size=config.batch_size)
    validation = data.eval_dataset(data_config, "validation",
                                   batch_size=config.batch_size)
    if cached:
      train = data.eval_dataset(data_config, "train",
                                batch_size=config.batch_size)
    else:
      steps_per_epoch = info.num_train // config.batch_size
      if steps_per_epoch < 1:
        raise ValueError(
            f"LinearEvalConfig.batch_size={config.batch_size} is larger than "
            f"the {info.num_train} training examples of "
            f"{data_config.dataset!r}; lower batch_size.")
      train = None  # Built anew for each learning rate by `linear_eval`.
  else:
    unknown = sorted(set(datasets) - {"train", "validation", "test"})
    missing = sorted({"train", "test"} - set(datasets))
    if unknown or missing:
      raise ValueError(
          f"datasets needs keys 'train', 'test' and optionally 'validation'; "
          f"got {sorted(datasets)}.")
    train, test = datasets["train"], datasets["test"]
    validation = datasets.get("validation")
    for name, ds in (("train", train), ("validation", validation)):
      if ds is not None and ds.cardinality() == tf.data.INFINITE_CARDINALITY:
        raise ValueError(f"datasets[{name!r}] repeats forever; pass one "
                         "pass over the data (drop .repeat()).")

  if cached:
    if verbose:
      print("features of the training split (frozen encoder):", flush=True)
    train = classifier_lib.extract_features(encoder, train, progress=verbose)
    if validation is not None:
      if verbose:
        print("features of the validation split:", flush=True)
      validation = classifier_lib.extract_features(encoder, validation,
                                                   progress=verbose)
  if num_classes is None:
    if cached:
      labels = [train[1]] + ([validation[1]] if validation is not None else [])
      num_classes = int(max(int(l.max()) for l in labels)) + 1
    else:
      num_classes = _max_label(train) + 1
  return _Splits(train=train, validation=validation, test=test,
                 steps_per_epoch=steps_per_epoch), int(num_classes)


def _count_batches(dataset: tf.data.Dataset) -> int:
  """Batches in one pass over a finite dataset (iterates it if unknown)."""
  count = int(dataset.cardinality())
  if count < 0:
    count = int(dataset.reduce(0, lambda n, _: n + 1))
  if count < 1:
    raise ValueError("The training dataset is empty.")
  return count


def _max_label(dataset: tf.data.Dataset) -> int:
  return int(dataset.map(lambda images, labels: tf.reduce_max(
      tf.cast(labels, tf.int64))).reduce(tf.constant(-1, tf.int64),
                                         tf.maximum))


def _optimizer(config: config_lib.LinearEvalConfig, learning_rate: float,
               total_steps: int) -> keras.optimizers.Optimizer:
  schedule = keras.optimizers.schedules.CosineDecay(
      learning_rate, decay_steps=max(1, total_steps))
  optimizer = keras.optimizers.SGD(
      schedule, momentum=config.momentum,
      weight_decay=config.weight_decay or None)
  optimizer.exclude_from_weight_decay(var_names=["bias"])
  return optimizer


def _compile(model: keras.Model, optimizer, top5_k: int) -> None:
  kwargs = {} if optimizer is None else {"optimizer": optimizer}
  model.compile(
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      # Argmax accuracy for top-1: in_top_k would count tied logits (e.g. an
      # all-zero output) as correct.
      metrics=[keras.metrics.SparseCategoricalAccuracy(name="top1"),
               keras.metrics.SparseTopKCategoricalAccuracy(k=top5_k,
                                                           name="top5")],
      **kwargs)
