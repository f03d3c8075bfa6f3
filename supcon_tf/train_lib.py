"""Pretraining with a `tf.distribute` custom training loop.

Every replica encodes its local views; the contrastive loss contrasts the
local anchors against the embeddings gathered from *all* replicas, and the
gradient flows back through the gather. Per-replica losses are partial sums
normalised by the global count, so the optimizer's cross-replica gradient sum
equals the single-device gradient of the global batch.

Methods: `supcon`, `simclr`, `npairs` (baseline; one view, also contrasted
against the gathered global batch) and `ce` (encoder + linear head,
cross-entropy), all on the same loop so that they compare on identical code;
`supcon_tf.objectives` says what each one computes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable, Optional

import keras
import tensorflow as tf

from supcon_tf import checkpoints
from supcon_tf import config as config_lib
from supcon_tf import data
from supcon_tf import distributed
from supcon_tf import memory as memory_lib
from supcon_tf import models
from supcon_tf import objectives
from supcon_tf import optimizers
from supcon_tf import precision
from supcon_tf import rundir
from supcon_tf import summaries
from supcon_tf import train_loop


@dataclasses.dataclass
class TrainResult:
  """The end of `pretrain`.

  Attributes:
    images_per_second: samples per second over this call's loops after the
      first (which traces the step), or of the first when it was the only
      one; 0 when there was nothing left to train.
    extended_from: the length in steps the work dir's run had before this
      call changed it (`--steps` / `--epochs`), else None.
  """
  step: int
  loss: float
  images_per_second: float
  workdir: str
  extended_from: Optional[int] = None


class Trainer:
  """Models, optimizer and the distributed step of one run.

  Built under `strategy.scope()`. The training data feed `views
  [batch, views, H, W, C]` float32 in [0, 1] and `labels [batch]` int32,
  where `batch` is the per-replica batch.

  Args:
    config: the run's `TrainConfig`.
    strategy: any `tf.distribute.Strategy`.
    num_classes: classes of the dataset (for `ce` and health metrics).
    input_shape: `(H, W, C)` of the encoder input.
    steps_per_epoch: optimizer steps per epoch (for the schedule).
    encoder: optional Keras model `[batch, H, W, C] -> [batch, dim]` used
      instead of `config.model`'s ResNet.
  """

  def __init__(self, config: config_lib.TrainConfig,
               strategy: tf.distribute.Strategy, *, num_classes: int,
               input_shape, steps_per_epoch: int,
               encoder: Optional[keras.Model] = None):
    check_jit_compile(config.jit_compile, strategy)
    self.config = config
    self.objective = objectives.get(config.method)
    self.strategy = strategy
    self.num_classes = num_classes
    self.steps_per_epoch = steps_per_epoch
    self.total_steps = total_steps(config, steps_per_epoch)
    previous_policy = keras.mixed_precision.global_policy()
    precision.set_global_policy(config.precision)
    try:
      with strategy.scope():
        self.encoder = encoder or models.build_encoder(
            config.model, input_shape=tuple(input_shape),
            num_replicas=strategy.num_replicas_in_sync)
        self.head = self.objective.build_head(
            config.model, num_classes, strategy.num_replicas_in_sync)
        self.head.build(self.encoder.output_shape)
        optimizer = optimizers.build_optimizer(
            config.optimizer, global_batch_size=config.batch_size,
            total_steps=self.total_steps, steps_per_epoch=steps_per_epoch)
        # Any encoder's norm scales/offsets and biases, whatever their names.
        optimizers.exclude_norm_and_bias(optimizer, self.trainable_variables)
        if precision.resolve(config.precision) == "mixed_float16":
          optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        self.optimizer = optimizer
        self.optimizer.build(self.trainable_variables)
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False,
                                name="step")
        self.memory = None  # memory.KeyMemory, with config.queue_size
        if config.queue_size:
          self.memory = memory_lib.KeyMemory(
              config.queue_size, config.key_encoder_momentum)
          self.memory.attach(self.encoder, self.head, self.head.output_dim)
    finally:
      keras.mixed_precision.set_global_policy(previous_policy)
    self._compiled_step = tf.function(self._replica_step,
                                      jit_compile=config.jit_compile)

  @property
  def metric_names(self):
    return self.objective.metric_names

  @property
  def trainable_variables(self):
    return self.encoder.trainable_variables + self.head.trainable_variables

  def learning_rate(self) -> float:
    lr = self.optimizer.learning_rate
    return float(lr(self.step) if callable(lr) else lr)

  def loss_terms(self, views, labels, training=True):
    """Per-replica loss and health metrics.

    Args:
      views: `[batch, V, H, W, C]`.
      labels: `[batch]` int.

    Returns:
      dict of scalars, `metric_names`: `loss` (this replica's share: its
      local sum divided by the global count, so replica shares add up to
      the global mean) and this replica's mean health metrics.
    """
    views = views[:, :self.objective.num_views(views.shape[1])]
    embeddings = models.embed_views(self.encoder, self.head, views,
                                    training=training)
    per_sample, valid, metrics = self.objective.terms(
        embeddings, labels, loss_config=self.config.loss,
        num_classes=self.num_classes, memory=self.memory)
    if self.memory is not None and training:  # popped by _replica_step
      metrics["_keys"] = embeddings
    return dict(loss=objectives.replica_loss(per_sample, valid), **metrics)

  def _replica_step(self, views, labels):
    with distributed.replica_device_scope(self.strategy):

      def compute_loss():
        results = self.loss_terms(views, labels, training=True)
        return results["loss"], results

      results = objectives.minimize(self.optimizer, compute_loss,
                                    lambda: self.trainable_variables)
      if "_keys" in results:
        results["_keys"] = self.memory.keys(views, labels, results["_keys"])
    # Health metrics are per-replica means: weight them to average later.
    replicas = float(self.strategy.num_replicas_in_sync)
    return {k: v if k in ("loss", "_keys") else v / replicas
            for k, v in results.items()}

  def distributed_step(self, views, labels):
    """One step from per-replica inputs; returns globally reduced metrics."""

    def step():
      per_replica = self.strategy.run(self._compiled_step,
                                      args=(views, labels))
      return per_replica, per_replica.pop("_keys", None)

    per_replica = memory_lib.train_step(self.memory, self.encoder, self.head,
                                        step, self.strategy)
    self.step.assign_add(1)
    return {k: self.strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)
            for k, v in per_replica.items()}

  @tf.function
  def train_loop(self, iterator, steps):
    """`steps` steps inside one graph; returns metrics averaged over them."""
    totals = {k: tf.constant(0.0) for k in self.metric_names}
    for _ in tf.range(steps):
      views, labels = next(iterator)
      metrics = self.distributed_step(views, labels)
      totals = {k: totals[k] + metrics[k] for k in totals}
    return {k: v / tf.cast(steps, tf.float32) for k, v in totals.items()}

  @tf.function
  def weights_are_finite(self):
    """True when every weight (BN statistics included) is finite."""
    return tf.reduce_all([tf.reduce_all(tf.math.is_finite(w))
                          for w in self.encoder.weights + self.head.weights
                          if keras.backend.is_float_dtype(w.dtype)])

  def checkpoint(self, **extra) -> tf.train.Checkpoint:
    if self.memory is not None:
      extra.update(self.memory.checkpoint_items())
    return tf.train.Checkpoint(encoder=self.encoder, head=self.head,
                               optimizer=self.optimizer, step=self.step,
                               **extra)


def total_steps(config: config_lib.TrainConfig, steps_per_epoch: int) -> int:
  if config.steps is not None:
    return int(config.steps)
  return max(1, int(math.ceil(config.epochs * steps_per_epoch)))


def check_batch(global_batch: int, replicas: int) -> None:
  if global_batch % replicas:
    raise ValueError(
        f"batch_size={global_batch} is not divisible by the {replicas} "
        f"replicas; use a multiple of {replicas}, e.g. "
        f"{replicas * max(1, global_batch // replicas)}.")


def check_jit_compile(jit_compile: bool,
                      strategy: tf.distribute.Strategy) -> None:
  """Refuses XLA for replicas that are not all GPUs.

  On such devices TensorFlow synchronises replicas (sync batch norm, the
  gradient all-reduce) through `merge_call`, which an XLA-compiled replica
  step cannot contain: it fails with "Trying to access resource ... located
  in device CPU:1 from device CPU:0". On GPUs the replicas synchronise
  without `merge_call` under XLA.
  """
  if not jit_compile or strategy.num_replicas_in_sync == 1:
    return
  devices = list(strategy.extended.worker_devices)
  if all(tf.DeviceSpec.from_string(d).device_type == "GPU" for d in devices):
    return
  raise ValueError(
      f"jit_compile=True (--jit_compile) cannot run with "
      f"{type(strategy).__name__} (--strategy) over "
      f"{strategy.num_replicas_in_sync} replicas on non-GPU devices "
      f"{devices}: TensorFlow synchronises such replicas with merge_call, "
      "which XLA cannot compile. Drop --jit_compile, or use "
      "--strategy=default to XLA-compile on one device.")


def pretrain(config: config_lib.TrainConfig, workdir: str,
             strategy: Optional[tf.distribute.Strategy] = None, *,
             encoder: Optional[keras.Model] = None,
             dataset_fn: Optional[Callable] = None,
             stop_at_step: Optional[int] = None,
             verbose: bool = True) -> TrainResult:
  """Runs (or resumes) a pretraining run in `workdir`.

  Writes `config.json`, checkpoints under `checkpoints/` (model, optimizer
  and step), and TensorBoard summaries under `train/` (a new run's first
  views too, `summaries.write_views`). A resumed run
  rebuilds its input pipeline at the restored step, so it continues on
  exactly the batches an uninterrupted run would see, under every
  strategy. A crash loses at most the steps since the last checkpoint. A
  non-finite loss or weight stops the run with `TrainingError` before
  anything is saved over the last good checkpoint. `config.json` is
  written once the data and any checkpoint have loaded.

  Args:
    config: the run.
    workdir: directory of the run (created; resumed if it holds one).
    strategy: defaults to the current (default) strategy.
    encoder: optional encoder model replacing `config.model`'s ResNet.
    dataset_fn: optional `fn(input_context) -> tf.data.Dataset` of
      per-replica `(views, labels)` batches replacing the TFDS pipeline;
      then `steps` must be set in `config`. A resumed run skips (iterates
      past) the batches its pipeline delivered before the checkpoint.
    stop_at_step: return once this step is reached even if the run is
      longer (a preemption point; calling again resumes).
    verbose: show a progress bar.

  Returns:
    A `TrainResult` with the final step and loss.
  """
  strategy = strategy or tf.distribute.get_strategy()
  replicas = strategy.num_replicas_in_sync
  check_batch(config.batch_size, replicas)
  if config.deterministic:
    tf.config.experimental.enable_op_determinism()
  # Before seeding: an unwritable work dir is refused before anything else
  # (seeding first imports numpy.random) can fail on the process's rights.
  rundir.check_writable(workdir)
  keras.utils.set_random_seed(config.seed)
  rundir.check_resumable(workdir, config, write=False,
                         ignore=rundir.LENGTH_FIELDS)

  num_classes, input_shape, steps_per_epoch, pipeline_fn = _input(
      config, dataset_fn)
  trainer = Trainer(config, strategy, num_classes=num_classes,
                    input_shape=input_shape, steps_per_epoch=steps_per_epoch,
                    encoder=encoder)
  saver = checkpoints.CheckpointSaver(
      trainer.checkpoint(), rundir.checkpoints_dir(workdir), strategy,
      config.keep_checkpoints)
  restored = saver.restore()
  step = int(trainer.step.numpy())
  # Only now: a run that fails on its data or on a foreign checkpoint leaves
  # no config.json behind to refuse the corrected command.
  extended_from = rundir.store_config(
      workdir, config, step=step,
      length=lambda c: total_steps(c, steps_per_epoch))
  if restored and verbose:
    logging.info("Resumed from %s at step %d.", restored, step)
  if step == 0 and saver.chief:  # A new run shows its views, once.
    summaries.write_views(rundir.run_events_dir(workdir), summaries.first_views(
        config, trainer.objective.num_views(config.data.num_views),
        dataset_fn=dataset_fn))
  iterator = iter(strategy.distribute_datasets_from_function(
      lambda context: pipeline_fn(context, _batches_delivered(step, context))))
  if verbose:
    print(_stage_line(config, trainer.total_steps, steps_per_epoch,
                      step if restored else None,
                      epochs_known=dataset_fn is None,
                      extended_from=extended_from), flush=True)
  end = min(trainer.total_steps, stop_at_step or trainer.total_steps)
  step, loss, rate = train_loop.train_until(trainer, saver, iterator, workdir,
                                            step, end, verbose=verbose)
  return TrainResult(step=step, loss=loss, images_per_second=rate,
                     workdir=workdir, extended_from=extended_from)


def _input(config: config_lib.TrainConfig, dataset_fn: Optional[Callable]):
  """`(num_classes, input_shape, steps_per_epoch, pipeline_fn)` of a run.

  `pipeline_fn(input_context, skip_batches)` makes one worker's pipeline,
  past the batches it delivered before a checkpoint.
  """
  if dataset_fn is None:
    info = data.dataset_info(config.data)
    views = objectives.get(config.method).num_views(config.data.num_views)

    def pipeline_fn(context, skip_batches):
      return data.pretrain_dataset(
          config.data, global_batch_size=config.batch_size, seed=config.seed,
          input_context=context, num_views=views, skip_batches=skip_batches)
    size = config.data.image_size
    return (info.num_classes, (size, size, 3),
            max(1, info.num_train // config.batch_size), pipeline_fn)
  if config.steps is None:
    raise ValueError("With a custom dataset_fn, set config.steps.")
  spec = dataset_fn(tf.distribute.InputContext()).element_spec
  return (None, spec[0].shape[2:], config.steps,
          lambda context, skip_batches: dataset_fn(context).skip(skip_batches))


def _batches_delivered(step: int, context: tf.distribute.InputContext) -> int:
  """Batches an input pipeline has produced after `step` steps.

  Each step takes one per-replica batch for every replica the pipeline
  feeds: `num_replicas_in_sync / num_input_pipelines` of them.
  """
  return step * (context.num_replicas_in_sync // context.num_input_pipelines)


def _stage_line(config: config_lib.TrainConfig, total: int,
                steps_per_epoch: int, resumed_at: Optional[int], *,
                epochs_known: bool, extended_from: Optional[int] = None
                ) -> str:
  """The console line that opens pretraining (or says where it resumes)."""
  if extended_from is not None:
    return (f"pretraining: the {extended_from:,}-step run is now {total:,} "
            f"steps, continued from step {resumed_at or 0:,} (the learning "
            f"rate follows the {total:,}-step schedule from there)")
  if resumed_at is not None:
    if resumed_at >= total:
      return f"pretraining: already done ({resumed_at:,} steps)"
    return f"pretraining: resumed from step {resumed_at:,} of {total:,}"
  what = (f"batch {config.batch_size}, {config.method}, "
          f"{precision.resolve(config.precision)}")
  if epochs_known:
    epochs = total / steps_per_epoch
    what = (f"{epochs:.3g} epoch{'' if epochs == 1 else 's'} of "
            f"{steps_per_epoch:,} steps, {what}")
  line = f"pretraining {total:,} steps ({what})"
  requested = int(round(config.optimizer.warmup_epochs * steps_per_epoch))
  fitted = optimizers.fit_warmup(requested, total)
  if fitted != requested:
    line += (f"; warm-up shortened from {requested:,} to {fitted:,} steps "
             "to fit the run")
  return line
